"""Relevance for image-text pairs on an open_clip model: forward with capture, target, relevance rows.

This module joins the model (capture) to the math (relevance); it reads no files and no config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from explainguide.explain.capture import capture_attention, image_blocks, text_blocks
from explainguide.explain.relevance import Order, check_first_block, cls_rows, eot_rows, relevance_matrix
from explainguide.models.towers import encode_text_embeddings, token_embeddings


def _cosine(image_features: torch.Tensor, text_features: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return F.cosine_similarity(image_features, text_features, dim=-1)


def _scaled(image_features: torch.Tensor, text_features: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return model.logit_scale.exp() * _cosine(image_features, text_features, model)


# Which scalar a relevance map explains: the reference uses logit_scale*cos for CoOp, cos for generation/spatial.
TARGETS: dict[str, Callable] = {"scaled": _scaled, "cosine": _cosine}


@dataclass
class PairRelevance:
    """Per pair i: similarity (B,), text EOT row (B, L) and image CLS row (B, 1+P). Absent towers are None."""

    similarity: torch.Tensor
    text_row: torch.Tensor | None = None
    image_row: torch.Tensor | None = None


def explain_pairs(
    model: nn.Module,
    images: torch.Tensor,
    token_ids: torch.Tensor,
    target: str = "scaled",
    order: Order = "first",
    text: bool = True,
    image: bool = True,
    text_first_block: int = 0,
    image_first_block: int = 0,
    text_embeddings: torch.Tensor | None = None,
) -> PairRelevance:
    """Relevance of each pair (images[i], token_ids[i]) for target s_i = TARGETS[target](img_i, txt_i).

    images (B or 1, 3, S, S); token_ids (B, L); text_embeddings (B, L, width) replaces the token embedding
    (learned prompts). One image against many prompts: pass a single image; it is encoded once unless its
    relevance is asked for, which needs one copy per prompt.
    """
    if target not in TARGETS:
        raise ValueError(f"relevance target={target!r}; use one of {sorted(TARGETS)}")
    batch = token_ids.shape[0]
    if image and images.shape[0] != batch:
        images = images.expand(batch, *images.shape[1:])

    t_blocks = text_blocks(model) if text else []
    i_blocks = image_blocks(model) if image else []
    if text:
        check_first_block(text_first_block, len(t_blocks), "text")
    if image:
        check_first_block(image_first_block, len(i_blocks), "image")

    with capture_attention(t_blocks) as text_probs, capture_attention(i_blocks) as image_probs:
        image_features = model.encode_image(images)
        embeddings = text_embeddings if text_embeddings is not None else token_embeddings(model, token_ids)
        text_features = encode_text_embeddings(model, embeddings, token_ids)
    similarity = TARGETS[target](image_features, text_features, model)
    score = similarity.sum()  # pairs are independent, so d(sum)/dA_i = ds_i/dA_i

    result = PairRelevance(similarity=similarity)
    if text:
        # The encoder stops at the last EOT (N <= L tokens); positions after it have zero relevance in the EOT row.
        row = eot_rows(relevance_matrix(score, text_probs, text_first_block, order), token_ids[:, : text_probs[0].shape[-1]])
        result.text_row = F.pad(row, (0, token_ids.shape[1] - row.shape[1]))
    if image:
        result.image_row = cls_rows(relevance_matrix(score, image_probs, image_first_block, order))
    return result
