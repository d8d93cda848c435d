"""CoOp class-name explainability scores for a batch of images against learned class prompts.

Each image is encoded once and each class prompt once. The B per-image backward passes that the all-pairs
score needs run as one batched backward (`is_grads_batched`); with only the label scores asked for, one
plain backward over the label prompts suffices.
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


def _encode_prompts(model, prompts, token_ids, capture: bool):
    with capture_attention(text_blocks(model) if capture else []) as probs:
        features = encode_text_embeddings(model, prompts, token_ids)
    return F.normalize(features, dim=-1), probs


def class_name_scores(
    model: nn.Module,
    image_features: torch.Tensor,
    prompts: torch.Tensor,
    token_ids: torch.Tensor,
    class_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    first_block: int = 0,
) -> ClassScores:
    """First-order class-name scores (method.md, CoOp row).

    image_features (B, E) unnormalised; prompts (C, L, width); token_ids, class_mask (C, L).
    labels None -> scores[b, c] for target logit(b, c), all pairs; labels (B,) -> scores[b] for logit(b, y_b).
    """
    image_features = F.normalize(image_features, dim=-1)
    scale = model.logit_scale.exp()
    eot = token_ids.argmax(dim=-1)
    if labels is None:
        text_features, probs = _encode_prompts(model, prompts, token_ids, capture=True)
        logits = scale * image_features @ text_features.T
        probs = probs[first_block:]
        batch = logits.shape[0]
        # Row b of the batched grad_outputs selects image b: grads[b][c] = d logit(b, c) / dA_c.
        selector = torch.eye(batch, dtype=logits.dtype, device=logits.device)[:, :, None].expand(-1, -1, logits.shape[1])
        grads = torch.autograd.grad(logits, probs, grad_outputs=selector, retain_graph=True, is_grads_batched=True)
        rows = propagate_relevance_row(
            [p.unsqueeze(0) for p in probs], [g.detach() for g in grads], eot.expand(batch, -1)
        )  # (B, C, L)
        scores = coop_class_scores(rows, eot.expand(batch, -1), class_mask.expand(batch, -1, -1))
        return ClassScores(logits, scores)

    text_features, _ = _encode_prompts(model, prompts, token_ids, capture=False)
    logits = scale * image_features @ text_features.T
    label_features, probs = _encode_prompts(model, prompts[labels], token_ids[labels], capture=True)
    target = (scale * (image_features * label_features).sum(dim=-1)).sum()
    probs = probs[first_block:]
    grads = attention_gradients(target, probs, order="first")
    rows = propagate_relevance_row(probs, grads, eot[labels])
    return ClassScores(logits, coop_class_scores(rows, eot[labels], class_mask[labels]))
