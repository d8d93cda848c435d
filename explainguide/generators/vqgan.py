"""A taming-transformers VQGAN (e.g. vqgan_imagenet_f16_16384) used as a VQGAN+CLIP image generator.

The network is written here with taming's module names, so its checkpoints (Lightning `last.ckpt` files, plain
state dicts or .safetensors) load as they are, and taming's `model.yaml` configures it. Only the parts generation
needs are built: encoder (to start from an image), quantiser codebook, 1x1 quant convs and decoder. Lightning
checkpoints pickle trainer objects next to the weights; they are read with `weights_only=True` and those objects
become inert placeholders, so neither pytorch-lightning nor arbitrary pickle code is needed.

The latent is the continuous grid z (1, embed_dim, H/f, W/f), f = 2^(len(ch_mult) - 1) (16 for the f16 models).
Each forward snaps z to its nearest codebook entries with a straight-through gradient, as VQGAN+CLIP does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf import errors as omegaconf_errors
from torch import Tensor, nn

from explainguide.generators.base import (
    Generator,
    GeneratorError,
    clamp_with_grad,
    freeze,
    prepare_image,
    resolve_size,
)

log = logging.getLogger(__name__)

SUPPORTED_TARGET = "taming.models.vqgan.VQModel"
# The modules built here; checkpoint keys under any other prefix (loss.*, discriminator, ...) are ignored.
MODEL_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
HOW_TO_GET = (
    "download vqgan_imagenet_f16_16384 (ckpts/last.ckpt and configs/model.yaml, linked in the taming-transformers "
    "README under 'Overview of pretrained models') and set generator.checkpoint=<last.ckpt> "
    "generator.config=<model.yaml>"
)


@dataclass(frozen=True)
class VQGANConfig:
    """taming's `model.params`: the encoder/decoder `ddconfig` plus the codebook size."""

    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    in_channels: int
    resolution: int
    z_channels: int
    double_z: bool
    n_embed: int
    embed_dim: int
    resamp_with_conv: bool = True

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.ch_mult) - 1)


def check_files(checkpoint: str | Path, config: str | Path) -> None:
    """Both of the generator's files exist; otherwise one error naming every missing one."""
    missing = [f"{kind} {path}" for kind, path in (("checkpoint", checkpoint), ("config", config))
               if not Path(path).is_file()]
    if missing:
        raise GeneratorError(f"vqgan {' and '.join(missing)} not found; {HOW_TO_GET}")


def read_config(path: str | Path) -> VQGANConfig:
    """Parse a taming `model.yaml` (target taming.models.vqgan.VQModel); see :func:`check_files`."""
    path = Path(path)
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml and OmegaConf raise many types, over several lines
        raise GeneratorError(f"vqgan config {path} is not readable YAML ({type(err).__name__}); pass the "
                             "configs/model.yaml that came with the checkpoint") from err
    target = OmegaConf.select(cfg, "model.target")
    if target != SUPPORTED_TARGET:
        raise GeneratorError(
            f"vqgan config {path} describes model.target={target!r}; only {SUPPORTED_TARGET} models are supported "
            "(e.g. vqgan_imagenet_f16_16384)"
        )
    params = cfg.model.params
    if params.get("remap") is not None:
        raise GeneratorError(f"vqgan config {path} uses a remapped codebook (remap=...); use a model without remap")
    try:
        return _vqgan_config(params)
    except (AttributeError, KeyError, TypeError, omegaconf_errors.OmegaConfBaseException) as err:
        missing = getattr(err, "full_key", None) or str(err).splitlines()[0]
        raise GeneratorError(f"vqgan config {path} lacks or misstates model.params {missing!r}; pass the "
                             "configs/model.yaml that came with the checkpoint") from err


