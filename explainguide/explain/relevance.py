"""Relevance propagation for transformer attention (Chefer et al. 2021, "Generic Attention-model Explainability").

Pure tensor math: no model, no I/O. R starts as the identity; every block from `first_block` on adds
cam_b @ R with cam_b = mean_heads(clamp(dS/dA_b * A_b, min=0)).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

Order = Literal["first", "second"]
ORDERS = ("first", "second")


def check_first_block(first_block: int, depth: int, tower: str) -> None:
    """Reject a `first_block` outside 0..depth-1 with one line naming the value and the fix."""
    if not 0 <= first_block < depth:
        raise ValueError(
            f"first_block={first_block} is outside the {tower} tower's {depth} blocks; use 0..{depth - 1}"
        )


def attention_gradients(
    target: torch.Tensor, attn_probs: Sequence[torch.Tensor], order: Order = "first"
) -> list[torch.Tensor]:
    """dS/dA for each block's probabilities A (B, H, N, N), S a scalar.

    "first": the gradients are constants (detached); a loss built on R still back-propagates through A.
    "second": create_graph=True, so the gradients themselves are differentiated (generation, spatial).
    """
    if order not in ORDERS:
        raise ValueError(f"relevance order={order!r}; use one of {ORDERS}")
    grads = torch.autograd.grad(target, list(attn_probs), create_graph=order == "second", retain_graph=True)
    return list(grads)


def propagate_relevance(attn_probs: Sequence[torch.Tensor], attn_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """R (B, N, N) from per-block attention probabilities and their gradients, each (B, H, N, N)."""
    first = attn_probs[0]
    batch, _, tokens, _ = first.shape
    relevance = torch.eye(tokens, dtype=first.dtype, device=first.device).expand(batch, tokens, tokens)
    for probs, grad in zip(attn_probs, attn_grads):
        cam = (grad * probs).clamp(min=0).mean(dim=1)
        relevance = relevance + torch.bmm(cam, relevance)
    return relevance


def relevance_matrix(
    target: torch.Tensor, attn_probs: Sequence[torch.Tensor], first_block: int = 0, order: Order = "first"
) -> torch.Tensor:
    """R (B, N, N) for a scalar target S that sums independent per-sample scores (so grads stay per sample)."""
    check_first_block(first_block, len(attn_probs), "attention")
    used = list(attn_probs)[first_block:]
    return propagate_relevance(used, attention_gradients(target, used, order))


def eot_rows(relevance: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Text relevance per token: the EOT row of R (B, L, L) -> (B, L). EOT = argmax of the ids (B, L)."""
    eot = token_ids.argmax(dim=-1)
    return relevance[torch.arange(relevance.shape[0], device=relevance.device), eot]


def cls_rows(relevance: torch.Tensor) -> torch.Tensor:
    """Image relevance per token: the CLS row of R (B, 1 + P, 1 + P) -> (B, 1 + P), CLS first."""
    return relevance[:, 0]


def propagate_relevance_row(
    attn_probs: Sequence[torch.Tensor], attn_grads: Sequence[torch.Tensor], index: torch.Tensor
) -> torch.Tensor:
    """Row `index` of R without forming R: e_i^T (I + cam_K)...(I + cam_1), evaluated last block first.

    attn_probs (..., H, N, N) and attn_grads (..., H, N, N) share leading dims `...`; index (...) long -> (..., N).
    Vector-matrix products make this O(N^2) per block instead of O(N^3).
    """
    tokens = attn_probs[0].shape[-1]
    row = torch.nn.functional.one_hot(index, tokens).to(attn_probs[0].dtype)
    for probs, grad in zip(reversed(list(attn_probs)), reversed(list(attn_grads))):
        cam = (grad * probs).clamp(min=0).mean(dim=-3)
        row = row + (row.unsqueeze(-2) @ cam).squeeze(-2)
    return row
