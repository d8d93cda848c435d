"""Model loading: checkpoints in both key formats, explicit random init, clear errors, tokenisation limits."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from explainguide.explain.capture import RelevanceNotSupported, image_blocks
from explainguide.explain.engine import explain_pairs
from explainguide.explain.tokens import tokenize
from explainguide.models import ModelLoadError, load_clip
from explainguide.models.loading import register_bundled


@pytest.fixture(scope="module")
def toy_random():
    return load_clip("toy_clip", random_init=True, device="cpu")


def _outputs(bundle):
    torch.manual_seed(0)
    images = torch.randn(2, 3, bundle.image_size, bundle.image_size)
    tokens = bundle.tokenizer(["a red circle", "a blue square"])
    with torch.no_grad():
        return bundle.model.encode_image(images), bundle.model.encode_text(tokens)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_in_open_clip_format(tmp_path, toy_random, suffix):
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in toy_random.model.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = load_clip("toy_clip", checkpoint=str(path), device="cpu")
    for ours, theirs in zip(_outputs(loaded), _outputs(toy_random)):
        torch.testing.assert_close(ours, theirs)
    assert loaded.source.startswith("checkpoint")


def test_openai_format_checkpoint_infers_architecture(golden):
    bundle, _, _ = golden
    assert bundle.context_length == 77
    assert len(image_blocks(bundle.model)) == 12
    assert bundle.model.visual.conv1.weight.dtype == torch.float32


def test_random_init_only_when_asked(caplog):
    with pytest.raises(ModelLoadError, match="random_init=true"):
        load_clip("toy_clip", device="cpu")
    with caplog.at_level("WARNING"):
        bundle = load_clip("toy_clip", random_init=True, device="cpu")
    assert bundle.source == "RANDOM INIT"
    assert "RANDOM-INITIALISED" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "ViT-B-99", "pretrained": "openai"}, "unknown model.name='ViT-B-99'"),
        ({"name": "ViT-B-32", "pretrained": "not-a-tag"}, "unknown model.pretrained='not-a-tag'"),
        ({"name": "toy_clip", "checkpoint": "/nope/clip.safetensors"}, "model.checkpoint='/nope/clip.safetensors' does not exist"),
        ({"name": "toy_clip", "random_init": True, "precision": "fp8"}, "model.precision='fp8'"),
        ({"name": "toy_clip", "pretrained": "openai"}, "use model.pretrained=bundled"),
    ],
)
def test_bad_model_config_is_one_clear_line(kwargs, message):
    with pytest.raises(ModelLoadError) as err:
        load_clip(device="cpu", **kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_checkpoint_of_another_architecture(tmp_path, golden):
    bundle, _, _ = golden
    path = tmp_path / "golden.safetensors"
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, path)
    with pytest.raises(ModelLoadError, match="does not fit architecture 'toy_clip'"):
        load_clip("toy_clip", checkpoint=str(path), device="cpu")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".png"])
def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_text("not a checkpoint")
    with pytest.raises(ModelLoadError) as err:
        load_clip("toy_clip", checkpoint=str(path), device="cpu")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "is not a readable state dict" in message
    assert "weights_only" not in message  # torch's advice to unpickle untrusted files stays out


def test_missing_pretrained_weights_offline_say_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "create_model", _raise_offline)
    with pytest.raises(ModelLoadError) as err:
        load_clip("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path), device="cpu")
    assert str(tmp_path) in str(err.value) and "model.checkpoint" in str(err.value)


def test_a_flag_set_after_import_stops_every_hub_request_for_pretrained_weights(monkeypatch, tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import; without our switch this would retry the dead network.
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(ModelLoadError, match=r"the hub is offline \(HF_HUB_OFFLINE is set\)") as err:
        load_clip("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path), device="cpu")
    assert "model.checkpoint" in str(err.value) and "set HF_HUB_OFFLINE" not in str(err.value)
    assert constants.HF_HUB_OFFLINE == before


def _raise_offline(*args, **kwargs):
    raise RuntimeError("Failed to download weights for tag 'openai': cannot find the requested files in the local cache")


def test_resnet_image_relevance_is_not_supported_but_text_works(tmp_path):
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny_rn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny_rn.json")
    bundle = load_clip("tiny_rn", random_init=True, device="cpu")
    images, tokens = torch.randn(1, 3, 64, 64), bundle.tokenizer(["a red circle"])
    with pytest.raises(RelevanceNotSupported, match="ModifiedResNet"):
        explain_pairs(bundle.model, images, tokens)
    text_only = explain_pairs(bundle.model, images, tokens, image=False)
    assert text_only.text_row.shape == (1, 16) and text_only.image_row is None


def test_first_block_at_model_depth_is_rejected(toy_random):
    depth = len(image_blocks(toy_random.model))
    tokens = toy_random.tokenizer(["a red circle"])
    with pytest.raises(ValueError, match=f"first_block={depth} is outside the image tower's {depth} blocks"):
        explain_pairs(toy_random.model, torch.randn(1, 3, 64, 64), tokens, image_first_block=depth)


@pytest.mark.parametrize("n_tokens", [75, 76, 77, 100])
def test_relevance_covers_exactly_the_kept_tokens(golden, n_tokens):
    bundle, reference, _ = golden
    prompt = " ".join(["cat"] * (n_tokens - 2))  # "cat" is one token; SOT and EOT make n_tokens
    with _maybe_warns(n_tokens > 77):
        tokens = tokenize(bundle.tokenizer, [prompt], bundle.context_length)
    kept = min(n_tokens, 77)
    assert int(tokens.argmax()) == kept - 1
    row = explain_pairs(bundle.model, reference["images"][:1], tokens, image=False).text_row[0].detach()
    assert (row[:kept] != 0).all() and (row[kept:] == 0).all()


def _maybe_warns(expected: bool):
    import contextlib
    import warnings

    if expected:
        return pytest.warns(UserWarning, match="tokens")
    @contextlib.contextmanager
    def no_warning():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield

    return no_warning()


def test_bundled_registry_points_at_the_package():
    folder = register_bundled("toy_clip")
    assert (folder / "toy_clip.json").is_file()
    assert "toy_clip" in open_clip.list_models()
