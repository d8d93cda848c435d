"""The contract every image generator meets, and the checks and tensor helpers they share.

A generator owns its latent parameters and, for GANs, a frozen network. `forward()` takes no input and returns
one (1, 3, H, W) RGB image in [0, 1] that is differentiable with respect to the latents; an optimiser over
`[p for p in generator.parameters() if p.requires_grad]` therefore optimises exactly the latents.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Below 8 px per side an image carries too little for CLIP, and the Fourier grid degenerates.
MIN_SIDE = 8
# Init images whose aspect ratio differs from the generator's by more than this are stretched visibly.
ASPECT_TOLERANCE = 0.01


class GeneratorError(ValueError):
    """A generator could not be built or used; the message names the value and the fix."""


class Generator(nn.Module, ABC):
    """Base class. Subclasses set `size` (H, W) in `__init__` and register their frozen networks as `frozen`."""

    size: tuple[int, int]

    @abstractmethod
    def forward(self) -> Tensor:
        """The current image: (1, 3, H, W) RGB in [0, 1]."""

    @abstractmethod
    def anchor_parameters(self) -> list[Tensor]:
        """The latent tensors an L2 anchor to the starting point should use."""

    def init_from_image(self, image: Tensor) -> None:
        """Start from a user image (1, 3, H', W') in [0, 1], resized to `size`. Not every generator can."""
        raise GeneratorError(
            f"generator {type(self).__name__} cannot start from an image; use generator=pixel, fft or vqgan for editing"
        )

    def train(self, mode: bool = True) -> Generator:
        """Switch latents to `mode`, but keep any frozen network in eval (batch-norm stats, spectral norm)."""
        super().train(mode)
        frozen = getattr(self, "frozen", None)
        if frozen is not None:
            frozen.eval()
        return self


def resolve_size(
    size: int | Sequence[int], generator: str, min_side: int = MIN_SIDE, multiple: int = 1
) -> tuple[int, int]:
    """`size` (an int for a square, or [H, W]) as (H, W), rounded to the nearest `multiple` with a warning.

    Rejects sizes below `min_side` per side up front, before any network is built.
    """
    if isinstance(size, Integral) and not isinstance(size, bool):
        sides = (int(size), int(size))
    elif isinstance(size, Iterable) and not isinstance(size, str):
        sides = tuple(size)
        if len(sides) != 2 or not all(isinstance(s, Integral) and not isinstance(s, bool) for s in sides):
            raise GeneratorError(f"generator={generator} size={list(sides)!r} is not [H, W]; give an int or two ints")
        sides = (int(sides[0]), int(sides[1]))
    else:
        raise GeneratorError(f"generator={generator} size={size!r} is not an int or [H, W]; give e.g. size=256")
    if min(sides) < min_side:
        raise GeneratorError(
            f"generator={generator} size={list(sides)} is below the minimum {min_side} px per side; "
            f"use size>={min_side}"
        )
    rounded = tuple(max(multiple, multiple * int(s / multiple + 0.5)) for s in sides)
    if rounded != sides:
        log.warning("generator=%s: size %s rounded to %s (sides must be multiples of %d)",
                    generator, list(sides), list(rounded), multiple)
    return rounded


def prepare_image(image: Tensor, size: tuple[int, int], generator: str) -> Tensor:
    """Check a user image (1, 3, H', W') in [0, 1] and resize it (bilinear, antialiased) to `size` (H, W); warns
    when that changes its aspect ratio."""
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise GeneratorError(
            f"generator={generator}: init image has shape {tuple(image.shape)}; give one RGB image (1, 3, H, W)"
        )
    if image.min() < 0 or image.max() > 1:
        raise GeneratorError(
            f"generator={generator}: init image spans [{image.min():.3g}, {image.max():.3g}]; scale it to [0, 1]"
        )
    if tuple(image.shape[-2:]) == size:
        return image.float()
    height, width = image.shape[-2:]
    if abs(height * size[1] / (width * size[0]) - 1) > ASPECT_TOLERANCE:
        log.warning("generator=%s: init image %dx%d stretched to %dx%d (another aspect ratio); crop it, or "
                    "keep its shape with generator.size=[%d, %d]", generator, width, height, size[1], size[0],
                    size[0], round(size[0] * width / height))
    return F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def freeze(module: nn.Module) -> nn.Module:
    """`module` in eval mode with every parameter excluded from optimisation."""
    module.requires_grad_(False)
    return module.eval()


class _ClampWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, low: Tensor, high: Tensor) -> Tensor:
        ctx.save_for_backward(x, low, high)
        return torch.maximum(torch.minimum(x, high), low)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, low, high = ctx.saved_tensors
        # Pass the gradient wherever descending it would move x towards (or inside) the range.
        outside_low, outside_high = x < low, x > high
        keep = ~((outside_low & (grad > 0)) | (outside_high & (grad < 0)))
        return grad * keep, None, None


def clamp_with_grad(x: Tensor, low: float | Tensor, high: float | Tensor) -> Tensor:
    """Clamp `x` (any shape; `low`/`high` broadcast to it) in the forward pass, yet let the gradient through where
    a descent step would bring an out-of-range value back, so latents pushed past a bound can return."""
    low = torch.as_tensor(low, dtype=x.dtype, device=x.device).expand_as(x)
    high = torch.as_tensor(high, dtype=x.dtype, device=x.device).expand_as(x)
    return _ClampWithGrad.apply(x, low, high)
