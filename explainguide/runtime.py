"""What a task gets besides its config: where to write, where the user launched from, and who it is.

Built once by the Hydra app from HydraConfig, or directly by tests; core code never reads Hydra's singleton.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from explainguide.config_rules import precision_problem, rule_violations

log = logging.getLogger(__name__)

# Config keys that hold user paths; they are resolved against the launch directory, whatever hydra.job.chdir says.
USER_PATH_KEYS = (
    "model.checkpoint", "model.cache_dir", "dataset.root", "dataset.classnames_file", "task.image", "task.prompts_file",
    "task.prompts", "task.shots_file", "task.resume", "generator.checkpoint", "generator.config", "generator.weights",
)  # task.phrases[i].mask is resolved by task=spatial itself


@dataclass
class RunContext:
    output_dir: Path
    launch_dir: Path
    name: str = "run"
    group: str | None = None
    tags: list[str] = field(default_factory=list)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and the fix."""


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or Inf during training or guidance; the message names the step, the term and a fix."""


def resolve_user_paths(cfg: DictConfig, launch_dir: Path) -> None:
    """Make every user path in USER_PATH_KEYS absolute against `launch_dir` (in place)."""
    with open_dict(cfg):
        for key in USER_PATH_KEYS:
            value = OmegaConf.select(cfg, key, default=None)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                OmegaConf.update(cfg, key, str(launch_dir / value))
            elif isinstance(value, str) and value:
                OmegaConf.update(cfg, key, str(Path(value).expanduser()))


def validate(cfg: DictConfig) -> None:
    """Checks that need no model or data; one clear line per problem."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (no default); add "
                          + " ".join(f"{key}=<value>" for key in missing) + " (the config group's comments say what)")
    problems = rule_violations(cfg)
    if problem := precision_problem(cfg):
        problems.append(problem)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) > 1 else problems[0])


def seed_everything(seed: int | None) -> None:
    if seed is None:  # `if seed:` would skip seed 0
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
