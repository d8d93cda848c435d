"""Load any open_clip architecture from a pretrained tag, a local checkpoint, the bundled toy model,
or (only when asked explicitly) random initialisation.

Everything a task needs from a model travels in one `ClipBundle`, so tasks never parse model config.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import build_model_from_openai_state_dict
from open_clip.transform import image_transform

from explainguide.offline import hub_requests_off, offline_reason

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Models whose architecture json and weights ship inside the package (`pretrained: bundled`): name -> folder.
BUNDLED_MODELS = {"toy_clip": Path(__file__).parent / "toy"}


class ModelLoadError(RuntimeError):
    """A model could not be built; the message names the value and the fix."""


@dataclass
class ClipBundle:
    """A CLIP model with what is needed to feed it.

    preprocess: PIL image -> (3, S, S) normalised tensor. tokenizer: open_clip tokenizer (callable on a list of
    strings); context_length: the text tower's length, which every tokenisation must use.
    """

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    context_length: int
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} but CUDA is not available; use device=cpu or auto "
                             "(or model.device, which defaults to the top-level device)")
    return torch.device(device)


def register_bundled(name: str) -> Path:
    """Register a bundled architecture json with open_clip and return the folder holding its weights."""
    folder = BUNDLED_MODELS[name]
    open_clip.add_model_config(folder / f"{name}.json")
    return folder


def _check_name_and_tag(name: str, pretrained: str | None) -> None:
    for bundled in BUNDLED_MODELS:
        register_bundled(bundled)
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().replace("/", "-")[:5] in m.lower()][:8]
        raise ModelLoadError(
            f"unknown model.name={name!r}; use an open_clip architecture such as {close or ['ViT-B-32', 'RN50']} "
            "(full list: python -c 'import open_clip; print(open_clip.list_models())')"
        )
    if pretrained and pretrained != "bundled":
        if name in BUNDLED_MODELS:
            raise ModelLoadError(f"model.pretrained={pretrained!r} for {name}, whose weights ship in the package; "
                                 "use model.pretrained=bundled")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelLoadError(
                f"unknown model.pretrained={pretrained!r} for {name}; available tags: {tags or 'none'}"
            )


def _state_dict_is_openai_format(state_dict: dict) -> bool:
    # OpenAI checkpoints (and open_clip's CLIP class) use these keys; build_model_from_openai_state_dict infers
    # the architecture from them, so no name is needed.
    return "text_projection" in state_dict and ("visual.proj" in state_dict or "visual.attnpool.c_proj.weight" in state_dict)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def _root_messages_dropped(prefix: str):
    """open_clip logs on the root logger; drop its records starting with `prefix` for the duration."""
    quiet, root = _DropMessages(prefix), logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _architecture(name: str) -> torch.nn.Module:
    """open_clip's `name` with fresh weights that the caller replaces: open_clip's "initialized randomly" warning
    would mislead, so it is dropped here and only here."""
    with _root_messages_dropped("No pretrained weights loaded"):
        return open_clip.create_model(name, pretrained=None)


def _model_from_checkpoint(name: str | None, checkpoint: Path) -> torch.nn.Module:
    if not checkpoint.is_file():
        raise ModelLoadError(
            f"model.checkpoint={str(checkpoint)!r} does not exist; give the path of a .safetensors or .pt CLIP "
            "state dict (open_clip or OpenAI key names)"
        )
    try:
        state_dict = load_state_dict(str(checkpoint))
    except Exception as err:  # torch/safetensors raise many types, with pages of advice, for non-checkpoints
        raise ModelLoadError(
            f"model.checkpoint={str(checkpoint)!r} is not a readable state dict ({type(err).__name__}; details in "
            "app.log); give a .safetensors or .pt file of CLIP weights (open_clip or OpenAI key names)"
        ) from err
    if name:
        model = _architecture(name)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
            raise ModelLoadError(
                f"model.checkpoint={str(checkpoint)!r} does not fit architecture {name!r} "
                f"({str(err).splitlines()[0]}); set model.name to the checkpoint's architecture, or to null to infer it"
            ) from err
        return model
    if not _state_dict_is_openai_format(state_dict):
        raise ModelLoadError(
            f"cannot infer the architecture of {str(checkpoint)!r}; set model.name to its open_clip architecture"
        )
    # The helper casts to fp16 on the way (OpenAI's own convention); we cast back to the requested precision.
    return build_model_from_openai_state_dict(dict(state_dict), cast_dtype=None).float()


def _model_from_tag(name: str, pretrained: str, cache_dir: str | None) -> torch.nn.Module:
    reason = offline_reason()
    try:
        # open_clip logs its own download failure; the error below says it once, with the fix.
        with hub_requests_off(reason is not None), _root_messages_dropped("Failed to download weights"):
            return open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
    except Exception as err:  # offline hub errors come in many types
        where = cache_dir or "the Hugging Face / open_clip default cache (~/.cache)"
        why = (f"not in {where}, and the hub is {reason}" if reason else
               f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise ModelLoadError(
            f"could not load pretrained weights {name}/{pretrained}: {why} -- download them once on a machine "
            "with network (they are cached), or point model.checkpoint at a local .safetensors/.pt file"
        ) from err


def load_clip(
    name: str | None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    random_init: bool = False,
) -> ClipBundle:
    """Build a CLIP model, its preprocessing and tokenizer.

    Exactly one weight source: `pretrained` (open_clip tag, or "bundled" for models shipped in the package),
    `checkpoint` (local file), or `random_init=True`.
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"model.precision={precision!r} is not one of {sorted(PRECISIONS)}")
    sources = [s for s in (pretrained, checkpoint, random_init or None) if s]
    if len(sources) != 1:
        raise ModelLoadError(
            f"give exactly one weight source (model.pretrained={pretrained!r}, model.checkpoint={checkpoint!r}, "
            f"model.random_init={random_init}); random weights are used only with model.random_init=true"
        )
    if name:
        _check_name_and_tag(name, pretrained)
    elif not checkpoint:
        raise ModelLoadError("model.name is empty; name an open_clip architecture, e.g. model.name=ViT-B-32")

    if checkpoint:
        model, source = _model_from_checkpoint(name, Path(checkpoint)), f"checkpoint {checkpoint}"
    elif pretrained == "bundled":
        if name not in BUNDLED_MODELS:
            raise ModelLoadError(f"model.pretrained=bundled but {name!r} is not bundled; bundled: {list(BUNDLED_MODELS)}")
        weights = register_bundled(name) / f"{name}.safetensors"
        model, source = _model_from_checkpoint(name, weights), f"bundled {weights.name}"
    elif pretrained:
        model, source = _model_from_tag(name, pretrained, cache_dir), f"pretrained {pretrained}"
    else:
        log.warning("!" * 72)
        log.warning("RANDOM-INITIALISED %s: model.random_init=true. Scores and maps are meaningless.", name)
        log.warning("!" * 72)
        model, source = open_clip.create_model(name, pretrained=None), "RANDOM INIT"

    dev, dtype = resolve_device(device), PRECISIONS[precision]
    model = model.to(device=dev, dtype=dtype).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    preprocess = image_transform(size, is_train=False, mean=mean, std=std)
    context_length = int(model.context_length)
    tokenizer = open_clip.get_tokenizer(name, context_length=context_length) if name else open_clip.SimpleTokenizer(context_length=context_length)
    return ClipBundle(model, preprocess, tokenizer, context_length, name or "openai-format checkpoint", source, dev, dtype)
