"""A Fourier, colour-decorrelated image parameterisation (the Lucid "fft + decorrelated colour" image).

The latent is a complex spectrum per decorrelated colour channel. Each frequency is scaled by 1/|f|^decay, so
every frequency gets comparable gradient energy instead of the high frequencies dominating; the inverse FFT gives
a decorrelated-colour image, a fixed 3x3 matrix maps it to correlated RGB logits, and a sigmoid maps those to
[0, 1]. The map from spectrum to logits is linear and invertible, so an image can be loaded exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from explainguide.generators.base import Generator, prepare_image, resolve_size

# Square root of the RGB colour covariance of ImageNet (columns: decorrelated channels), as published with Lucid.
COLOR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
# Lucid's constant: divides the spatial image so that N(0, 0.01²) spectra give logits of a useful spread.
_SPATIAL_DIVISOR = 4.0
_EPS = 1e-4


def frequency_scale(height: int, width: int, decay_power: float) -> Tensor:
    """1 / max(|f|, 1/max(H, W))^decay for the rfft2 grid: (H, W // 2 + 1)."""
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    radius = torch.sqrt(fx**2 + fy**2).clamp(min=1.0 / max(height, width))
    return radius.pow(-decay_power)


def decorrelate(image: Tensor, matrix: Tensor) -> Tensor:
    """Mix channels: out[:, i] = Σ_j matrix[i, j] · image[:, j]. image (B, 3, H, W), matrix (3, 3) -> (B, 3, H, W)."""
    return torch.einsum("ij,bjhw->bihw", matrix, image)


class FourierGenerator(Generator):
    """image = sigmoid(M · irfft2(scale ⊙ spectrum) / 4), spectrum (1, 3, H, W//2+1) complex, drawn from `seed`."""

    def __init__(self, size: int | Sequence[int], seed: int = 0, init_std: float = 0.01, decay_power: float = 1.0):
        super().__init__()
        self.size = resolve_size(size, "fft")
        height, width = self.size
        shape = (1, 3, height, width // 2 + 1, 2)  # trailing 2: real and imaginary parts
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        self.spectrum = nn.Parameter(noise * init_std)
        self.register_buffer("scale", frequency_scale(height, width, decay_power), persistent=False)
        matrix = COLOR_CORRELATION_SQRT / COLOR_CORRELATION_SQRT.norm(dim=0).max()
        self.register_buffer("color_matrix", matrix, persistent=False)

    def logits(self) -> Tensor:
        """The pre-sigmoid RGB image: (1, 3, H, W)."""
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        spatial = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / _SPATIAL_DIVISOR
        return decorrelate(spatial, self.color_matrix)

    def forward(self) -> Tensor:
        """(1, 3, H, W) in (0, 1)."""
        return torch.sigmoid(self.logits())

    @torch.no_grad()
    def init_from_image(self, image: Tensor) -> None:
        """Invert the parameterisation so that `forward()` reproduces `image` (1, 3, H', W'), resized to `size`."""
        image = prepare_image(image, self.size, "fft").to(self.spectrum.device)
        logits = torch.logit(image.clamp(_EPS, 1 - _EPS))
        spatial = decorrelate(logits, torch.linalg.inv(self.color_matrix)) * _SPATIAL_DIVISOR
        spectrum = torch.fft.rfft2(spatial, norm="ortho") / self.scale
        self.spectrum.copy_(torch.view_as_real(spectrum))

    def anchor_parameters(self) -> list[Tensor]:
        return [self.spectrum]
