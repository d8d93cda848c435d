"""Class-conditional BigGAN-deep (the `pytorch-pretrained-biggan` package, extra `gan`) as a FuseDream generator.

The image is G(z, y): z a noise vector and y a continuous class embedding (a row of the class-embedding matrix to
start). Following FuseDream, z and y are convex combinations of k basis latents with per-coordinate softmax
weights; basis latents and weights are all optimised, and z stays within ±z_threshold through a gradient-
preserving clamp. `search_initial_latents` fills the basis with the best of many random samples; without it,
k = 1 and the image is simply G(z, y) for one random (z, class) drawn from `seed`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainguide.generators.base import Generator, GeneratorError, clamp_with_grad, freeze, resolve_size

WEIGHTS_NAME, CONFIG_NAME = "pytorch_model.bin", "config.json"
PRETRAINED_RESOLUTIONS = (128, 256, 512)
_INSTALL = "pip install 'explainguide[gan]'"


def _package():
    try:
        import pytorch_pretrained_biggan
    except ImportError as err:
        raise GeneratorError(f"generator=biggan needs pytorch-pretrained-biggan ({err}); {_INSTALL}") from None
    return pytorch_pretrained_biggan


def locate_weights(weights: str | None, resolution: int) -> tuple[Path, Path]:
    """(weights file, config.json) from a folder, a weights file next to its config.json, or the package's cache."""
    if weights is not None:
        path = Path(weights).expanduser()
        folder = path if path.is_dir() else path.parent
        model_file, config_file = (path / WEIGHTS_NAME if path.is_dir() else path), folder / CONFIG_NAME
        for file in (model_file, config_file):
            if not file.is_file():
                raise GeneratorError(
                    f"generator.weights={str(weights)!r}: {file} not found; set generator.weights=<folder with {WEIGHTS_NAME} and "
                    f"{CONFIG_NAME}>, or null to use the pytorch-pretrained-biggan cache"
                )
        return model_file, config_file
    if resolution not in PRETRAINED_RESOLUTIONS:
        raise GeneratorError(
            f"generator.resolution={resolution} has no pretrained BigGAN-deep; use one of {PRETRAINED_RESOLUTIONS}"
        )
    package = _package()
    from pytorch_pretrained_biggan.file_utils import url_to_filename
    from pytorch_pretrained_biggan.model import PRETRAINED_CONFIG_ARCHIVE_MAP, PRETRAINED_MODEL_ARCHIVE_MAP

    cache = Path(os.fspath(package.PYTORCH_PRETRAINED_BIGGAN_CACHE))
    name = f"biggan-deep-{resolution}"
    found = []
    for url in (PRETRAINED_MODEL_ARCHIVE_MAP[name], PRETRAINED_CONFIG_ARCHIVE_MAP[name]):
        # The cache names files sha256(url)[.sha256(etag)], with a .json of metadata beside each.
        hits = sorted(p for p in cache.glob(url_to_filename(url) + "*") if p.suffix != ".json")
        if not hits:
            raise GeneratorError(
                f"biggan weights for {name} not in the cache {cache} (no {url.rsplit('/', 1)[-1]}); run "
                f"`python -c \"from pytorch_pretrained_biggan import BigGAN; BigGAN.from_pretrained('{name}')\"` "
                f"online once, or set generator.weights=<folder with {WEIGHTS_NAME} and {CONFIG_NAME}>"
            )
        found.append(hits[-1])
    return found[0], found[1]


def load_biggan(weights: str | None, resolution: int) -> nn.Module:
    """A frozen `pytorch_pretrained_biggan.BigGAN` whose config.json says `output_dim == resolution`."""
    package = _package()
    model_file, config_file = locate_weights(weights, resolution)
    config = package.BigGANConfig.from_json_file(str(config_file))
    if config.output_dim != resolution:
        raise GeneratorError(
            f"generator.resolution={resolution} but {config_file} describes a {config.output_dim}-px BigGAN; "
            f"set generator.resolution={config.output_dim}"
        )
    model = package.BigGAN(config)
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, OSError) as err:
        raise GeneratorError(f"biggan weights file {model_file} is not a readable torch state dict ({err})") from None
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if bad:
        raise GeneratorError(
            f"biggan weights file {model_file} does not fit {config_file}: {len(bad)} missing or wrongly shaped "
            f"tensors (first: {bad[0]}); keep the {CONFIG_NAME} that came with the weights"
        )
    model.load_state_dict({k: state[k] for k in expected})
    return freeze(model)


