"""task=generate: text -> image by CLIP guidance, plus the word explainability loss on neglected or chosen words.

The run follows the reference (FuseDream notebook): optimise once with the plain objective (λ = 0), score every
word of the prompt on the result, then rerun from the same start with −cos − λ·score on the chosen words. Words
are chosen explicitly (``task.words``) or automatically: the semantic words whose score on the plain result is
below ``task.neglect_threshold``; when none is neglected there is no second run.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from explainguide.explain.engine import explain_pairs
from explainguide.explain.tokens import token_spans
from explainguide.generators import Generator, make_cutouts
from explainguide.guidance import generation_term, similarity_loss
from explainguide.runtime import RunContext
from explainguide.tasks.common import open_recorder
from explainguide.tasks.guided import (
    Guide,
    Objective,
    Trace,
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
from explainguide.tracking import RunRecorder
from explainguide.viz import token_strip

log = logging.getLogger(__name__)

LAMBDA_KEY = "loss.explainability"


def generation_objective(
    guide: Guide,
    token_ids: torch.Tensor,
    spans: list[list[int]],
    lam: float,
    similarity_weight: float,
    similarity: str,
    cutouts: DictConfig,
    rng: torch.Generator,
) -> Objective:
    """FuseDream's loss on augmented cutouts: w·sim(cos) + λ·(−mean word score of the chosen `spans`).

    token_ids (1, L). With λ > 0 the cosine comes from the relevance forward (text relevance, second order,
    cosine target), so each cutout is encoded once either way.
    """
    text_features = guide.text_features(token_ids)
    eot = token_ids.argmax(dim=-1)

    def objective(image: torch.Tensor) -> dict[str, torch.Tensor]:
        cut, _ = make_cutouts(image, None, cut_size=guide.size, generator=rng, **cutouts)
        pixels = guide.pixels(cut)
        if lam > 0:
            n = pixels.shape[0]
            result = explain_pairs(guide.model, pixels, token_ids.expand(n, -1), target="cosine", order="second",
                                   text=True, image=False)
            cosine = result.similarity
            explainability = generation_term(result.text_row, eot.expand(n), spans)
        else:
            cosine = guide.cosine(pixels, text_features)
            explainability = torch.zeros((), device=guide.device)
        sim = similarity_loss(similarity, cosine)
        return {"loss": similarity_weight * sim + lam * explainability, "similarity": sim,
                "explainability": explainability, "cosine": cosine.mean()}

    return objective


def setup(cfg: DictConfig, guide: Guide, generator: Generator) -> tuple[Generator, Objective]:
    """The generator on the model's device and the objective at the configured λ on the candidate words."""
    prompt = single_prompt(cfg.task.text)
    selection, _ = word_choice(guide, prompt, cfg.task.word_mode, cfg.task.words)
    generator = generator.to(guide.device)
    objective = generation_objective(
        guide, guide.tokens(prompt), token_spans(selection), float(cfg.loss.explainability), float(cfg.loss.similarity),
        cfg.task.similarity, cfg.task.cutouts, guide.cutout_rng(cfg.seed))
    return generator, objective


def run(cfg: DictConfig, ctx: RunContext) -> dict:
    task = cfg.task
    prompt = single_prompt(task.text)
    lam, similarity_weight = float(cfg.loss.explainability), float(cfg.loss.similarity)
    check_word_flags(task.word_mode, task.words)
    plain_generator = build_generator(cfg)
    guide = load_guide(cfg)
    token_ids = guide.tokens(prompt)
    candidates, automatic = word_choice(guide, prompt, task.word_mode, task.words)
    words = [span.word for span in candidates.spans]
    all_spans = [span.positions for span in candidates.spans]

    def optimise_phase(recorder: RunRecorder, chosen: list[int], name: str, offset: int) -> Trace:
        """One run from the seeded start; λ applies to the `chosen` words (none: the plain objective)."""
        generator = plain_generator if not chosen else build_generator(cfg)
        objective = generation_objective(guide, token_ids, [all_spans[i] for i in chosen], lam if chosen else 0.0,
                                         similarity_weight, task.similarity, task.cutouts, guide.cutout_rng(cfg.seed))
        return optimise(generator.to(guide.device), objective, task.steps, task.lr, LAMBDA_KEY, task.snapshot_every,
                        cfg.progress, desc=f"generate ({name})", log=logger_for(recorder, f"generate/{name}", offset),
                        on_snapshot=snapshot_logger(recorder, name, offset))

    def evaluate(trace: Trace) -> tuple[list[float], float]:
        views = eval_views(guide, trace.image, task.cutouts, task.eval_views, cfg.seed)
        return score_words(guide, views, token_ids, all_spans)

    def record_phase(recorder: RunRecorder, trace: Trace, name: str) -> None:
        record_trace(recorder, trace, name)
        row = image_relevance(guide, trace.image, token_ids, 0)[0]
        recorder.image(f"{name}_relevance", relevance_overlay(trace.image, row), caption=prompt)

    with open_recorder(cfg, ctx, job_type="generate") as recorder:
        plain = optimise_phase(recorder, [], "plain", offset=0)
        record_phase(recorder, plain, "plain")
        before, augclip_plain = evaluate(plain)
        chosen = [i for i, weight in enumerate(candidates.weights)
                  if weight != 0 and (not automatic or before[i] < task.neglect_threshold)]
        guided = optimise_phase(recorder, chosen, "guided", offset=task.steps) if chosen and lam > 0 else None
        if guided is None:  # only automatic choice can leave no word: flags and word lists choose at least one
            why = f"{LAMBDA_KEY}={lam}" if chosen else f"no semantic word scored below {task.neglect_threshold}"
            log.info("no guided run: %s", why)
        else:
            record_phase(recorder, guided, "guided")
        after, augclip_guided = evaluate(guided) if guided is not None else (before, augclip_plain)

        recorder.image("final", (guided or plain).image[0], caption=prompt)
        recorder.image("plain_tokens", token_strip(words, before), caption=prompt)
        recorder.image("guided_tokens", token_strip(words, after), caption=prompt)
        recorder.table("word_scores", ["word", "chosen", "score_plain", "score_guided"],
                       [[w, i in chosen, round(b, 4), round(a, 4)]
                        for i, (w, b, a) in enumerate(zip(words, before, after))])
        metrics = {
            "generate/prompt": prompt,
            "generate/words": words,
            "generate/chosen": [words[i] for i in chosen],
            "generate/automatic": automatic,
            "generate/guided": guided is not None,
            "generate/lambda": lam,
            "generate/word_scores_plain": before,
            "generate/word_scores_guided": after,
            "generate/augclip_plain": augclip_plain,
            "generate/augclip_guided": augclip_guided,
            "model_source": guide.bundle.source,
        }
        recorder.summary(metrics)
    return metrics
