"""Capture per-head post-softmax attention probabilities, with autograd, on a stock open_clip model.

This is the only place that patches the model. Inside `capture_attention(...)` each residual block's
`attention` method is shadowed by an explicit softmax attention that records its probabilities; on exit the
instance attribute is deleted and the fast fused path is back.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class RelevanceNotSupported(RuntimeError):
    """The requested tower has no token attention to explain (e.g. a ResNet image tower)."""


def text_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual attention blocks of the text transformer (CLIP or CustomTextCLIP layout)."""
    transformer = model.text.transformer if hasattr(model, "text") else model.transformer
    return list(transformer.resblocks)


def image_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual attention blocks of a ViT image tower; other towers raise `RelevanceNotSupported`."""
    transformer = getattr(model.visual, "transformer", None)
    if transformer is None:
        raise RelevanceNotSupported(
            f"image relevance is not supported for a {type(model.visual).__name__} image tower (it has no token "
            "attention); use a ViT model, or ask for text relevance only"
        )
    return list(transformer.resblocks)


def _attention_with_probs(block: nn.Module, store: list, q_x, k_x=None, v_x=None, attn_mask=None):
    """Explicit multi-head self-attention equal to `block.attn`, appending probs (B, heads, N, N) to `store`."""
    mha: nn.MultiheadAttention = block.attn
    if k_x is not None or v_x is not None:
        raise RelevanceNotSupported("attention capture handles self-attention blocks only")
    x = q_x if mha.batch_first else q_x.transpose(0, 1)  # (B, N, D)
    batch, tokens, width = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
    scores = (q * (width // heads) ** -0.5) @ k.transpose(-1, -2)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    if torch.is_grad_enabled() and not probs.requires_grad:
        # Frozen weights and inputs: make A a leaf so dS/dA exists (it equals the gradient A would get anyway).
        probs = probs.detach().requires_grad_(True)
    store.append(probs)
    out = mha.out_proj((probs @ v).transpose(1, 2).reshape(batch, tokens, width))
    return out if mha.batch_first else out.transpose(0, 1)


@contextlib.contextmanager
def capture_attention(blocks: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Record each block's attention probabilities during forward passes made inside the context.

    Yields a list that fills with one (B, heads, N, N) tensor per block per forward, in block order.
    """
    for block in blocks:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise RelevanceNotSupported(
                f"attention capture needs nn.MultiheadAttention blocks, got {type(block).__name__}"
            )
    store: list[torch.Tensor] = []
    for block in blocks:
        block.attention = functools.partial(_attention_with_probs, block, store)
    try:
        yield store
    finally:
        for block in blocks:
            del block.attention
