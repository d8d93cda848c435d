"""Image generators for CLIP guidance: one front door, `build_generator(name, size, **options)`.

A new generator is one `Generator` subclass (a module here, registered in GENERATORS) plus one YAML file in
conf/generator/. `make_cutouts` turns a generated image (and its masks) into augmented CLIP inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from explainguide.generators.base import Generator, GeneratorError
from explainguide.generators.biggan import BigGANGenerator
from explainguide.generators.cutouts import CutoutError, check_cutout_scale, make_cutouts
from explainguide.generators.fft import FourierGenerator
from explainguide.generators.pixel import PixelGenerator
from explainguide.generators.vqgan import VQGANGenerator

GENERATORS: dict[str, type[Generator]] = {
    "pixel": PixelGenerator,
    "fft": FourierGenerator,
    "vqgan": VQGANGenerator,
    "biggan": BigGANGenerator,
}


def build_generator(name: str, size: int | Sequence[int], **options) -> Generator:
    """The generator `name` producing (1, 3, H, W) images; `size` is an int (square) or [H, W].

    `options` are the generator's keyword arguments (see its class); unknown ones are one clear error.
    """
    if name not in GENERATORS:
        raise GeneratorError(f"unknown generator={name!r}; use one of {sorted(GENERATORS)}")
    cls = GENERATORS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "size")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise GeneratorError(f"generator={name} has no option(s) {unknown}; its options are {accepted}")
    return cls(size, **options)


__all__ = [
    "GENERATORS",
    "CutoutError",
    "Generator",
    "GeneratorError",
    "build_generator",
    "check_cutout_scale",
    "make_cutouts",
]
