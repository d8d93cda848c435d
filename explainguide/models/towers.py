"""Tower forwards the stock open_clip API lacks: the text tower from token embeddings (learned prompts)."""

from __future__ import annotations

import torch
from torch import nn


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/positional_embedding/transformer/ln_final (CLIP or CustomTextCLIP)."""
    return model.text if hasattr(model, "text") else model


def token_embeddings(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, L, width) input embeddings, before positional embedding."""
    tower = text_tower(model)
    return tower.token_embedding(token_ids)


def used_length(token_ids: torch.Tensor) -> int:
    """Positions up to the batch's last EOT (argmax of the ids (B, L)); with a causal mask the rest are inert."""
    return int(token_ids.argmax(dim=-1).max()) + 1


def kept_length(token_ids: torch.Tensor, trim_padding: bool) -> int:
    """How many positions the text encoder runs: up to the last EOT when trimming, else all L of (B, L)."""
    return used_length(token_ids) if trim_padding else token_ids.shape[1]


def encode_text_embeddings(
    model: nn.Module, embeddings: torch.Tensor, token_ids: torch.Tensor, trim_padding: bool = True
) -> torch.Tensor:
    """Text features (B, E) from input embeddings (B, L, width); `token_ids` (B, L) only locate the EOT (argmax).

    Same computation as open_clip's `encode_text` (argmax pooling), so `encode_text_embeddings(m,
    token_embeddings(m, t), t) == m.encode_text(t)` up to float rounding. Under the causal mask no position
    attends to a later one, so the padding after the batch's last EOT cannot change the EOT features: with
    `trim_padding` it is cut off (77 -> ~20 tokens for short prompts; attention captured inside is then
    (B, H, N, N) with N = `used_length(token_ids)`). That is exact in exact arithmetic; in fp32 it changes the
    rounding, so `trim_padding=False` is the reference's own computation (all L positions).
    """
    tower = text_tower(model)
    cast = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else embeddings.dtype
    mask = tower.attn_mask
    tokens = kept_length(token_ids, trim_padding) if mask is not None else embeddings.shape[1]
    x = embeddings[:, :tokens].to(cast) + tower.positional_embedding[:tokens].to(cast)
    x = tower.transformer(x, attn_mask=None if mask is None else mask[:tokens, :tokens])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
