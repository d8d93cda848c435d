"""Generators (pixel, fft, vqgan, biggan) and cutouts: shapes, loading through the real code, gradients, errors."""

from __future__ import annotations

import json
import logging
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from explainguide.generators import (
    GENERATORS,
    CutoutError,
    Generator,
    GeneratorError,
    build_generator,
    make_cutouts,
)
from explainguide.generators.fft import frequency_scale
from explainguide.generators.vqgan import VQGAN, read_config
from explainguide.runtime import ConfigError

CONF = Path(__file__).resolve().parents[1] / "explainguide" / "conf" / "generator"

# A VQGAN with taming's layout but tiny channels: 5 levels, so one latent cell is 16 px as in the f16 models.
TINY_VQGAN = {
    "double_z": False,
    "z_channels": 8,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [16],
    "dropout": 0.0,
}
# taming's configs/model.yaml for vqgan_imagenet_f16_16384.
IMAGENET_F16_16384 = {
    "double_z": False,
    "z_channels": 256,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "dropout": 0.0,
}


def _vqgan_yaml(path: Path, ddconfig: dict, n_embed: int, embed_dim: int, target="taming.models.vqgan.VQModel") -> Path:
    loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {"disc_start": 0}}
    params = {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig, "lossconfig": loss}
    OmegaConf.save(OmegaConf.create({"model": {"target": target, "params": params}}), path)
    return path


