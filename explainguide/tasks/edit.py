"""task=edit: move a user image toward a description, keeping its desired words relevant (StyleCLIP-style).

Loss, as the reference's editing code: w·(1 − cos) − λ·score + l2·Σ(latent − start)², where score is the
editing score of the desired words (method.md: EOT row over the word tokens / its sum, weighted by the min–max
scaled word weights, divided by the number of nonzero weights; equal weights are safe). Relevance is second order
with the scaled logit as target, as the reference's editing loss explains `logits_per_image`. The generator
starts from the image (`init_from_image`: pixel and fft invert their parameterisation, vqgan encodes it).
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torchvision.transforms.functional import to_tensor

from explainguide.explain.engine import explain_pairs
from explainguide.explain.scores import edit_score
from explainguide.explain.tokens import WordSelection, scaled_token_weights
from explainguide.generators import Generator
from explainguide.guidance import edit_term, similarity_loss
from explainguide.images import EXAMPLE_IMAGE, load_image
from explainguide.runtime import RunContext
from explainguide.tasks.common import open_recorder
from explainguide.tasks.guided import (
    Guide,
    Objective,
    build_generator,
    check_word_flags,
    eval_views,
    image_relevance,
    load_guide,
    logger_for,
    optimise,
    record_trace,
    relevance_overlay,
    score_words,
    single_prompt,
    snapshot_logger,
    word_choice,
)
from explainguide.viz import token_strip

log = logging.getLogger(__name__)

LAMBDA_KEY = "loss.explainability"


def edit_objective(
    guide: Guide,
    token_ids: torch.Tensor,
    token_weights: torch.Tensor,
    lam: float,
    similarity_weight: float,
    similarity: str,
    l2: float,
    anchors: list[tuple[torch.Tensor, torch.Tensor]],
) -> Objective:
    """w·sim(cos) + λ·(−edit score) + l2·Σ‖latent − start‖² on the whole image resized to CLIP's input.

    token_ids (1, L); token_weights (L,) scaled word weights; anchors: (latent, its start value) pairs.
    """
    text_features = guide.text_features(token_ids)
    eot = token_ids.argmax(dim=-1)
    logit_scale = guide.model.logit_scale.exp().detach()

    def objective(image: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = guide.pixels(image)
        if lam > 0:
            result = explain_pairs(guide.model, pixels, token_ids, target="scaled", order="second", text=True,
                                   image=False)
            cosine = result.similarity / logit_scale
            explainability = edit_term(result.text_row, eot, token_weights)
        else:
            cosine = guide.cosine(pixels, text_features)
            explainability = torch.zeros((), device=guide.device)
        anchor = sum((latent - start).pow(2).sum() for latent, start in anchors)
        sim = similarity_loss(similarity, cosine)
        return {"loss": similarity_weight * sim + lam * explainability + l2 * anchor, "similarity": sim,
                "explainability": explainability, "anchor": anchor, "cosine": cosine.mean()}

    return objective


def start_image(cfg: DictConfig) -> torch.Tensor:
    """task.image (or the bundled example) as (1, 3, H, W) in [0, 1]."""
    return to_tensor(load_image(cfg.task.image or EXAMPLE_IMAGE))[None]


def desired_words(cfg: DictConfig, guide: Guide) -> tuple[WordSelection, torch.Tensor]:
    """The desired words of task.text and their scaled token weights (L,) on the model's device.

    Warns when every word has the same nonzero weight: the scaled weights are then all 1 and the editing score
    is the constant 1/#tokens, so the explainability term moves nothing.
    """
    selection, _ = word_choice(guide, single_prompt(cfg.task.text), cfg.task.word_mode, cfg.task.words)
    weights = scaled_token_weights(selection).to(guide.device)
    if len(set(selection.weights)) == 1:  # zero for all was rejected by word_choice
        log.warning("task.words=%r weighs all %d words equally, so the editing score is the constant 1/%d and %s has "
                    "no effect; weigh the desired words above the others (e.g. task.word_mode=flags "
                    "'task.words=\"0 1 0 0\"' or task.words=[green])", cfg.task.words, len(selection.spans),
                    int(weights.count_nonzero()), LAMBDA_KEY)
    return selection, weights


def setup(cfg: DictConfig, guide: Guide, generator: Generator) -> tuple[Generator, Objective]:
    """The generator on the model's device started from the image, and the editing objective at the configured λ."""
    return setup_words(cfg, guide, generator, desired_words(cfg, guide)[1])


