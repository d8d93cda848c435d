"""The math CLIP guidance shares across generate, edit and spatial (method.md, "Task losses"). Pure tensor functions.

Similarity losses work on cosine similarities, so a task may take them from a plain forward or from the
relevance forward (`explain_pairs(...).similarity`) without encoding twice. The explainability terms compose the
normalisations of `explain/scores.py` and are *losses* (lower is better: the negated score). Boxes and masks are
checked here once, with one-line errors naming the value and the fix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from numbers import Integral

import torch
import torch.nn.functional as F

from explainguide.explain.scores import (
    EPS,
    dice,
    edit_score,
    soft_mask,
    spatial_relevance_map,
    word_scores,
    word_token_relevance,
)
from explainguide.runtime import ConfigError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Similarity losses: cosine (...) -> loss (...)


def spherical_distance(cosine: torch.Tensor) -> torch.Tensor:
    """VQGAN+CLIP's squared great-circle distance between unit vectors, from their cosine: 2·arcsin(‖a − b‖/2)²
    with ‖a − b‖ = √(2 − 2cos). Any shape -> same shape; finite (and with a finite gradient) at cos = 1."""
    half_chord = ((1 - cosine) / 2).clamp(min=EPS).sqrt()
    return 2 * half_chord.clamp(max=1).arcsin().pow(2)


SIMILARITY_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "negative_cosine": lambda cosine: -cosine,  # FuseDream generation
    "one_minus_cosine": lambda cosine: 1 - cosine,  # StyleCLIP editing
    "spherical": spherical_distance,  # VQGAN+CLIP spatial conditioning
}


def similarity_loss(name: str, cosine: torch.Tensor) -> torch.Tensor:
    """Mean of SIMILARITY_LOSSES[name] over cosine (...,) -> scalar."""
    if name not in SIMILARITY_LOSSES:
        raise ConfigError(f"similarity loss {name!r} is unknown; use one of {sorted(SIMILARITY_LOSSES)}")
    return SIMILARITY_LOSSES[name](cosine).mean()


def augclip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """AugCLIP-style quality: mean cosine between V augmented views (V, E) and one text (E,) or (1, E) -> scalar."""
    return F.cosine_similarity(image_features, text_features.reshape(1, -1), dim=-1).mean()


# ---------------------------------------------------------------------------------------------------------
# Explainability terms (losses: the negated scores)


def generation_word_scores(
    text_row: torch.Tensor, eot_index: torch.Tensor, word_token_spans: list[list[int]]
) -> torch.Tensor:
    """Per chosen word, the generation score: EOT row (B, L), EOT positions (B,), token spans of W words -> (B, W)."""
    return word_scores(word_token_relevance(text_row, eot_index), word_token_spans)


def generation_term(text_row: torch.Tensor, eot_index: torch.Tensor, word_token_spans: list[list[int]]) -> torch.Tensor:
    """FuseDream's explainability loss: −(mean over the B views and W chosen words of the word score) -> scalar."""
    return -generation_word_scores(text_row, eot_index, word_token_spans).mean()


def edit_term(text_row: torch.Tensor, eot_index: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """StyleCLIP's explainability loss: −mean_B edit_score. text_row (B, L), eot_index (B,), weights (L,) -> ()."""
    return -edit_score(text_row, eot_index, token_weights).mean()


def spatial_dice(cls_row: torch.Tensor, masks: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    """Dice of the soft-binarised image relevance with the mask: CLS row (B, 1 + g²), masks (B, 1, H, W) -> (B,).

    The relevance map is bicubically resized to the masks' size, divided by its sum and its max, then
    sigmoid((x − threshold)·temperature). An all-zero relevance map gives a finite dice (no division by zero).
    """
    relevance = spatial_relevance_map(cls_row, tuple(masks.shape[-2:]))
    return dice(soft_mask(relevance, threshold, temperature), masks)


def fraction_inside(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of non-negative `weights` inside `mask`: Σ(w·m)/Σw over the last two axes. (..., H, W) -> (...).

    Used for "how much of a phrase's relevance lies in its box" and "how many target-colour pixels lie in it";
    0 when there is no weight at all.
    """
    return (weights * mask).sum(dim=(-2, -1)) / (weights.sum(dim=(-2, -1)) + EPS)


# ---------------------------------------------------------------------------------------------------------
# Boxes, masks and per-phrase weights


def check_box(box: Sequence, size: tuple[int, int], where: str) -> tuple[int, int, int, int]:
    """A (left, top, width, height) box in pixels of an image of `size` (H, W), clipped to the image.

    Raises ConfigError when it is not four integers, has a zero or negative width/height (a reversed box), or
    lies wholly outside; warns and clips when it lies partly outside. `where` names the config entry.
    """
    values = list(box) if isinstance(box, Sequence) and not isinstance(box, str) else []
    if len(values) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}={box!r} is not a box; give four integers [left, top, width, height] in pixels")
    left, top, width, height = (int(v) for v in values)
    if width <= 0 or height <= 0:
        raise ConfigError(
            f"{where}={values} has width {width} and height {height}; both must be > 0 "
            "(a box is [left, top, width, height], not two corners)"
        )
    image_h, image_w = size
    right, bottom = min(left + width, image_w), min(top + height, image_h)
    clipped_left, clipped_top = max(left, 0), max(top, 0)
    if right <= clipped_left or bottom <= clipped_top:
        raise ConfigError(
            f"{where}={values} lies wholly outside the {image_w}x{image_h} image; "
            f"give a box inside [0, {image_w}) x [0, {image_h})"
        )
    clipped = (clipped_left, clipped_top, right - clipped_left, bottom - clipped_top)
    if clipped != (left, top, width, height):
        log.warning("%s=%s reaches outside the %dx%d image; clipped to %s", where, values, image_w, image_h,
                    list(clipped))
    return clipped


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """A checked box as a float mask (H, W): 1 inside, 0 outside."""
    left, top, width, height = box
    mask = torch.zeros(size)
    mask[top : top + height, left : left + width] = 1
    return mask


def binarize_mask(gray: torch.Tensor, size: tuple[int, int], where: str) -> torch.Tensor:
    """A mask picture (h, w) in [0, 1] (white = inside) resized bilinearly to `size` and rounded -> (H, W) in {0, 1}.

    Warns when the picture has another size; raises ConfigError when nothing is left inside. `where` names the
    config entry.
    """
    if tuple(gray.shape) != tuple(size):
        log.warning("%s is %dx%d, the generated image %dx%d: resized to it (draw it at that size to keep "
                    "its edges)", where, gray.shape[1],
                    gray.shape[0], size[1], size[0])
    resized = F.interpolate(gray[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    mask = resized.round()
    if not mask.any():
        raise ConfigError(f"{where} has no white pixels at {size[1]}x{size[0]}; draw the region in white on black")
    return mask


def area_scaled_weight(lam: float, mask: torch.Tensor, scale_by_area: bool) -> float:
    """λ_i = λ/√(mask area fraction) when `scale_by_area`, else λ. mask (H, W) in {0, 1}, not empty."""
    if not scale_by_area:
        return float(lam)
    return float(lam) / math.sqrt(float(mask.float().mean()))
