"""task=evaluate: test learned prompts (saved by task=prompt_learning) on a dataset split.

Also the one home of the learned-prompts file (`save_prompts`, `load_prompts`) and of the evaluation both tasks
run (`evaluate_prompts`, `record_evaluation`), so re-loading a run's prompts reproduces its test numbers exactly:
    explainguide task=evaluate task.prompts=outputs/prompt_learning/<run>/prompts.safetensors
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from explainguide.data import build_dataset
from explainguide.explain.class_scores import class_name_scores
from explainguide.prompts import PromptLearner, class_logits
from explainguide.runtime import ConfigError, RunContext
from explainguide.tasks.common import encode_images, open_recorder

PROMPTS_FILE = "prompts.safetensors"
_META_KEY = "explainguide"
# PromptLearner arguments stored with the ctx; with the model they rebuild the same prompts.
LEARNER_KEYS = ("classnames", "n_ctx", "ctx_init", "class_token_position", "class_specific")


def save_prompts(path: Path, learner: PromptLearner, ctx_init: str | None, meta: dict) -> None:
    """ctx (fp32) plus the learner's arguments and `meta` (JSON) in one safetensors file, replaced atomically."""
    learner_args = {
        "classnames": learner.classnames, "n_ctx": learner.n_ctx, "ctx_init": ctx_init,
        "class_token_position": learner.class_token_position, "class_specific": learner.ctx.dim() == 3,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"ctx": learner.ctx.detach().float().cpu().contiguous()}, str(tmp),
              metadata={_META_KEY: json.dumps({**learner_args, **meta})})
    os.replace(tmp, path)


def load_prompts(path: str | Path, bundle) -> tuple[PromptLearner, dict]:
    """The learner saved at `path` (a prompts file or the run dir holding one), on `bundle`'s model, and its meta."""
    if not str(path).strip():
        raise ConfigError(f"task.prompts is empty; give the {PROMPTS_FILE} (or the output dir) of a "
                          "task=prompt_learning run")
    path = Path(path)
    path = path / PROMPTS_FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"task.prompts={str(path)!r} does not exist; give the {PROMPTS_FILE} (or the output dir) "
                          "of a task=prompt_learning run")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()[_META_KEY])
            ctx = handle.get_tensor("ctx")
    except Exception as err:  # not safetensors, no metadata, no ctx: one answer for all of them
        raise ConfigError(f"task.prompts={str(path)!r} is not a learned-prompts file ({type(err).__name__}); give "
                          f"the {PROMPTS_FILE} written by task=prompt_learning") from err
    learner = PromptLearner(bundle.model, bundle.tokenizer, bundle.context_length,
                            **{key: meta[key] for key in LEARNER_KEYS})
    if learner.ctx.shape != ctx.shape:
        raise ConfigError(f"task.prompts={str(path)!r} holds ctx {tuple(ctx.shape)} but model {bundle.name} needs "
                          f"{tuple(learner.ctx.shape)}; evaluate with the model the prompts were learned on "
                          f"({meta['model']})")
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    return learner, meta


def evaluate_prompts(model, learner: PromptLearner, features: torch.Tensor, labels: torch.Tensor,
                     batch_size: int, class_index: torch.Tensor | None = None) -> dict:
    """Top-1, per-class accuracy and mean class-name score (target logit(b, y_b)) of cached image features.

    class_index (C,) picks the learned classes that compete, in label order (ImageNet-A/R: 200 of ImageNet's 1000);
    None: all of them. Returns acc1, mean_per_class_acc, class_name_score (floats), per_class_acc and
    per_class_count (lists of C).
    """
    prompts, token_ids, class_mask = learner().detach(), learner.token_ids, learner.class_mask
    if class_index is not None:
        prompts, token_ids, class_mask = prompts[class_index], token_ids[class_index], class_mask[class_index]
    with torch.no_grad():
        predictions = class_logits(model, prompts, token_ids, features).argmax(dim=-1)
    scores = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        # Only the label prompts matter for the label score: pass them as the "classes" of this chunk (B text
        # encodes instead of C); target b is then logit(b, b) = logit(b, y_b).
        result = class_name_scores(model, features[start : start + batch_size], prompts[chunk],
                                   token_ids[chunk], class_mask[chunk],
                                   labels=torch.arange(len(chunk), device=chunk.device))
        scores.append(result.scores.detach())
    n_classes = prompts.shape[0]
    hits = (predictions == labels).float()
    count = torch.bincount(labels, minlength=n_classes)
    per_class = torch.bincount(labels, weights=hits, minlength=n_classes) / count.clamp(min=1)
    present = count > 0
    return {
        "acc1": hits.mean().item(),
        "mean_per_class_acc": per_class[present].mean().item(),
        "class_name_score": torch.cat(scores).mean().item(),
        "per_class_acc": per_class.tolist(),
        "per_class_count": count.tolist(),
    }