def _vqgan_config(params) -> VQGANConfig:
    dd = params.ddconfig
    return VQGANConfig(
        ch=dd.ch,
        out_ch=dd.out_ch,
        ch_mult=tuple(dd.ch_mult),
        num_res_blocks=dd.num_res_blocks,
        attn_resolutions=tuple(dd.attn_resolutions),
        in_channels=dd.in_channels,
        resolution=dd.resolution,
        z_channels=dd.z_channels,
        double_z=dd.double_z,
        n_embed=params.n_embed,
        embed_dim=params.embed_dim,
        resamp_with_conv=dd.get("resamp_with_conv", True),
    )


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a (1x1 projected) skip: (B, C_in, h, w) -> (B, C_out, h, w)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (conv(normed).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, C), scale 1/sqrt(C)
        return x + self.proj_out(attended.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve h and w: a stride-2 3x3 conv after right/bottom zero padding, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour upsampling, then optionally a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, each followed by attention when `attn` is non-empty."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels (x2 if double_z), H/f, W/f)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels, res = cfg.ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            blocks = [ResnetBlock(channels if j == 0 else out, out) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(out) for _ in blocks] if res in cfg.attn_resolutions else []
            level, channels = Level(blocks, attns), out
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(channels, cfg.resamp_with_conv)
                res //= 2
            self.down.append(level)
        self.mid = Middle(channels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.z_channels * (2 if cfg.double_z else 1), 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h·f, w·f), roughly in [-1, 1]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        channels = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.factor
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = Middle(channels)
        levels: list[Level] = []
        for i in reversed(range(len(cfg.ch_mult))):  # built from the coarsest level, stored finest first (taming)
            out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(channels if j == 0 else out, out) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(out) for _ in blocks] if res in cfg.attn_resolutions else []
            level, channels = Level(blocks, attns), out
            if i != 0:
                level.upsample = Upsample(channels, cfg.resamp_with_conv)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """The codebook: `embedding.weight` (n_embed, embed_dim)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: Tensor) -> Tensor:
        """Nearest code per position with a straight-through gradient: (B, E, h, w) -> (B, E, h, w)."""
        return z + (nearest_codes(z, self.embedding.weight) - z).detach()


def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """Replace each vector of z (B, E, h, w) by its nearest (L2) row of codebook (N, E): -> (B, E, h, w)."""
    flat = z.movedim(1, -1).reshape(-1, z.shape[1])  # (B*h*w, E)
    distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)
    codes = codebook[distances.argmin(1)]
    return codes.reshape(*z.shape[:1], *z.shape[2:], z.shape[1]).movedim(-1, 1)


class VQGAN(nn.Module):
    """taming's VQModel without its training loss: encode to quantised latents, decode latents to images."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels * (2 if cfg.double_z else 1), cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> quantised latents (B, E, H/f, W/f)."""
        return self.quantize(self.quant_conv(self.encoder(image)))

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, E, h, w) -> (B, 3, h·f, w·f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q))


class _Opaque:
    """Stands in for classes pickled into Lightning checkpoints (callbacks, loggers); holds their state inertly."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The weights in a Lightning .ckpt ({'state_dict': ...}), a plain torch state dict, or a .safetensors file;
    see :func:`check_files`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        placeholders = [(type(name.rsplit(".", 1)[-1], (_Opaque,), {}), name) for name in foreign]
        with torch.serialization.safe_globals(placeholders):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, OSError) as err:
        raise GeneratorError(
            f"vqgan checkpoint {path} is not a readable torch checkpoint ({type(err).__name__}: {err}); {HOW_TO_GET}"
        ) from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise GeneratorError(f"vqgan checkpoint {path} holds no state dict; {HOW_TO_GET}")
    return state


def load_weights(model: VQGAN, state: dict[str, Tensor], checkpoint: str | Path, config: str | Path) -> None:
    """Copy the model's tensors from `state` (extra keys such as loss.* are ignored); any gap is one clear error."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or mismatched:
        example = (missing + mismatched)[0]
        raise GeneratorError(
            f"vqgan checkpoint {checkpoint} does not fit config {config}: {len(missing)} missing and "
            f"{len(mismatched)} wrongly shaped tensors (first: {example}); pass the model.yaml that came with it"
        )
    ignored = [k for k in state if not k.startswith(MODEL_PREFIXES)]
    log.debug("vqgan: ignoring %d checkpoint tensors outside %s", len(ignored), MODEL_PREFIXES)
    model.load_state_dict({k: state[k] for k in expected})


class VQGANGenerator(Generator):
    """VQGAN+CLIP: latents z (1, E, H/f, W/f), image = (decode(quantise(z)) + 1) / 2.

    z starts as codebook entries drawn at random from `seed` (or the encoding of an image) and is kept within the
    codebook's per-channel range by a gradient-preserving clamp. Requested sizes are rounded to multiples of f.
    """

    def __init__(self, size: int | Sequence[int], checkpoint: str, config: str, seed: int = 0):
        super().__init__()
        check_files(checkpoint, config)
        cfg = read_config(config)
        self.size = resolve_size(size, "vqgan", min_side=cfg.factor, multiple=cfg.factor)
        model = VQGAN(cfg)
        load_weights(model, read_state_dict(checkpoint), checkpoint, config)
        self.frozen = freeze(model)
        codebook = model.quantize.embedding.weight
        self.register_buffer("z_min", codebook.min(0).values[None, :, None, None], persistent=False)
        self.register_buffer("z_max", codebook.max(0).values[None, :, None, None], persistent=False)
        grid = (self.size[0] // cfg.factor, self.size[1] // cfg.factor)
        codes = torch.randint(cfg.n_embed, grid, generator=torch.Generator().manual_seed(seed))
        self.z = nn.Parameter(codebook[codes].movedim(-1, 0)[None].clone())

    def forward(self) -> Tensor:
        """(1, 3, H, W) in [0, 1]."""
        z = clamp_with_grad(self.z, self.z_min, self.z_max)
        image = self.frozen.decode(self.frozen.quantize(z))
        return clamp_with_grad((image + 1) / 2, 0.0, 1.0)

    @torch.no_grad()
    def init_from_image(self, image: Tensor) -> None:
        """Set z to the quantised encoding of `image` (1, 3, H', W') in [0, 1], resized to `size`."""
        image = prepare_image(image, self.size, "vqgan").to(self.z.device)
        self.z.copy_(self.frozen.encode(image * 2 - 1))

    def anchor_parameters(self) -> list[Tensor]:
        return [self.z]