@pytest.fixture
def tiny_vqgan(tmp_path, monkeypatch):
    """(checkpoint, config, saved state dict): a Lightning-style last.ckpt that pickles a pytorch_lightning class."""
    config = _vqgan_yaml(tmp_path / "model.yaml", TINY_VQGAN, n_embed=16, embed_dim=8)
    torch.manual_seed(0)
    state = VQGAN(read_config(config)).state_dict()
    # Lightning pickles trainer objects next to the weights; fake its module only while saving.
    name = "pytorch_lightning.callbacks.model_checkpoint"
    callback = type("ModelCheckpoint", (), {"__module__": name})
    with monkeypatch.context() as patch:
        for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
            patch.setitem(sys.modules, parent, types.ModuleType(parent))
        patch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[name].ModelCheckpoint = callback
        checkpoint = {
            "epoch": 3,
            "state_dict": {**state, "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)},
            "callbacks": {callback: {"best_model_score": torch.tensor(0.5)}},
            "trainer": callback(),
        }
        torch.save(checkpoint, tmp_path / "last.ckpt")
    assert name not in sys.modules
    return tmp_path / "last.ckpt", config, state


def _one_step(generator: Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward + backward + Adam step; returns the image and the latents' gradients."""
    latents = [p for p in generator.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(latents, lr=0.05)
    image = generator()
    (image * torch.linspace(0, 1, image.shape[-1])).mean().backward()
    grads = [p.grad.clone() for p in latents]
    optimiser.step()
    return image, grads


# ---------------------------------------------------------------- pixel and fft


@pytest.mark.parametrize("name", ["pixel", "fft"])
def test_image_generators_shape_range_seed_and_gradient(name):
    generator = build_generator(name, [24, 40], seed=1)
    assert generator.size == (24, 40)
    image, grads = _one_step(generator)
    assert image.shape == (1, 3, 24, 40) and 0 <= image.min() and image.max() <= 1
    assert all(g.abs().sum() > 0 for g in grads)
    assert not torch.equal(generator().detach(), image.detach())  # the step changed the image
    same, other = build_generator(name, [24, 40], seed=1), build_generator(name, [24, 40], seed=2)
    assert torch.equal(same(), build_generator(name, [24, 40], seed=1)())
    assert not torch.equal(same(), other())
    assert generator.anchor_parameters() == latents_of(generator)


def latents_of(generator: Generator) -> list[torch.Tensor]:
    return [p for p in generator.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ["pixel", "fft"])
def test_init_from_image_reproduces_the_image(name):
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 0.98 + 0.01
    generator = build_generator(name, [32, 48])
    generator.init_from_image(image)
    torch.testing.assert_close(generator(), image, atol=1e-4, rtol=0)
    generator.init_from_image(torch.rand(1, 3, 64, 96))  # other sizes are resized to generator.size
    assert generator().shape == (1, 3, 32, 48)


def logged_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_init_image_of_another_aspect_ratio_warns_with_both_sizes(caplog):
    generator = build_generator("pixel", 32)
    with caplog.at_level(logging.WARNING):
        generator.init_from_image(torch.rand(1, 3, 64, 64))  # same shape, other size: no warning
        assert not logged_warnings(caplog)
        generator.init_from_image(torch.rand(1, 3, 30, 60))
    assert logged_warnings(caplog) == ["generator=pixel: init image 60x30 stretched to 32x32 (another aspect ratio); "
                                       "crop it, or keep its shape with generator.size=[32, 64]"]


def test_fft_spectrum_is_scaled_by_inverse_frequency():
    scale = frequency_scale(16, 16, decay_power=1.0)
    assert scale.shape == (16, 9)
    assert scale[0, 0] == 16  # DC: 1 / (1/16)
    torch.testing.assert_close(scale[0, 1:], 1 / torch.fft.rfftfreq(16)[1:])
    # Colours are decorrelated: one latent channel moves all three RGB channels.
    generator = build_generator("fft", 16)
    with torch.no_grad():
        generator.spectrum.zero_()
        generator.spectrum[0, 0, 0, 0, 0] = 1.0
    rgb = generator()[0, :, 0, 0] - 0.5
    assert (rgb.abs() > 1e-3).all()


# ---------------------------------------------------------------- vqgan


def test_vqgan_loads_lightning_checkpoint_rounds_size_and_takes_a_step(tiny_vqgan, caplog):
    checkpoint, config, state = tiny_vqgan
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")  # a log line, not a Python warning
        generator = build_generator("vqgan", [70, 50], checkpoint=str(checkpoint), config=str(config))
    assert generator.size == (64, 48)
    assert logged_warnings(caplog) == [
        "generator=vqgan: size [70, 50] rounded to [64, 48] (sides must be multiples of 16)"]
    torch.testing.assert_close(generator.frozen.decoder.conv_out.weight, state["decoder.conv_out.weight"])
    torch.testing.assert_close(generator.frozen.quantize.embedding.weight, state["quantize.embedding.weight"])
    assert generator.z.shape == (1, 8, 4, 3)
    image, grads = _one_step(generator)
    assert image.shape == (1, 3, 64, 48) and 0 <= image.min() and image.max() <= 1
    assert latents_of(generator) == [generator.z] == generator.anchor_parameters()
    assert grads[0].abs().sum() > 0
    assert all(p.grad is None for p in generator.frozen.parameters())
    generator.train()
    assert not generator.frozen.training


def test_vqgan_init_from_image_snaps_to_codebook(tiny_vqgan):
    checkpoint, config, _ = tiny_vqgan
    generator = build_generator("vqgan", 32, checkpoint=str(checkpoint), config=str(config))
    generator.init_from_image(torch.rand(1, 3, 40, 40))
    vectors = generator.z.detach()[0].flatten(1).T  # (h*w, E)
    distances = torch.cdist(vectors, generator.frozen.quantize.embedding.weight)
    assert distances.min(1).values.max() < 1e-5
    assert generator().shape == (1, 3, 32, 32)


def test_a_malformed_vqgan_config_is_one_line_naming_the_file(tmp_path):
    lacking = {key: value for key, value in TINY_VQGAN.items() if key != "z_channels"}
    path = _vqgan_yaml(tmp_path / "lacking.yaml", lacking, n_embed=16, embed_dim=8)
    with pytest.raises(GeneratorError, match=r"lacking.yaml lacks or misstates model.params .*z_channels") as err:
        read_config(path)
    assert "\n" not in str(err.value)
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(GeneratorError, match=r"broken.yaml is not readable YAML"):
        read_config(tmp_path / "broken.yaml")


def test_vqgan_matches_taming_module_names_for_imagenet_f16_16384(tmp_path):
    config = read_config(_vqgan_yaml(tmp_path / "m.yaml", IMAGENET_F16_16384, n_embed=16384, embed_dim=256))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VQGAN(config).state_dict().items()}
    assert shapes["quantize.embedding.weight"] == (16384, 256)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["post_quant_conv.weight"] == (256, 256, 1, 1)
    for key in (
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.down.4.attn.1.proj_out.weight",
        "encoder.mid.attn_1.q.weight",
        "decoder.up.4.attn.2.k.weight",
        "decoder.up.3.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.norm_out.weight",
    ):
        assert key in shapes, key
    assert not any(k.startswith(("encoder.down.4.downsample", "decoder.up.0.upsample")) for k in shapes)
    assert "decoder.up.3.attn.0.q.weight" not in shapes


def test_vqgan_errors_name_the_file_and_the_fix(tiny_vqgan, tmp_path):
    checkpoint, config, _ = tiny_vqgan
    with pytest.raises(GeneratorError, match=r"missing\.ckpt not found.*taming-transformers README"):
        build_generator("vqgan", 64, checkpoint=str(tmp_path / "missing.ckpt"), config=str(config))
    with pytest.raises(GeneratorError, match="vqgan config .*nope.yaml not found"):
        build_generator("vqgan", 64, checkpoint=str(checkpoint), config=str(tmp_path / "nope.yaml"))
    with pytest.raises(GeneratorError, match=r"vqgan checkpoint .*missing\.ckpt and config .*nope\.yaml not found; "):
        build_generator("vqgan", 64, checkpoint=str(tmp_path / "missing.ckpt"), config=str(tmp_path / "nope.yaml"))
    bigger = _vqgan_yaml(tmp_path / "bigger.yaml", {**TINY_VQGAN, "ch": 64}, n_embed=16, embed_dim=8)
    with pytest.raises(GeneratorError, match="does not fit config"):
        build_generator("vqgan", 64, checkpoint=str(checkpoint), config=str(bigger))
    gumbel = _vqgan_yaml(tmp_path / "g.yaml", TINY_VQGAN, 16, 8, target="taming.models.vqgan.GumbelVQ")
    with pytest.raises(GeneratorError, match="only taming.models.vqgan.VQModel"):
        build_generator("vqgan", 64, checkpoint=str(checkpoint), config=str(gumbel))
    with pytest.raises(GeneratorError, match="minimum 16 px"):
        build_generator("vqgan", 8, checkpoint=str(checkpoint), config=str(config))


def test_vqgan_reads_safetensors(tiny_vqgan, tmp_path):
    from safetensors.torch import save_file

    _, config, state = tiny_vqgan
    save_file(state, tmp_path / "vqgan.safetensors")
    generator = build_generator("vqgan", 32, checkpoint=str(tmp_path / "vqgan.safetensors"), config=str(config))
    assert generator().shape == (1, 3, 32, 32)


# ---------------------------------------------------------------- biggan


@pytest.fixture
def tiny_biggan(tmp_path):
    """A folder with pytorch_model.bin and config.json of a random 32-px BigGAN-deep with 10 classes."""
    biggan = pytest.importorskip("pytorch_pretrained_biggan")
    config = biggan.BigGANConfig(
        output_dim=32,
        z_dim=16,
        class_embed_dim=16,
        channel_width=4,
        num_classes=10,
        layers=[(True, 16, 8), (True, 8, 4), (True, 4, 2), (False, 2, 1)],
        attention_layer_position=1,
    )
    torch.manual_seed(0)
    model = biggan.BigGAN(config)
    with torch.no_grad():
        model.generator.bn.weight.fill_(1.0)  # the package leaves this affine uninitialised
        model.generator.bn.bias.zero_()
        for module in model.modules():  # spectral norm's (u, v) as converged in trained weights: top singular pair
            if hasattr(module, "weight_orig"):
                u, _, vh = torch.linalg.svd(module.weight_orig.flatten(1), full_matrices=False)
                module.weight_u.copy_(u[:, 0])
                module.weight_v.copy_(vh[0])
    folder = tmp_path / "biggan"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(config.to_json_string())
    return folder


def test_biggan_loads_weights_and_takes_a_step(tiny_biggan):
    generator = build_generator("biggan", 32, resolution=32, weights=str(tiny_biggan), seed=3)
    image, grads = _one_step(generator)
    assert image.shape == (1, 3, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert {p.shape for p in latents_of(generator)} == {torch.Size([1, 16])}
    assert all(g.abs().sum() > 0 for g in grads[:2])  # z and y (softmax weights of a 1-basis get zero gradient)
    assert all(p.grad is None for p in generator.frozen.parameters())
    assert generator.anchor_parameters() == [generator.z_basis, generator.y_basis]
    small = build_generator("biggan", 16, resolution=32, weights=str(tiny_biggan / "pytorch_model.bin"))
    assert small().shape == (1, 3, 16, 16)
    with pytest.raises(GeneratorError, match="cannot start from an image"):
        small.init_from_image(torch.rand(1, 3, 16, 16))


def test_biggan_basis_search_keeps_the_best_candidates(tiny_biggan):
    generator = build_generator("biggan", 32, resolution=32, weights=str(tiny_biggan))
    brightness = lambda images: images.mean(dim=(1, 2, 3))  # noqa: E731
    scores = generator.search_initial_latents(brightness, n_candidates=12, top_k=3, batch_size=5)
    assert scores.shape == (3,) and torch.all(scores[:-1] >= scores[1:])
    assert generator.z_basis.shape == (3, 16) and generator.w_y.shape == (3, 16)
    with torch.no_grad():
        rendered = brightness(generator.render(generator.z_basis, generator.y_basis))
    torch.testing.assert_close(rendered, scores)
    best = generator.search_initial_latents(brightness, n_candidates=12, top_k=1)
    with torch.no_grad():
        torch.testing.assert_close(brightness(generator()), best)


def test_biggan_missing_weights_name_the_file(tiny_biggan, tmp_path, monkeypatch):
    biggan = pytest.importorskip("pytorch_pretrained_biggan")
    with pytest.raises(GeneratorError, match=r"generator.weights=.*nowhere': .*nowhere not found"):
        build_generator("biggan", 32, resolution=32, weights=str(tmp_path / "nowhere"))
    with pytest.raises(GeneratorError, match="describes a 32-px BigGAN"):
        build_generator("biggan", 32, resolution=256, weights=str(tiny_biggan))
    monkeypatch.setattr(biggan, "PYTORCH_PRETRAINED_BIGGAN_CACHE", tmp_path / "cache")
    with pytest.raises(GeneratorError, match=r"biggan-deep-256 not in the cache .*cache"):
        build_generator("biggan", 256, resolution=256)


def test_biggan_without_the_gan_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_pretrained_biggan", None)  # makes the import fail
    with pytest.raises(GeneratorError, match=r"pip install 'explainguide\[gan\]'"):
        build_generator("biggan", 256)


def test_biggan_finds_weights_in_the_package_cache(tiny_biggan, tmp_path, monkeypatch):
    biggan = pytest.importorskip("pytorch_pretrained_biggan")
    from pytorch_pretrained_biggan.file_utils import url_to_filename
    from pytorch_pretrained_biggan.model import PRETRAINED_CONFIG_ARCHIVE_MAP, PRETRAINED_MODEL_ARCHIVE_MAP

    cache = tmp_path / "cache"
    cache.mkdir()
    config = json.loads((tiny_biggan / "config.json").read_text())
    (tiny_biggan / "config.json").write_text(json.dumps({**config, "output_dim": 128}))  # pose as biggan-deep-128
    archives = ((PRETRAINED_MODEL_ARCHIVE_MAP, "pytorch_model.bin"), (PRETRAINED_CONFIG_ARCHIVE_MAP, "config.json"))
    for archive, file in archives:
        name = url_to_filename(archive["biggan-deep-128"], etag='"abc"')
        (cache / name).write_bytes((tiny_biggan / file).read_bytes())
        (cache / f"{name}.json").write_text("{}")
    monkeypatch.setattr(biggan, "PYTORCH_PRETRAINED_BIGGAN_CACHE", cache)
    generator = build_generator("biggan", 32, resolution=128)
    assert generator().shape == (1, 3, 32, 32)


# ---------------------------------------------------------------- registry, sizes, configs


def test_registry_and_clear_errors():
    assert set(GENERATORS) == {"pixel", "fft", "vqgan", "biggan"}
    with pytest.raises(GeneratorError, match="unknown generator='stylegan'"):
        build_generator("stylegan", 64)
    with pytest.raises(GeneratorError, match=r"generator=pixel has no option\(s\) \['checkpoint'\]"):
        build_generator("pixel", 64, checkpoint="x.ckpt")
    with pytest.raises(GeneratorError, match="below the minimum 8 px"):
        build_generator("fft", [64, 4])
    with pytest.raises(GeneratorError, match="not an int or"):
        build_generator("pixel", "64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # multiples of 1: no rounding, no warning
        assert build_generator("pixel", 33).size == (33, 33)


def test_hydra_configs_instantiate(tiny_vqgan):
    checkpoint, config, _ = tiny_vqgan
    assert {p.stem for p in CONF.glob("*.yaml")} == set(GENERATORS)
    for name in ("pixel", "fft"):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        cfg.size, cfg.seed = 16, 0  # seed interpolates the root config's ${seed} when composed
        assert instantiate(cfg)().shape == (1, 3, 16, 16)
    cfg = OmegaConf.load(CONF / "vqgan.yaml")
    cfg.size, cfg.checkpoint, cfg.config, cfg.seed = [32, 48], str(checkpoint), str(config), 0
    assert instantiate(cfg)().shape == (1, 3, 32, 48)
    biggan = OmegaConf.load(CONF / "biggan.yaml")
    assert biggan.name == "biggan" and biggan.weights is None and biggan.size == biggan.resolution


def _compose(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        return compose(config_name="config", overrides=list(overrides))


def test_pixel_starts_near_grey_by_default():
    # The shapes presets' measured setting (docs/generation_shapes.md): init_std 0.1, now pixel's own default.
    assert OmegaConf.load(CONF / "pixel.yaml").init_std == 0.1
    assert build_generator("pixel", 64).logits.std().item() == pytest.approx(0.1, rel=0.05)
    for experiment in ("generate_shapes", "spatial_shapes"):
        assert _compose(f"experiment={experiment}").generator.init_std == 0.1


@pytest.mark.parametrize("experiment", ["generate_shapes", "spatial_shapes", "edit_shapes"])
def test_shapes_presets_take_any_generator(tiny_vqgan, tiny_biggan, experiment):
    checkpoint, config, _ = tiny_vqgan
    vqgan = _compose(f"experiment={experiment}", "generator=vqgan", f"generator.checkpoint={checkpoint}",
                     f"generator.config={config}", "seed=0")
    assert instantiate(vqgan.generator)().shape == (1, 3, 64, 64)
    biggan = _compose(f"experiment={experiment}", "generator=biggan", f"generator.weights={tiny_biggan}",
                      "generator.resolution=32", "seed=0")
    assert instantiate(biggan.generator)().shape == (1, 3, 64, 64)  # 32 px BigGAN resized to the preset's 64


# ---------------------------------------------------------------- cutouts

NO_COLOUR = {"jitter": 0.0, "noise": 0.0}


def _square_scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A blue 64x64 image with a red 28x28 square at rows 12-39, cols 20-47; its mask; the square's colour."""
    colour = torch.tensor([0.9, 0.1, 0.2])
    image = torch.tensor([0.1, 0.3, 0.9])[None, :, None, None].repeat(1, 1, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    image[..., 12:40, 20:48] = colour[:, None, None]
    mask[..., 12:40, 20:48] = 1
    return image, mask, colour


def _masked_colour(cutouts: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask-weighted mean colour (n, 3), mask area in px (n,))."""
    area = masks.sum(dim=(1, 2, 3))
    return (cutouts * masks).sum(dim=(2, 3)) / area.clamp(min=1e-6)[:, None], area


def test_cutouts_are_independent_and_reproducible():
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cutouts, masked = make_cutouts(image, None, 8, 32, torch.Generator().manual_seed(1), **NO_COLOUR)
    assert cutouts.shape == (8, 3, 32, 32) and masked is None
    flat = cutouts.flatten(1)
    differences = (flat[:, None] - flat[None]).abs().amax(-1)
    assert (differences + torch.eye(8)).min() > 0.05  # every pair differs in geometry alone
    again, _ = make_cutouts(image, None, 8, 32, torch.Generator().manual_seed(1), **NO_COLOUR)
    torch.testing.assert_close(again, cutouts)


def test_cutout_masks_stay_aligned_with_their_square():
    image, mask, colour = _square_scene()
    strong = {"degrees": 30.0, "translate": 0.15, "flip": 0.5, "min_scale": 0.4}
    cutouts, masked = make_cutouts(image, mask, 16, 32, torch.Generator().manual_seed(0), **strong, **NO_COLOUR)
    assert masked.shape == (16, 1, 32, 32)
    mean, area = _masked_colour(cutouts, masked)
    seen = area > 20
    assert seen.sum() >= 8
    torch.testing.assert_close(mean[seen], colour.expand(int(seen.sum()), 3), atol=0.05, rtol=0)
    # Control: masks cut with other random parameters do not line up, so the check above has teeth.
    _, other = make_cutouts(image, mask, 16, 32, torch.Generator().manual_seed(99), **strong, **NO_COLOUR)
    wrong, wrong_area = _masked_colour(cutouts, other)
    assert (wrong[wrong_area > 20] - colour).abs().amax(-1).max() > 0.2


def test_cutouts_pass_gradients_and_jitter_only_the_image():
    image, mask, _ = _square_scene()
    image.requires_grad_(True)
    cutouts, masked = make_cutouts(image, mask, 4, 32, torch.Generator().manual_seed(0), noise=0.3, jitter=0.3)
    cutouts.square().mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert 0 <= masked.min() and masked.max() <= 1  # masks got no colour jitter or noise
    plain, _ = make_cutouts(image.detach(), mask, 4, 32, torch.Generator().manual_seed(0), **NO_COLOUR)
    assert not torch.allclose(plain, cutouts.detach(), atol=1e-3)


def test_cutouts_reject_small_sizes_and_bad_masks():
    with pytest.raises(CutoutError, match="too small for cutouts"):
        make_cutouts(torch.rand(1, 3, 6, 64), None, 4, 32)
    with pytest.raises(CutoutError, match="too small for cutouts"):
        make_cutouts(torch.rand(1, 3, 64, 64), None, 4, 4)
    with pytest.raises(CutoutError, match="masks have shape"):
        make_cutouts(torch.rand(1, 3, 64, 64), torch.rand(1, 2, 32, 32), 4, 32)
    with pytest.raises(CutoutError, match=r"min_scale=0.1 gives cutouts of 2 px from a 16x16 image, below the "
                                          r"minimum 8 px; use min_scale >= 0.5"):
        make_cutouts(torch.rand(1, 3, 16, 16), None, 4, 32, min_scale=0.1)


def test_cutouts_too_small_for_the_generator_size_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    import explainguide.models

    monkeypatch.setattr(explainguide.models, "load_clip", lambda *a, **k: pytest.fail("a model loaded first"))
    with pytest.raises(ConfigError, match=r"task.cutouts.min_scale=0.001 gives cutouts of 0 px"):
        _run_task(tmp_path, "task=generate", "generator.size=16", "task.cutouts.min_scale=0.001")


# ---------------------------------------------------------------- the real generators inside the tasks


def _run_task(tmp_path: Path, *overrides: str) -> dict:
    """metrics.json of a one-step run of the task in tmp_path/out."""
    from hydra import compose, initialize_config_module

    from explainguide.app import run_task
    from explainguide.runtime import RunContext

    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        cfg = compose(config_name="config", overrides=["model=toy_random", "logger=none", "progress=false",
                                                       "device=cpu", "task.steps=1", "task.eval_views=2",
                                                       "task.snapshot_every=0", *overrides])
    run_task(cfg, RunContext(output_dir=tmp_path / "out", launch_dir=tmp_path))
    return json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))


def test_generate_and_spatial_run_a_step_with_a_vqgan(tiny_vqgan, tmp_path, caplog):
    checkpoint, config, _ = tiny_vqgan
    vqgan = ["generator=vqgan", f"generator.checkpoint={checkpoint}", f"generator.config={config}",
             "generator.size=40", "task.cutouts.n=2"]
    with caplog.at_level(logging.WARNING):  # 40 px is not a multiple of the latent cell: rounded
        metrics = _run_task(tmp_path / "generate", "task=generate", *vqgan, "task.words=[star]")
    assert "generator=vqgan: size [40, 40] rounded to [48, 48] (sides must be multiples of 16)" in \
        logged_warnings(caplog)
    assert metrics["status"] == "ok" and (tmp_path / "generate" / "out" / "images" / "final.png").is_file()
    metrics = _run_task(tmp_path / "spatial", "task=spatial", *vqgan, "generator.size=32",
                        "task.phrases=[{text: a, box: [0, 0, 16, 16]}]")
    assert metrics["status"] == "ok" and len(metrics["spatial/relevance_in_mask"]) == 1


def test_generate_shapes_preset_runs_with_a_vqgan(tiny_vqgan, tmp_path):
    checkpoint, config, _ = tiny_vqgan
    metrics = _run_task(tmp_path, "experiment=generate_shapes", "generator=vqgan", f"generator.checkpoint={checkpoint}",
                        f"generator.config={config}", "task.cutouts.n=2")
    assert metrics["status"] == "ok" and metrics["generate/guided"] is True


def test_generate_runs_a_step_with_a_biggan(tiny_biggan, tmp_path):
    metrics = _run_task(tmp_path, "task=generate", "generator=biggan", f"generator.weights={tiny_biggan}",
                        "generator.resolution=32", "task.cutouts.n=2", "task.words=[star]")
    assert metrics["status"] == "ok" and (tmp_path / "out" / "images" / "final.png").is_file()