class BigGANGenerator(Generator):
    """image = resize((G(z, y) + 1) / 2); z = Σ_k softmax(w_z)_k ⊙ z_k, y = Σ_k softmax(w_y)_k ⊙ y_k.

    Parameters: z_basis (k, z_dim), y_basis (k, z_dim), w_z and w_y of the same shapes. `latent_noise` adds
    N(0, σ²) to z and y in train mode only (FuseDream used 0.01).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        resolution: int = 256,
        weights: str | None = None,
        truncation: float = 1.0,
        z_threshold: float = 2.0,
        latent_noise: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        self.size = resolve_size(size, "biggan")
        if self.size[0] != self.size[1]:
            raise GeneratorError(f"generator=biggan size={list(self.size)} is not square; BigGAN makes square images")
        if not 0 < truncation <= 1:
            raise GeneratorError(f"generator.truncation={truncation} is outside (0, 1]; use e.g. 1.0 (no truncation)")
        self.truncation, self.z_threshold, self.latent_noise = truncation, z_threshold, latent_noise
        self.frozen = load_biggan(weights, resolution)
        self._rng = torch.Generator().manual_seed(seed)
        z, y = self._sample(1)
        self._set_basis(z, y)

    @property
    def class_embeddings(self) -> Tensor:
        """(num_classes, z_dim): row c is the embedding of ImageNet class c."""
        return self.frozen.embeddings.weight.T

    def _sample(self, n: int) -> tuple[Tensor, Tensor]:
        """n random latents: z (n, z_dim) ~ N(0, 1) clamped to ±z_threshold; y (n, z_dim), random classes."""
        z_dim = self.frozen.config.z_dim
        z = torch.randn(n, z_dim, generator=self._rng).clamp(-self.z_threshold, self.z_threshold)
        classes = torch.randint(self.frozen.config.num_classes, (n,), generator=self._rng)
        device = self.class_embeddings.device
        return z.to(device), self.class_embeddings[classes].detach().clone()

    def _set_basis(self, z: Tensor, y: Tensor) -> None:
        """Make (z (k, d), y (k, d)) the basis and draw fresh N(0, 1) mixing logits; replaces the parameters."""
        self.z_basis, self.y_basis = nn.Parameter(z.clone()), nn.Parameter(y.clone())
        self.w_z = nn.Parameter(torch.randn(z.shape, generator=self._rng).to(z.device))
        self.w_y = nn.Parameter(torch.randn(y.shape, generator=self._rng).to(y.device))

    def render(self, z: Tensor, y: Tensor) -> Tensor:
        """Images for latents z (B, z_dim) and class embeddings y (B, z_dim): (B, 3, H, W) in [0, 1]."""
        image = (self.frozen.generator(torch.cat([z, y], dim=1), self.truncation) + 1) / 2
        if tuple(image.shape[-2:]) != self.size:
            image = F.interpolate(image, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return image.clamp(0, 1)

    def latents(self) -> tuple[Tensor, Tensor]:
        """The current (z (1, z_dim), y (1, z_dim))."""
        z_basis = clamp_with_grad(self.z_basis, -self.z_threshold, self.z_threshold)
        z = (torch.softmax(self.w_z, dim=0) * z_basis).sum(0, keepdim=True)
        y = (torch.softmax(self.w_y, dim=0) * self.y_basis).sum(0, keepdim=True)
        if self.training and self.latent_noise > 0:
            z = z + self.latent_noise * torch.randn(z.shape, generator=self._rng).to(z.device)
            y = y + self.latent_noise * torch.randn(y.shape, generator=self._rng).to(y.device)
        return z, y

    def forward(self) -> Tensor:
        """(1, 3, H, W) in [0, 1]."""
        return self.render(*self.latents())

    @torch.no_grad()
    def search_initial_latents(
        self, score_fn: Callable[[Tensor], Tensor], n_candidates: int, top_k: int, batch_size: int = 8
    ) -> Tensor:
        """FuseDream's basis search: render `n_candidates` random (z, class) pairs in batches, score them with
        `score_fn` (images (B, 3, H, W) in [0, 1] -> (B,), higher is better) and make the `top_k` best the basis.

        Replaces the parameters, so build the optimiser afterwards. Returns the kept scores (top_k,), best first.
        """
        if not 1 <= top_k <= n_candidates:
            raise GeneratorError(f"top_k={top_k} must be between 1 and n_candidates={n_candidates}; lower top_k")
        scores = torch.empty(0)
        z_kept = y_kept = None
        for start in range(0, n_candidates, batch_size):
            z, y = self._sample(min(batch_size, n_candidates - start))
            batch_scores = score_fn(self.render(z, y)).float().reshape(-1).cpu()
            if batch_scores.numel() != z.shape[0]:
                raise GeneratorError(
                    f"score_fn returned {batch_scores.numel()} scores for {z.shape[0]} images; return one each, (B,)"
                )
            scores = torch.cat([scores, batch_scores])
            z_kept = z if z_kept is None else torch.cat([z_kept, z])
            y_kept = y if y_kept is None else torch.cat([y_kept, y])
            scores, order = scores.topk(min(top_k, scores.numel()))
            z_kept, y_kept = z_kept[order.to(z_kept.device)], y_kept[order.to(y_kept.device)]
        self._set_basis(z_kept, y_kept)
        return scores

    def anchor_parameters(self) -> list[Tensor]:
        return [self.z_basis, self.y_basis]
