"""An RGB image parameterised directly: one logit per pixel and channel, squashed by a sigmoid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from explainguide.generators.base import Generator, prepare_image, resolve_size

# Logits of exactly 0 or 1 are infinite; init images are clamped this far inside [0, 1].
_EPS = 1e-4


class PixelGenerator(Generator):
    """image = sigmoid(logits); logits (1, 3, H, W) start as N(0, init_std²) noise drawn from `seed`.

    The default 0.1 is a near-grey start, so colours come from CLIP rather than from the initial noise.
    """

    def __init__(self, size: int | Sequence[int], seed: int = 0, init_std: float = 0.1):
        super().__init__()
        self.size = resolve_size(size, "pixel")
        noise = torch.randn((1, 3, *self.size), generator=torch.Generator().manual_seed(seed))
        self.logits = nn.Parameter(noise * init_std)

    def forward(self) -> Tensor:
        """(1, 3, H, W) in (0, 1)."""
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def init_from_image(self, image: Tensor) -> None:
        """Set the logits so that `forward()` reproduces `image` (1, 3, H', W') in [0, 1], resized to `size`."""
        image = prepare_image(image, self.size, "pixel").to(self.logits.device)
        self.logits.copy_(torch.logit(image.clamp(_EPS, 1 - _EPS)))

    def anchor_parameters(self) -> list[Tensor]:
        return [self.logits]
