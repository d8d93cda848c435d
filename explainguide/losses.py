"""Objectives composed from the score functions: similarity terms and the explainability terms per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def coop_explainability_term(scores: torch.Tensor, labels: torch.Tensor, also_minimize: bool) -> torch.Tensor:
    """−mean_b S[b, y_b] (+ mean over all B·C entries of S with each image's own label entry zeroed).

    scores (B, C) for all pairs, or (B,) label scores only (then also_minimize must be False).
    """
    if scores.dim() == 1:
        if also_minimize:
            raise ValueError("also_minimize needs the scores of every class; compute them with labels=None")
        return -scores.mean()
    own = F.one_hot(labels, scores.shape[1]).bool()
    term = -scores[own].mean()
    if also_minimize:
        term = term + scores.masked_fill(own, 0.0).mean()
    return term


def coop_objective(
    logits: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, lam: float, also_minimize: bool = True
) -> dict[str, torch.Tensor]:
    """CE(logits (B, C), labels) + λ·explainability term. Returns total, ce and expl (each a scalar)."""
    ce = F.cross_entropy(logits, labels)
    expl = coop_explainability_term(scores, labels, also_minimize)
    return {"total": ce + lam * expl, "ce": ce, "expl": expl}
