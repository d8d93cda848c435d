"""task=zero_shot: compare prompt templates by zero-shot accuracy and class-name explainability score."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from explainguide.data import build_dataset
from explainguide.explain.class_scores import class_name_scores
from explainguide.explain.engine import explain_pairs
from explainguide.explain.tokens import class_prompt_tokens
from explainguide.models.towers import token_embeddings
from explainguide.runtime import RunContext
from explainguide.tasks.common import encode_images, open_recorder
from explainguide.viz import heatmap_overlay, scatter_plot, to_uint8_hwc
from explainguide.data.shapes import denormalize


def evaluate_template(bundle, template, classnames, image_features, labels, batch_size: int) -> dict:
    """Accuracy and mean class-name score (CoOp normalisation, target logit(b, y_b)) for one template."""
    ids, mask = class_prompt_tokens(bundle.tokenizer, template, classnames, bundle.context_length)
    ids, mask = ids.to(bundle.device), mask.to(bundle.device)
    prompts = token_embeddings(bundle.model, ids).detach()
    correct, scores = 0, []
    for start in range(0, len(labels), batch_size):
        chunk = slice(start, start + batch_size)
        result = class_name_scores(bundle.model, image_features[chunk], prompts, ids, mask, labels=labels[chunk])
        correct += (result.logits.argmax(dim=-1) == labels[chunk]).sum().item()
        scores.append(result.scores.detach())
    return {"accuracy": correct / len(labels), "class_name_score": torch.cat(scores).mean().item()}


def run(cfg: DictConfig, ctx: RunContext) -> dict:
    task = cfg.task
    bundle = instantiate(cfg.model)
    for parameter in bundle.model.parameters():
        parameter.requires_grad_(False)
    dataset = build_dataset(split=task.split, preprocess=bundle.preprocess, **cfg.dataset)
    templates = list(task.templates or dataset.templates)
    loader = DataLoader(dataset, batch_size=task.batch_size, num_workers=task.num_workers)
    with open_recorder(cfg, ctx, job_type="zero_shot") as recorder:
        image_features, labels = encode_images(bundle.model, loader, bundle.device, bundle.dtype, cfg.progress)
        rows = []
        for step, template in enumerate(tqdm(templates, desc="templates", disable=not cfg.progress)):
            result = evaluate_template(bundle, template, dataset.classnames, image_features, labels, task.batch_size)
            recorder.log({"zero_shot/accuracy": result["accuracy"],
                          "zero_shot/class_name_score": result["class_name_score"]}, step=step)
            rows.append([template, round(result["accuracy"], 4), round(result["class_name_score"], 4)])
        recorder.table("templates", ["template", "accuracy", "class_name_score"], rows)
        plot = scatter_plot([r[2] for r in rows], [r[1] for r in rows], [r[0] for r in rows],
                            "mean class-name explainability score", "zero-shot accuracy",
                            f"{cfg.dataset.name}: templates")
        recorder.image("accuracy_vs_explainability", plot)
        best = max(rows, key=lambda r: r[1])
        _heatmaps(bundle, dataset, best[0], task.n_heatmaps, recorder)
        metrics = {"zero_shot/best_template": best[0], "zero_shot/best_accuracy": best[1],
                   "zero_shot/mean_accuracy": sum(r[1] for r in rows) / len(rows),
                   "zero_shot/n_images": len(labels), "zero_shot/n_templates": len(rows)}
        recorder.summary(metrics)
    return metrics


def _heatmaps(bundle, dataset, template: str, count: int, recorder) -> None:
    """Image relevance of a few images for their true class prompt under `template`."""
    if count <= 0 or not hasattr(bundle.model.visual, "transformer"):
        return
    for index in torch.linspace(0, len(dataset) - 1, count).long().tolist():
        image, label = dataset[index]
        prompt = template.format(dataset.classnames[label])
        ids = bundle.tokenizer([prompt]).to(bundle.device)
        result = explain_pairs(bundle.model, image[None].to(bundle.device, bundle.dtype), ids,
                               target="cosine", text=False)
        patches = result.image_row[0, 1:].detach().float().cpu()
        grid = int(round(patches.numel() ** 0.5))
        picture = to_uint8_hwc(denormalize(image.float().cpu()).clamp(0, 1))
        recorder.image(f"heatmap_{index:04d}", heatmap_overlay(picture, patches.reshape(grid, grid)), caption=prompt)
