"""task=explain: image and token relevance maps plus a per-word score table for user images and prompts."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from explainguide.explain.capture import RelevanceNotSupported, image_blocks
from explainguide.explain.engine import TARGETS, explain_pairs
from explainguide.explain.scores import word_token_relevance
from explainguide.explain.tokens import tokenize, word_spans
from explainguide.images import EXAMPLE_IMAGE, EXAMPLE_PROMPTS, list_images, load_image
from explainguide.runtime import ConfigError, RunContext
from explainguide.tasks.common import open_recorder, prompts_from_config
from explainguide.viz import heatmap_overlay, token_strip

log = logging.getLogger(__name__)


def _image_relevance_supported(model) -> bool:
    try:
        image_blocks(model)
        return True
    except RelevanceNotSupported as err:
        log.warning("%s; writing text relevance only", err)
        return False


def run(cfg: DictConfig, ctx: RunContext) -> dict:
    task = cfg.task
    if task.target not in TARGETS:  # before any model or image is loaded
        raise ConfigError(f"task.target={task.target!r}: use one of {sorted(TARGETS)}")
    given = task.text is not None or task.prompts_file
    prompts = prompts_from_config(task.text, task.prompts_file) if given else list(EXAMPLE_PROMPTS)
    paths = list_images(task.image) if task.image else [EXAMPLE_IMAGE]
    bundle = instantiate(cfg.model)
    with_image = _image_relevance_supported(bundle.model)
    token_ids = tokenize(bundle.tokenizer, prompts, bundle.context_length).to(bundle.device)
    spans = [word_spans(bundle.tokenizer, p, bundle.context_length) for p in prompts]
    rows, similarities = [], []
    with open_recorder(cfg, ctx, job_type="explain") as recorder:
        for image_index, path in enumerate(tqdm(paths, desc="explain", disable=not cfg.progress)):
            picture = load_image(path)
            pixels = bundle.preprocess(picture).unsqueeze(0).to(bundle.device, bundle.dtype)
            result = explain_pairs(
                bundle.model, pixels, token_ids, target=task.target, image=with_image,
                text_first_block=task.text_first_block, image_first_block=task.image_first_block,
            )
            words = word_token_relevance(result.text_row.detach(), token_ids.argmax(dim=-1))
            for prompt_index, prompt in enumerate(prompts):
                scores = [float(words[prompt_index, s.start : s.end].max()) for s in spans[prompt_index]]
                tag = f"img{image_index:03d}_prompt{prompt_index:02d}"
                recorder.image(f"{tag}_tokens", token_strip([s.word for s in spans[prompt_index]], scores),
                               caption=prompt)
                if with_image:
                    patches = result.image_row[prompt_index, 1:].detach()
                    grid = int(round(patches.numel() ** 0.5))
                    overlay = heatmap_overlay(picture, patches.reshape(grid, grid).float().cpu())
                    recorder.image(f"{tag}_heatmap", overlay, caption=prompt)
                similarity = float(result.similarity[prompt_index].detach())
                similarities.append(similarity)
                rows += [[path.name, prompt, s.word, round(score, 4)] for s, score in zip(spans[prompt_index], scores)]
                recorder.log({"explain/similarity": similarity}, step=image_index * len(prompts) + prompt_index)
        recorder.table("word_scores", ["image", "prompt", "word", "score"], rows)
        metrics = {"explain/mean_similarity": sum(similarities) / len(similarities),
                   "explain/n_images": len(paths), "explain/n_prompts": len(prompts), "model_source": bundle.source,
                   "prompts": prompts}
        recorder.summary(metrics)
    return metrics
