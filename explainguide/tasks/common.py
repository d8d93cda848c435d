"""Helpers the tasks share: the recorder from config, the prompt list from config, frozen image features."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from explainguide.runtime import ConfigError, RunContext
from explainguide.tracking import RunRecorder


def open_recorder(cfg: DictConfig, ctx: RunContext, job_type: str) -> RunRecorder:
    wandb_cfg = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None
    return RunRecorder(
        ctx.output_dir,
        OmegaConf.to_container(cfg, resolve=True),
        wandb_cfg=wandb_cfg or None,
        group=ctx.group,
        name=ctx.name,
        tags=ctx.tags,
        job_type=job_type,
    )


def prompts_from_config(text, prompts_file: str | None) -> list[str]:
    """task.text (a string or a list) plus one prompt per non-empty line of task.prompts_file (UTF-8)."""
    prompts = [text] if isinstance(text, str) else list(text or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise ConfigError(f"task.prompts_file={prompts_file!r} does not exist; give a UTF-8 file, one prompt a line")
        try:
            text_lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ConfigError(f"task.prompts_file={prompts_file!r} is not UTF-8 text ({err.reason} at byte "
                              f"{err.start}); save it as UTF-8, one prompt a line") from None
        lines = [line.rstrip("\r\n") for line in text_lines if line.strip()]
        if not lines:
            raise ConfigError(f"task.prompts_file={prompts_file!r} has no prompts (every line is empty); "
                              "write one prompt a line")
        prompts += lines
    if not prompts:
        raise ConfigError("no prompt given; set task.text='...' or task.prompts_file=<file>")
    for prompt in prompts:
        if not str(prompt).strip():
            raise ConfigError(f"empty prompt {prompt!r} in task.text/prompts_file; give non-empty text")
    return [str(p) for p in prompts]


@torch.no_grad()
def encode_images(model, loader, device, dtype, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features (N, E) in fp32 and labels (N,) of every (images, labels) batch of `loader`, on `device`."""
    features, labels = [], []
    for images, batch_labels in tqdm(loader, desc="encode images", disable=not progress):
        features.append(model.encode_image(images.to(device, dtype)).float())
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels).to(device)
