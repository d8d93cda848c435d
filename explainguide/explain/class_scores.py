"""CoOp class-name explainability scores for a batch of images against learned class prompts.

Each image is encoded once and each class prompt once. The all-pairs score needs one backward pass per image
(each gives that image's gradient for every class prompt); with only the label scores asked for, one plain
backward over the label prompts suffices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from explainguide.explain.capture import capture_attention, text_blocks
from explainguide.explain.relevance import attention_gradients, propagate_relevance_row
from explainguide.explain.scores import coop_class_scores
from explainguide.models.towers import encode_text_embeddings


@dataclass
class ClassScores:
    """logits (B, C) = logit_scale·cos; scores (B, C) for all pairs, or (B,) for the labels only."""

    logits: torch.Tensor
    scores: torch.Tensor


def _encode_prompts(model, prompts, token_ids, capture: bool, trim_padding: bool):
    with capture_attention(text_blocks(model) if capture else []) as probs:
        features = encode_text_embeddings(model, prompts, token_ids, trim_padding)
    return F.normalize(features, dim=-1), probs


def _fit(class_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """class_mask (..., L) cut to the relevance rows' length N <= L: the encoder ran up to the last EOT of the
    prompts it was given (the label prompts alone may stop earlier than all prompts); class tokens precede it."""
    return class_mask[..., : rows.shape[-1]]


def class_name_scores(
    model: nn.Module,
    image_features: torch.Tensor,
    prompts: torch.Tensor,
    token_ids: torch.Tensor,
    class_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    first_block: int = 0,
    trim_padding: bool = True,
) -> ClassScores:
    """First-order class-name scores (method.md, CoOp row).

    image_features (B, E) unnormalised; prompts (C, L, width); token_ids, class_mask (C, L).
    labels None -> scores[b, c] for target logit(b, c), all pairs; labels (B,) -> scores[b] for logit(b, y_b).
    trim_padding: run the text encoder only up to the last EOT (exact, ~4x faster for short prompts); False runs
    all L positions, as the reference does (its fp32 rounding, for the golden checks).
    """
    image_features = F.normalize(image_features, dim=-1)
    scale = model.logit_scale.exp()
    eot = token_ids.argmax(dim=-1)
    if labels is None:
        text_features, probs = _encode_prompts(model, prompts, token_ids, True, trim_padding)
        logits = scale * image_features @ text_features.T
        probs = probs[first_block:]
        # One backward per image: grads[c] = d logit(b, c) / dA_c for all classes at once, since each class's
        # prompt has its own attention maps. (A vmapped backward, is_grads_batched, was 2x slower on CPU.)
        rows = torch.stack([
            propagate_relevance_row(probs, attention_gradients(image_logits.sum(), probs, order="first"), eot)
            for image_logits in logits
        ])  # (B, C, L)
        batch = logits.shape[0]
        scores = coop_class_scores(rows, eot.expand(batch, -1), _fit(class_mask, rows).expand(batch, -1, -1))
        return ClassScores(logits, scores)

    text_features, _ = _encode_prompts(model, prompts, token_ids, False, trim_padding)
    logits = scale * image_features @ text_features.T
    label_features, probs = _encode_prompts(model, prompts[labels], token_ids[labels], True, trim_padding)
    target = (scale * (image_features * label_features).sum(dim=-1)).sum()
    probs = probs[first_block:]
    grads = attention_gradients(target, probs, order="first")
    rows = propagate_relevance_row(probs, grads, eot[labels])
    return ClassScores(logits, coop_class_scores(rows, eot[labels], _fit(class_mask[labels], rows)))
