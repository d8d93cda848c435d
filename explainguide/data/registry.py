"""One front door for classification datasets: `build_dataset(name, split, preprocess, ...)`.

Every builder returns a torch Dataset of (image tensor, label) with `classnames` and `templates` attributes.
A new dataset is one builder function here plus one YAML file in conf/dataset/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms.functional import to_pil_image

from explainguide.data.templates import COMPARISON_TEMPLATES
from explainguide.images import list_images, load_image


class DatasetError(ValueError):
    """A dataset could not be built; the message names the value and the fix."""


class _Transformed(Dataset):
    """Applies `transform` to the image of each (image, label) item; keeps classnames and templates."""

    def __init__(self, base, transform: Callable, classnames: list[str], templates: list[str]):
        self.base, self.transform, self.classnames, self.templates = base, transform, classnames, templates

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


def _build_shapes(split: str, preprocess: Callable, root: str | None, seed: int, size: int | None, **_):
    from explainguide.data.shapes import ShapesClassification

    base = ShapesClassification(split=split, n=size, seed=seed)
    # Shapes images are [0, 1] tensors; going through PIL gives every model its own resize and normalisation.
    return _Transformed(base, lambda image: preprocess(to_pil_image(image)), base.classnames, base.templates)


class _ImageFolder(Dataset):
    def __init__(self, root: Path):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DatasetError(f"dataset.root={str(root)!r} has no class sub-folders; use one folder per class")
        self.items = [(path, label) for label, name in enumerate(classes) for path in list_images(root / name)]
        self.classnames = [name.replace("_", " ") for name in classes]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        return load_image(path), label


def _build_image_folder(split: str, preprocess: Callable, root: str | None, templates: list[str] | None = None, **_):
    if not root:
        raise DatasetError("dataset=image_folder needs dataset.root=<folder with one sub-folder per class>")
    folder = Path(root) / split if (Path(root) / split).is_dir() else Path(root)
    if not folder.is_dir():
        raise DatasetError(f"dataset.root={str(root)!r} does not exist; point it at an image folder")
    base = _ImageFolder(folder)
    return _Transformed(base, preprocess, base.classnames, list(templates or COMPARISON_TEMPLATES))


DATASETS: dict[str, Callable[..., Dataset]] = {"shapes": _build_shapes, "image_folder": _build_image_folder}


def build_dataset(
    name: str,
    split: str,
    preprocess: Callable,
    root: str | None = None,
    seed: int = 0,
    size: int | None = None,
    limit: int | None = None,
    templates: list[str] | None = None,
) -> Dataset:
    """The `split` of dataset `name`, images passed through `preprocess`; at most `limit` items (evenly spaced)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    dataset = DATASETS[name](split=split, preprocess=preprocess, root=root, seed=seed, size=size, templates=templates)
    if templates:
        dataset.templates = list(templates)
    if limit is not None and limit < len(dataset):
        indices = torch.linspace(0, len(dataset) - 1, limit).long().tolist()
        subset = Subset(dataset, indices)
        subset.classnames, subset.templates = dataset.classnames, dataset.templates
        dataset = subset
    return dataset
