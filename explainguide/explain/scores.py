"""The named normalisations each task applies to relevance (method.md, "Task losses"). Pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12  # keeps divisions finite when a map is all zero; far below any real relevance value


def coop_class_scores(eot_row: torch.Tensor, eot_index: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """CoOp class-name score: r = EOT row with r[EOT] = 0, r /= sum(r) over all positions, max over class tokens.

    eot_row (..., L); eot_index (...,) long; class_mask (..., L) bool, True on the class-name tokens -> (...,).
    """
    eot_hot = F.one_hot(eot_index, eot_row.shape[-1]).bool()
    r = eot_row.masked_fill(eot_hot, 0.0)
    r = r / (r.sum(dim=-1, keepdim=True) + EPS)
    return r.masked_fill(~class_mask, float("-inf")).amax(dim=-1)


def word_token_relevance(eot_row: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """Generation word relevance: the EOT row over the word tokens 1..EOT-1, divided by its sum, then its max.

    eot_row (B, L); eot_index (B,) -> (B, L), zero outside 1..EOT-1. (The reference zeroes R's diagonal first;
    in the EOT row that only touches the EOT entry, which is excluded here anyway.)
    """
    positions = torch.arange(eot_row.shape[-1], device=eot_row.device)
    words = (positions >= 1) & (positions < eot_index[:, None])
    r = eot_row * words
    r = r / (r.sum(dim=-1, keepdim=True) + EPS)
    return r / (r.amax(dim=-1, keepdim=True) + EPS)


def word_scores(token_relevance: torch.Tensor, word_token_spans: list[list[int]]) -> torch.Tensor:
    """Per chosen word, the max over its token positions. token_relevance (B, L) -> (B, W)."""
    return torch.stack([token_relevance[:, span].amax(dim=-1) for span in word_token_spans], dim=-1)


def edit_score(eot_row: torch.Tensor, eot_index: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """Editing score: r = EOT row over 1..EOT-1 divided by its sum; sum(r * w) / #(w != 0).

    eot_row (B, L); eot_index (B,); token_weights (L,) or (B, L), already min-max scaled -> (B,).
    """
    positions = torch.arange(eot_row.shape[-1], device=eot_row.device)
    r = eot_row * ((positions >= 1) & (positions < eot_index[:, None]))
    r = r / (r.sum(dim=-1, keepdim=True) + EPS)
    chosen = (token_weights != 0).sum(dim=-1).clamp(min=1)
    return (r * token_weights).sum(dim=-1) / chosen


def spatial_relevance_map(cls_row: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Image relevance as a map: CLS row (B, 1 + g*g) without CLS -> (B, 1, g, g) -> bicubic to `size`,
    divided by its sum, then its max -> (B, 1, H, W)."""
    patches = cls_row[:, 1:]
    grid = int(round(patches.shape[-1] ** 0.5))
    relevance = patches.reshape(-1, 1, grid, grid)
    relevance = F.interpolate(relevance, size=size, mode="bicubic", align_corners=False)
    relevance = relevance / (relevance.sum(dim=(-2, -1), keepdim=True) + EPS)
    return relevance / (relevance.amax(dim=(-2, -1), keepdim=True) + EPS)


def soft_mask(relevance: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    """Soft binarisation sigmoid((x - threshold) * temperature), any shape."""
    return torch.sigmoid((relevance - threshold) * temperature)


def dice(soft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """2·Σ(b·m) / (2·Σ(b·m) + Σ(b·(1 − m))) per sample. soft, mask (B, 1, H, W) -> (B,)."""
    inside = (soft * mask).sum(dim=(1, 2, 3))
    outside = (soft * (1 - mask)).sum(dim=(1, 2, 3))
    return 2 * inside / (2 * inside + outside + EPS)
