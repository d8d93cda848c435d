"""Types and ranges of config values, as data: checked once before any model or data is touched.

Hydra passes `task.n_ctx=abc` or `loss.also_minimize=2` through unchanged; without these rules such values fail
deep inside torch with a message that names neither the key nor the fix. A rule applies when its key is in the
composed config (each task has its own keys); the tasks keep the checks that need a model or data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Rule:
    """A value of `kind` (int, float or bool) within [low, high] (`open_low`: > low); `nullable` admits null."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    nullable: bool = False

    def admits(self, value) -> bool:
        if value is None:
            return self.nullable
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.kind is bool:
            text = "true or false"
        else:
            text = {int: "an integer", float: "a finite number"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.open_low else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"<= {self.high:g}")
            text += (" " + " and ".join(bounds)) if bounds else ""
        return text + (" (or null)" if self.nullable else "")


WEIGHT = Rule(float, low=0)  # a loss weight: 0 turns its term off
POSITIVE = Rule(float, low=0, open_low=True)
LEARNING_RATE = Rule(float, low=0, high=1e6, open_low=True)  # above that, the first update overflows fp32
COUNT = Rule(int, low=1)
FLAG = Rule(bool)

RULES: dict[str, Rule] = {
    "seed": Rule(int, nullable=True),
    "progress": FLAG,
    # loss weights (all tasks)
    "loss.similarity": WEIGHT,
    "loss.explainability": WEIGHT,
    "loss.spatial": WEIGHT,
    "loss.l2": WEIGHT,
    "loss.also_minimize": FLAG,
    "loss.spatial_area_scaling": FLAG,
    # datasets
    "dataset.size": Rule(int, low=1, nullable=True),
    "dataset.limit": Rule(int, low=1, nullable=True),
    # prompt learning, evaluation, zero-shot
    "task.shots": Rule(int, low=1, nullable=True),
    "task.shot_seed": Rule(int, nullable=True),
    "task.n_ctx": Rule(int, low=1, nullable=True),
    "task.class_specific": FLAG,
    "task.epochs": Rule(int, low=0),
    "task.batch_size": COUNT,
    "task.optimizer.lr": LEARNING_RATE,
    "task.optimizer.momentum": Rule(float, low=0, high=1),
    "task.optimizer.weight_decay": WEIGHT,
    "task.lr_schedule.warmup_epochs": Rule(int, low=0),
    "task.lr_schedule.warmup_lr": POSITIVE,
    "task.amp": FLAG,
    "task.encode_batch_size": COUNT,
    "task.num_workers": Rule(int, low=0),
    "task.n_heatmaps": Rule(int, low=0),
    "task.max_images": Rule(int, low=1, nullable=True),
    # explain
    "task.text_first_block": Rule(int, low=0),
    "task.image_first_block": Rule(int, low=0),
    # generate, edit, spatial
    "task.steps": COUNT,
    "task.lr": LEARNING_RATE,
    "task.snapshot_every": Rule(int, low=0),
    "task.eval_views": COUNT,
    "task.neglect_threshold": Rule(float, low=0, high=1),
    "task.threshold": Rule(float, low=0, high=1),  # relevance is min-max scaled to [0, 1]
    "task.temperature": POSITIVE,
    "task.first_block": Rule(int),
    "task.cutouts.n": COUNT,
    "task.cutouts.min_scale": Rule(float, low=0, high=1, open_low=True),
}


_ABSENT = object()


def rule_violations(cfg: DictConfig, rules: dict[str, Rule] = RULES) -> list[str]:
    """One line per key of `rules` present in `cfg` whose value the rule does not admit: value and fix."""
    problems = []
    for key, rule in rules.items():
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if node is not _ABSENT and not rule.admits(node):
            problems.append(f"{key}={node!r}: give {rule.describe()}")
    return problems


# Tasks whose inputs follow the model's dtype; the others feed it fp32 features or images (prompt learning runs
# under autocast with a GradScaler on CUDA instead).
LOW_PRECISION_TASKS = ("explain",)


def precision_problem(cfg: DictConfig) -> str | None:
    """The line for a model.precision other than fp32 on a task that computes in fp32, else None."""
    precision = OmegaConf.select(cfg, "model.precision", default="fp32")
    task = OmegaConf.select(cfg, "task.name")
    if precision != "fp32" and task not in LOW_PRECISION_TASKS:
        return (f"model.precision={precision!r} works with task={'|'.join(LOW_PRECISION_TASKS)} only; task={task} "
                "computes in fp32 (prompt learning: task.amp=true on CUDA): use model.precision=fp32")
    return None