def record_evaluation(recorder, result: dict, classnames: list[str], split: str) -> dict:
    """Summary values `<split>/acc1`, `<split>/mean_per_class_acc`, `<split>/class_name_score` and a per-class table."""
    # A class without images in this split has no accuracy: its cell stays empty, never 0.
    rows = [[name, n, round(acc, 4) if n else None] for name, n, acc in
            zip(classnames, result["per_class_count"], result["per_class_acc"])]
    recorder.table(f"{split}_per_class", ["class", "n_images", "acc1"], rows)
    metrics = {f"{split}/{key}": result[key] for key in ("acc1", "mean_per_class_acc", "class_name_score")}
    recorder.summary(metrics)
    return metrics


def split_features(cfg: DictConfig, bundle, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen image features (N, E) fp32 and labels (N,) of every item of `dataset`, each image encoded once."""
    loader = DataLoader(dataset, batch_size=cfg.task.encode_batch_size, num_workers=cfg.task.num_workers)
    return encode_images(bundle.model, loader, bundle.device, bundle.dtype, cfg.progress)


# The model config that decides the weights: learned context vectors only mean something in their model's
# embedding space (device, cache and precision may differ).
WEIGHT_KEYS = ("name", "pretrained", "checkpoint", "random_init")


def check_same_weights(cfg: DictConfig, meta: dict) -> None:
    """Refuse prompts learned on other weights than cfg.model's (the prompts file's meta holds its run's config)."""
    trained = meta.get("config", {}).get("model", {})
    for key in WEIGHT_KEYS:
        if key in trained and trained[key] != cfg.model.get(key):
            raise ConfigError(f"task.prompts={cfg.task.prompts!r} was learned with model.{key}={trained[key]!r}, this "
                              f"run has model.{key}={cfg.model.get(key)!r}; evaluate with the model the prompts were "
                              "learned on")


def run(cfg: DictConfig, ctx: RunContext) -> dict:
    task = cfg.task
    bundle = instantiate(cfg.model)
    bundle.model.requires_grad_(False)
    learner, meta = load_prompts(task.prompts, bundle)
    check_same_weights(cfg, meta)
    dataset = build_dataset(split=task.split, preprocess=bundle.preprocess, **cfg.dataset)
    classnames = [name.replace("_", " ") for name in dataset.classnames]
    unknown = [name for name in classnames if name not in learner.classnames]
    if unknown:
        raise ConfigError(f"dataset {cfg.dataset.name!r} has {len(unknown)} classes that task.prompts={task.prompts!r} "
                          f"(learned on {meta['dataset']!r}) has no prompt for, e.g. {unknown[0]!r}; evaluate on that "
                          "dataset or on one whose classes are among its classes (ImageNet -> ImageNet-V2/Sketch/A/R)")
    class_index = torch.tensor([learner.classnames.index(name) for name in classnames], device=bundle.device)
    features, labels = split_features(cfg, bundle, dataset)
    with open_recorder(cfg, ctx, job_type="evaluate") as recorder:
        result = evaluate_prompts(bundle.model, learner, features, labels, task.encode_batch_size, class_index)
        metrics = record_evaluation(recorder, result, classnames, task.split)
        metrics = {**metrics, "prompts": str(task.prompts), "learned_on": meta["dataset"], "model": meta["model"]}
        recorder.summary(metrics)
    return metrics
