"""task=prompt_learning: CoOp context learning with the explainability loss (method.md, CoOp row).

Loss = CE + λ·explainability term (first order; also-minimize switchable), λ = loss.explainability.

The image encoder is frozen and training images get no augmentation (they go through the model's eval
preprocess), so every training image is encoded once and its cached feature is exactly what encoding it at
every step would give. The same holds for the test split, which is scored each epoch (test/acc1) and fully at
the end (top-1, per-class accuracy, mean class-name score).

Precision: ctx and the optimiser state are fp32; on CUDA the step runs under autocast (fp16) with a GradScaler
when task.amp is true. A NaN or Inf loss term stops the run, naming the step and the term.

Output dir: shots.json (the K-shot indices), checkpoint.pt (every epoch), prompts.safetensors (the learned
prompts, re-loadable with task=evaluate), metrics.jsonl / metrics.json / summary.md and tables. A run whose
output dir holds a checkpoint continues from it (task.resume=true); a finished run is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from explainguide.data import build_dataset
from explainguide.data.few_shot import SHOTS_FILE, load_indices, sample_k_shot, save_indices
from explainguide.explain.class_scores import class_name_scores
from explainguide.losses import coop_objective
from explainguide.prompts import PromptLearner, class_logits, decode_prompts
from explainguide.runtime import ConfigError, NonFiniteLoss, RunContext
from explainguide.tasks.common import open_recorder
from explainguide.tasks.evaluate import PROMPTS_FILE, evaluate_prompts, record_evaluation, save_prompts, split_features

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
METRIC_NAMES = {"total": "train/loss", "ce": "train/ce", "expl": "train/expl"}
# Config that decides the trained numbers; a checkpoint only resumes a run that agrees on all of it.
_NOT_TRAINING_KEYS = {"model": ("device", "cache_dir"),
                      "task": ("name", "runner", "resume", "encode_batch_size", "num_workers")}
# task.epochs belongs to the fingerprint: the cosine schedule spans it, so a longer rerun of a finished run would
# train its last epochs on another schedule than a straight run of that length.


def warmup_cosine(epoch: int, base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """CoOp's schedule: warmup_lr for the first warmup_epochs, then base_lr·½(1 + cos(π·(epoch − warmup)/epochs))."""
    if epoch < warmup_epochs:
        return warmup_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    for key, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLoss(f"{METRIC_NAMES[key]} is {value.item()} at step {step}; the run stopped. Lower "
                                "task.optimizer.lr or loss.explainability, or check the data")


def training_objective(model, learner: PromptLearner, features, labels, lam: float,
                       also_minimize: bool) -> dict[str, torch.Tensor]:
    """Loss terms of one batch: total and ce, plus expl when λ > 0 (λ = 0 skips the relevance entirely)."""
    prompts = learner()
    if lam == 0:
        ce = torch.nn.functional.cross_entropy(class_logits(model, prompts, learner.token_ids, features), labels)
        return {"total": ce, "ce": ce}
    # Without also-minimize only the label scores enter the loss: one plain backward instead of B batched ones.
    result = class_name_scores(model, features, prompts, learner.token_ids, learner.class_mask,
                               labels=None if also_minimize else labels)
    return coop_objective(result.logits, result.scores, labels, lam, also_minimize)


def train_step(model, learner: PromptLearner, optimizer, scaler, autocast, features, labels, lam: float,
               also_minimize: bool, step: int) -> dict[str, float]:
    """One SGD step on ctx from cached image features; returns the loss terms as floats."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        terms = training_objective(model, learner, features, labels, lam, also_minimize)
    check_finite(terms, step)
    scaler.scale(terms["total"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return {key: value.item() for key, value in terms.items()}


def _fingerprint(cfg: DictConfig) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = {key: plain[key] for key in ("model", "dataset", "loss", "seed", "task")}
    for group, keys in _NOT_TRAINING_KEYS.items():
        fingerprint[group] = {k: v for k, v in fingerprint[group].items() if k not in keys}
    return fingerprint


def _checkpoint_path(resume, output_dir: Path) -> Path | None:
    """task.resume: true -> the output dir's checkpoint (if any); false -> none; a run dir or file -> that one."""
    if resume is False:
        return None
    if resume is True:
        path = output_dir / CHECKPOINT_FILE
        return path if path.is_file() else None
    path = Path(str(resume))
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"task.resume={str(resume)!r} has no {CHECKPOINT_FILE}; give a prompt_learning run dir, "
                          "true (continue in the output dir) or false")
    return path


