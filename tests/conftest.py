"""Shared fixtures: the golden folder, the golden model, a composed Hydra config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def golden_dir() -> Path:
    return Path(os.environ.get("EXPLAINGUIDE_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden():
    """(model bundle, reference tensors, reference json) from EXPLAINGUIDE_GOLDEN_DIR."""
    from safetensors.torch import load_file

    from explainguide.models import load_clip

    folder = golden_dir()
    if not (folder / "reference_outputs.safetensors").is_file():
        pytest.fail(f"golden fixtures not found in {folder}; set EXPLAINGUIDE_GOLDEN_DIR")
    bundle = load_clip(None, checkpoint=str(folder / "tiny_vit_clip_openai_format.safetensors"), device="cpu")
    for parameter in bundle.model.parameters():
        parameter.requires_grad_(False)
    reference = load_file(str(folder / "reference_outputs.safetensors"))
    meta = json.loads((folder / "reference_outputs.json").read_text())
    return bundle, reference, meta