def setup_words(cfg: DictConfig, guide: Guide, generator: Generator, token_weights: torch.Tensor
                ) -> tuple[Generator, Objective]:
    """:func:`setup` for the scaled token weights (L,) of :func:`desired_words`."""
    task = cfg.task
    generator = generator.to(guide.device)
    generator.init_from_image(start_image(cfg).to(guide.device))
    anchors = [(latent, latent.detach().clone()) for latent in generator.anchor_parameters()]
    objective = edit_objective(guide, guide.tokens(single_prompt(task.text)), token_weights,
                               float(cfg.loss.explainability), float(cfg.loss.similarity), task.similarity,
                               float(cfg.loss.l2), anchors)
    return generator, objective


def edit_scores(guide: Guide, image: torch.Tensor, token_ids: torch.Tensor, token_weights: torch.Tensor) -> float:
    """The editing score of one image (1, 3, H, W), as the loss computes it (scaled target), without a graph."""
    result = explain_pairs(guide.model, guide.pixels(image.to(guide.device)), token_ids, target="scaled", text=True,
                           image=False)
    return float(edit_score(result.text_row.detach(), token_ids.argmax(dim=-1), token_weights)[0])


def run(cfg: DictConfig, ctx: RunContext) -> dict:
    task = cfg.task
    prompt = single_prompt(task.text)
    start_image(cfg)  # a bad task.image fails here, before any model is loaded
    check_word_flags(task.word_mode, task.words)  # so do bad flags
    generator = build_generator(cfg)  # and a size the generator rejects
    guide = load_guide(cfg)
    selection, weights = desired_words(cfg, guide)
    generator, objective = setup_words(cfg, guide, generator, weights)
    token_ids = guide.tokens(prompt)
    words = [span.word for span in selection.spans]
    spans = [span.positions for span in selection.spans]
    with torch.no_grad():
        start = generator().detach().cpu()

    def evaluate(image: torch.Tensor) -> tuple[list[float], float, float]:
        views = eval_views(guide, image, task.cutouts, task.eval_views, cfg.seed)
        scores, augclip = score_words(guide, views, token_ids, spans)
        return scores, augclip, edit_scores(guide, image, token_ids, weights)

    with open_recorder(cfg, ctx, job_type="edit") as recorder:
        trace = optimise(generator, objective, task.steps, task.lr, LAMBDA_KEY, task.snapshot_every, cfg.progress,
                         desc="edit", log=logger_for(recorder, "edit"),
                         on_snapshot=snapshot_logger(recorder, "final"))
        before, augclip_before, score_before = evaluate(start)
        after, augclip_after, score_after = evaluate(trace.image)
        recorder.image("start", start[0], caption=prompt)
        record_trace(recorder, trace, "final")
        for name, image, scores in (("start", start, before), ("final", trace.image, after)):
            recorder.image(f"{name}_tokens", token_strip(words, scores), caption=prompt)
            row = image_relevance(guide, image, token_ids, 0)[0]
            recorder.image(f"{name}_relevance", relevance_overlay(image, row), caption=prompt)
        recorder.table("word_scores", ["word", "weight", "score_start", "score_final"],
                       [[w, weight, round(b, 4), round(a, 4)]
                        for w, weight, b, a in zip(words, selection.weights, before, after)])
        metrics = {
            "edit/prompt": prompt,
            "edit/words": words,
            "edit/word_weights": list(selection.weights),
            "edit/lambda": float(cfg.loss.explainability),
            "edit/edit_score_start": score_before,
            "edit/edit_score_final": score_after,
            "edit/word_scores_start": before,
            "edit/word_scores_final": after,
            "edit/augclip_start": augclip_before,
            "edit/augclip_final": augclip_after,
            "edit/mean_abs_change": float((trace.image - start).abs().mean()),
            "model_source": guide.bundle.source,
        }
        recorder.summary(metrics)
    return metrics