def _first_difference(ours, theirs, name: str = ""):
    """(key, their value, our value) of the first differing leaf of two nested dicts, or None."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs)):
            found = _first_difference(ours.get(key), theirs.get(key), f"{name}.{key}" if name else key)
            if found:
                return found
        return None
    return None if ours == theirs else (name, theirs, ours)


def _load_checkpoint(path: Path, cfg: DictConfig) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    difference = _first_difference(_fingerprint(cfg), checkpoint["fingerprint"])
    if difference:
        key, theirs, ours = difference
        raise ConfigError(f"{path} was trained with {key}={theirs!r}, this run has {ours!r}; use that value, "
                          "task.resume=false to start over, or another output dir")
    return checkpoint


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a job killed while saving keeps the previous epoch's checkpoint


def _finished_metrics(output_dir: Path, checkpoint: dict | None, epochs: int) -> dict | None:
    """The metrics of a run that already completed all epochs in this output dir, else None."""
    metrics_path = output_dir / "metrics.json"
    if checkpoint is None or checkpoint["epoch"] < epochs or not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return metrics if metrics.get("status") == "ok" else None


def _shots_source(cfg: DictConfig, dataset) -> dict:
    """What a shots file must have been drawn from: the dataset (and its folder or hub id), split and sizes."""
    return {"dataset": cfg.dataset.name, "source": cfg.dataset.get("root") or cfg.dataset.get("hf_id"),
            "split": cfg.task.train_split, "n_images": len(dataset), "classes": list(dataset.classnames)}


def _sample_shots(cfg: DictConfig, dataset) -> tuple[list[int], dict]:
    """K-shot indices into the training split (all of it when task.shots is null), and their meta for shots.json.

    The indices depend only on the dataset, task.shots and task.shot_seed, so runs that differ in λ share them.
    A reused task.shots_file must come from the same training split (same source, size and classes).
    """
    task, source = cfg.task, _shots_source(cfg, dataset)
    if task.shots_file:
        shots = load_indices(task.shots_file)
        for key, value in source.items():
            theirs = shots.meta.get(key)
            if theirs is not None and theirs != value:
                shown = (f"{len(theirs)} classes", f"{len(value)} classes") if key == "classes" else (theirs, value)
                raise ConfigError(f"task.shots_file={task.shots_file!r} was drawn from {key}={shown[0]!r}, this run "
                                  f"has {key}={shown[1]!r}; give the shots.json of a run on this training split")
        if shots.meta.get("k", task.shots) != task.shots:  # metrics and tables record task.shots
            raise ConfigError(f"task.shots_file={task.shots_file!r} holds {shots.meta['k']} shots per class, this "
                              f"run has task.shots={task.shots}; set task.shots={shots.meta['k']} to match it")
        bad = [index for index in shots.indices if not 0 <= index < len(dataset)]
        if bad:
            raise ConfigError(f"task.shots_file={task.shots_file!r} holds index {bad[0]}, outside the {len(dataset)} "
                              f"images of split {task.train_split!r}; give the shots.json of a run on this split")
        return shots.indices, {**shots.meta, "reused_from": str(task.shots_file)}
    meta = {**source, "k": task.shots, "seed": task.shot_seed}
    if task.shots is None:
        return list(range(len(dataset))), meta
    return sample_k_shot(dataset.labels, task.shots, task.shot_seed, classnames=dataset.classnames), meta


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch (seeded by seed and epoch, so a resumed run sees the same ones).

    As in CoOp (Dassl), the last incomplete batch is dropped when there is at least one full batch.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    n_batches = max(n // batch_size, 1)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


def table_row(config: dict) -> tuple[str, str]:
    """(dataset, model) of a job's resolved config: a row of the sweep tables."""
    model, dataset = config["model"], config["dataset"]
    weights = model.get("pretrained") or (Path(model["checkpoint"]).name if model.get("checkpoint") else "random-init")
    # Local folders are told apart by their name (image_folder:pets), so two of them can share a table.
    name = f"{dataset['name']}:{Path(dataset['root']).name}" if dataset.get("root") else dataset["name"]
    return dataset.get("benchmark") or dataset.get("hf_id") or name, f"{model.get('name') or 'checkpoint'}/{weights}"


def run_identity(config: dict) -> dict:
    """What a sweep job varies, read from its resolved config (a Hydra job's or a W&B run's): the table keys."""
    dataset, model = table_row(config)
    return {"dataset": dataset, "model": model,
            "lambda": float(config["loss"]["explainability"]), "also_minimize": bool(config["loss"]["also_minimize"]),
            "seed": config["seed"], "shots": config["task"].get("shots")}


def _train_epoch(model, learner, optimizer, scaler, autocast, features, labels, lam: float, also_minimize: bool,
                 state: dict, batch_size: int) -> dict[str, float]:
    """One epoch over the cached features; the mean of each loss term under its metric name."""
    sums: dict[str, float] = {}
    batches = _batches(len(labels), batch_size, state["shuffle_seed"], state["epoch"])
    for batch in batches:
        state["step"] += 1
        terms = train_step(model, learner, optimizer, scaler, autocast, features[batch], labels[batch], lam,
                           also_minimize, state["step"])
        sums = {key: sums.get(key, 0.0) + value for key, value in terms.items()}
    return {METRIC_NAMES[key]: value / len(batches) for key, value in sums.items()}


