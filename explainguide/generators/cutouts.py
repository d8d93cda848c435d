"""Differentiable cutouts for CLIP guidance: n independent random crops, each with its own affine and flip.

Every cutout draws its own crop box, rotation, translation, flip, colour jitter and noise level (the reference
returned inside its loop, so all its cutouts shared one augmentation). The image and its masks are stacked on the
channel axis and warped by one kornia `warp_affine` call per batch of cutouts, so each mask undergoes exactly its
cutout's geometric transform; colour jitter and noise touch the image channels only. All randomness comes from
`generator` when one is given, so a seeded run is reproducible.
"""

from __future__ import annotations

import math

import torch
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_saturation
from kornia.geometry.transform import warp_affine
from torch import Tensor

from explainguide.generators.base import MIN_SIDE


class CutoutError(ValueError):
    """Cutouts cannot be made from these inputs; the message names the value and the fix."""


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) samples of U(low, high) drawn on the generator's device, returned on `device`."""
    where = generator.device if generator is not None else device
    return (low + (high - low) * torch.rand(n, generator=generator, device=where)).to(device)


def crop_matrices(origin: Tensor, side: Tensor, cut_size: int) -> Tensor:
    """Pixel-space maps from the image to each cutout: the square crop at origin (n, 2) as (x, y) with side (n,)
    lands on [0, cut_size - 1]² (pixel centres, align_corners). -> (n, 3, 3)."""
    scale = (cut_size - 1) / (side - 1).clamp(min=1)
    matrices = torch.zeros(len(side), 3, 3, device=side.device)
    matrices[:, 0, 0] = matrices[:, 1, 1] = scale
    matrices[:, :2, 2] = -origin * scale[:, None]
    matrices[:, 2, 2] = 1
    return matrices


def augment_matrices(angle: Tensor, shift: Tensor, flip: Tensor, cut_size: int) -> Tensor:
    """Rotate by angle (n,) radians, mirror where flip (n,) is true, then shift (n, 2) px, all about the cutout's
    centre: (n, 3, 3) acting on cutout pixel coordinates."""
    centre = (cut_size - 1) / 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    mirror = 1 - 2 * flip.float()  # -1 flips x
    matrices = torch.zeros(len(angle), 3, 3, device=angle.device)
    matrices[:, 0, 0], matrices[:, 0, 1] = cos * mirror, -sin
    matrices[:, 1, 0], matrices[:, 1, 1] = sin * mirror, cos
    matrices[:, :2, 2] = centre + shift - matrices[:, :2, :2] @ torch.full((2,), centre, device=angle.device)
    matrices[:, 2, 2] = 1
    return matrices


def check_cutout_scale(size: tuple[int, int], min_scale: float) -> None:
    """The smallest cutout of an image of `size` (H, W), min_scale·min(H, W), keeps MIN_SIDE pixels a side."""
    if not 0 < min_scale <= 1:
        raise CutoutError(f"cutouts.min_scale={min_scale}: give a number in (0, 1]")
    if round(min_scale * min(size)) < MIN_SIDE:
        raise CutoutError(f"cutouts.min_scale={min_scale} gives cutouts of {round(min_scale * min(size))} px from a "
                          f"{size[0]}x{size[1]} image, below the minimum {MIN_SIDE} px; use min_scale >= "
                          f"{math.ceil(MIN_SIDE / min(size) * 100) / 100:g} or a larger generator.size")


def make_cutouts(
    image: Tensor,
    masks: Tensor | None,
    n: int,
    cut_size: int,
    generator: torch.Generator | None = None,
    *,
    min_scale: float = 0.5,
    cut_pow: float = 1.0,
    degrees: float = 15.0,
    translate: float = 0.1,
    flip: float = 0.5,
    jitter: float = 0.1,
    noise: float = 0.1,
) -> tuple[Tensor, Tensor | None]:
    """n independent augmented square cutouts of image (1, 3, H, W) in [0, 1] and of masks (1, K, H, W).

    Crop side: min_side + (max_side - min_side)·u^cut_pow, u ~ U(0, 1), max_side = min(H, W), min_side =
    min_scale·max_side; position uniform. Then per cutout: rotation ~ U(±degrees), shift ~ U(±translate·cut_size),
    horizontal flip with probability `flip` (border padding), and on the image only brightness, contrast and
    saturation jitter ~ U(±jitter) plus Gaussian noise of σ ~ U(0, noise) (not clamped afterwards).

    Returns cutouts (n, 3, cut_size, cut_size) and the masks' cutouts (n, K, cut_size, cut_size) or None.
    """
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise CutoutError(f"image has shape {tuple(image.shape)}; give one RGB image (1, 3, H, W)")
    height, width = image.shape[-2:]
    if min(height, width) < MIN_SIDE or cut_size < MIN_SIDE:
        raise CutoutError(
            f"image {height}x{width} px with cut_size={cut_size} is too small for cutouts; "
            f"both need at least {MIN_SIDE} px per side"
        )
    if masks is not None and (masks.ndim != 4 or masks.shape[0] != 1 or masks.shape[-2:] != image.shape[-2:]):
        raise CutoutError(f"masks have shape {tuple(masks.shape)}; give (1, K, {height}, {width}) to match the image")
    if n < 1:
        raise CutoutError(f"n={n}: need n >= 1 cutouts")
    check_cutout_scale((height, width), min_scale)

    device = image.device
    max_side = min(height, width)
    min_side = round(min_scale * max_side)
    side = (min_side + (max_side - min_side) * _uniform(n, 0, 1, generator, device) ** cut_pow).round()
    origin = torch.stack(
        [_uniform(n, 0, 1, generator, device) * (width - side), _uniform(n, 0, 1, generator, device) * (height - side)],
        dim=1,
    ).floor()
    angle = _uniform(n, -1, 1, generator, device) * math.radians(degrees)
    shift = torch.stack([_uniform(n, -1, 1, generator, device) for _ in range(2)], dim=1) * translate * cut_size
    flipped = _uniform(n, 0, 1, generator, device) < flip
    matrices = augment_matrices(angle, shift, flipped, cut_size) @ crop_matrices(origin, side, cut_size)

    stacked = image if masks is None else torch.cat([image, masks.to(image.dtype)], dim=1)
    warped = warp_affine(
        stacked.expand(n, -1, -1, -1), matrices[:, :2], (cut_size, cut_size), padding_mode="border", align_corners=True
    )
    cutouts, masked = warped[:, :3], (warped[:, 3:] if masks is not None else None)

    cutouts = adjust_brightness(cutouts, _uniform(n, -jitter, jitter, generator, device))
    cutouts = adjust_contrast(cutouts, _uniform(n, 1 - jitter, 1 + jitter, generator, device))
    cutouts = adjust_saturation(cutouts, _uniform(n, 1 - jitter, 1 + jitter, generator, device))
    sigma = _uniform(n, 0, noise, generator, device)[:, None, None, None]
    where = generator.device if generator is not None else device
    gaussian = torch.randn(cutouts.shape, generator=generator, device=where).to(device)
    return cutouts + sigma * gaussian, masked