@torch.no_grad()
def _accuracy(model, learner: PromptLearner, features: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = class_logits(model, learner(), learner.token_ids, features).argmax(dim=-1)
    return (predictions == labels).float().mean().item()


def run(cfg: DictConfig, ctx: RunContext) -> dict:
    task, output_dir = cfg.task, Path(ctx.output_dir)
    checkpoint_path = _checkpoint_path(task.resume, output_dir)
    checkpoint = _load_checkpoint(checkpoint_path, cfg) if checkpoint_path else None
    finished = _finished_metrics(output_dir, checkpoint, task.epochs)
    if finished is not None:
        log.info("%s already finished %d epochs; skipped (task.resume=false reruns it)", output_dir, task.epochs)
        return finished

    if task.epochs == 0:
        log.warning("task.epochs=0: no training; the initial prompts (task.ctx_init or random) are evaluated and saved")
    bundle = instantiate(cfg.model)
    model = bundle.model.requires_grad_(False)
    train_set = build_dataset(split=task.train_split, preprocess=bundle.preprocess, **cfg.dataset)
    test_set = build_dataset(split=task.test_split, preprocess=bundle.preprocess, **cfg.dataset)
    try:  # before any image is encoded, so a bad n_ctx / ctx_init / position fails in seconds
        learner = PromptLearner(model, bundle.tokenizer, bundle.context_length, train_set.classnames,
                                n_ctx=task.n_ctx, ctx_init=task.ctx_init,
                                class_token_position=task.class_token_position, class_specific=task.class_specific)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    shots, shots_meta = _sample_shots(cfg, train_set)
    shots = checkpoint["shots"] if checkpoint else shots
    save_indices(output_dir / SHOTS_FILE, shots, shots_meta)
    train_features, train_labels = split_features(cfg, bundle, train_set.subset(shots))
    test_features, test_labels = split_features(cfg, bundle, test_set)

    optimizer = instantiate(task.optimizer)(params=[learner.ctx])
    schedule = instantiate(task.lr_schedule)
    amp = bool(task.amp) and bundle.device.type == "cuda"
    scaler = torch.amp.GradScaler(bundle.device.type, enabled=amp)
    autocast = torch.autocast(device_type=bundle.device.type, dtype=torch.float16, enabled=amp)
    base_lr = optimizer.param_groups[0]["lr"]
    state = {"epoch": 0, "step": 0, "history": [], "shots": shots, "fingerprint": _fingerprint(cfg),
             "shuffle_seed": cfg.seed if cfg.seed is not None else random.randrange(2**31)}
    if checkpoint:
        with torch.no_grad():
            learner.ctx.copy_(checkpoint["ctx"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when the checkpoint was written without AMP
            scaler.load_state_dict(checkpoint["scaler"])
        state.update({key: checkpoint[key] for key in ("epoch", "step", "history", "shuffle_seed")})
        log.info("resuming from %s at epoch %d", checkpoint_path, state["epoch"])
    facts = {**run_identity(OmegaConf.to_container(cfg, resolve=True)), "epochs": task.epochs,
             "n_train_images": len(train_labels)}

    with open_recorder(cfg, ctx, job_type="prompt_learning") as recorder:
        recorder.summary(facts)
        for row in state["history"]:  # the recorder starts a fresh metrics.jsonl; keep the earlier epochs in it
            recorder.log(row, step=row["epoch"])
        for epoch in tqdm(range(state["epoch"], task.epochs), desc="epochs", disable=not cfg.progress):
            lr = schedule(epoch, base_lr, task.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = _train_epoch(model, learner, optimizer, scaler, autocast, train_features, train_labels,
                                  facts["lambda"], facts["also_minimize"], state, task.batch_size)
            row = {"epoch": epoch + 1, "train/lr": lr, **losses,
                   f"{task.test_split}/acc1": _accuracy(model, learner, test_features, test_labels)}
            recorder.log(row, step=epoch + 1)
            log.info("epoch %d/%d %s", epoch + 1, task.epochs,
                     " ".join(f"{key}={value:.4g}" for key, value in row.items() if key != "epoch"))
            state.update({"epoch": epoch + 1, "history": state["history"] + [row], "ctx": learner.ctx.detach().cpu(),
                          "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
            _save_checkpoint(output_dir / CHECKPOINT_FILE, state)

        result = evaluate_prompts(model, learner, test_features, test_labels, task.encode_batch_size)
        metrics = record_evaluation(recorder, result, learner.classnames, task.test_split)
        nearest = decode_prompts(learner, model)
        # Token by token, as CoOp's interpret_prompt: a context token's nearest word is no word piece of the next.
        words = [" ".join(bundle.tokenizer.decode([token]).strip() for token in ids[1 : int(ids.argmax())].tolist())
                 for ids in nearest]
        recorder.table("learned_prompts", ["class", "nearest_words"], list(zip(learner.classnames, words)))
        save_prompts(output_dir / PROMPTS_FILE, learner, task.ctx_init, {**facts, "config": _fingerprint(cfg)})
        last = state["history"][-1] if state["history"] else {}
        metrics = {**facts, **metrics, **{key: last[key] for key in METRIC_NAMES.values() if key in last}}
        recorder.summary(metrics)
    return metrics
