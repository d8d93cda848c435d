"""One front door for classification datasets: `build_dataset(name, split, preprocess, ...)`.

Every builder returns a `ClassificationDataset` of (image tensor, label) with `classnames`, `templates` and
`labels`. A new dataset is one builder function here plus one YAML file in conf/dataset/; a builder's own
config keys are its keyword parameters, and `build_dataset` passes them through and rejects any others.

Keys every dataset config has (handled here, the same for every builder): name, root, seed, size, limit,
templates, template_set (coop | imagenet80 | own), benchmark (a benchmarks.json entry: CoOp template and
class-name fixes), classnames_file, split_map.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Callable, Mapping

import torch
from torchvision.transforms import Compose
from torchvision.transforms.functional import to_pil_image

from explainguide.data.base import ClassificationDataset, DatasetError, SplitNotFound
from explainguide.data.benchmarks import resolve_classnames, resolve_templates
from explainguide.data.templates import COMPARISON_TEMPLATES, SIMPLE_TEMPLATES
from explainguide.images import list_images, load_image

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "val", "test")  # image_folder: split sub-folders, when the root has them

__all__ = ["DATASETS", "ClassificationDataset", "DatasetError", "build_dataset"]


def _build_shapes(split: str, preprocess: Callable, root: str | None, seed: int, size: int | None):
    from explainguide.data.shapes import ShapesClassification

    base = ShapesClassification(split=split, n=size, seed=seed)
    labels = [index % len(base.classnames) for index in range(len(base))]  # item i is class i % C, by design
    # Shapes images are [0, 1] tensors; going through PIL gives every model its own resize and normalisation.
    return ClassificationDataset(base, Compose([to_pil_image, preprocess]), base.classnames, base.templates, labels)


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class _ImageFolder(torch.utils.data.Dataset):
    """The images of `root`/<class>/ for each of `classes` (label = index in `classes`; a missing folder: none)."""

    def __init__(self, root: Path, classes: list[str]):
        if not classes:
            raise DatasetError(f"dataset.root={str(root)!r} has no class sub-folders; use one folder per class")
        self.items = [(path, label) for label, name in enumerate(classes) if (root / name).is_dir()
                      for path in list_images(root / name)]
        self.classnames = classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        return load_image(path), label


def _build_image_folder(split: str, preprocess: Callable, root: str | None, seed: int, size: int | None):
    if not root:
        raise DatasetError("dataset=image_folder needs dataset.root=<folder with one sub-folder per class>")
    root_dir = Path(root)
    if not root_dir.is_dir():
        raise DatasetError(f"dataset.root={str(root)!r} does not exist; point it at an image folder")
    splits = sorted(name for name in SPLIT_FOLDERS if (root_dir / name).is_dir())
    if (root_dir / split).is_dir():
        folder = root_dir / split
    elif splits:
        raise SplitNotFound(f"dataset.root={str(root)!r}", split, splits)
    else:
        log.warning("dataset.root=%s has no split folders: split %r is the whole folder (few-shot training images "
                    "are then test images too); use %s/ sub-folders to keep them apart", root, split,
                    "/ ".join(SPLIT_FOLDERS))
        folder = root_dir
    # Labels must mean the same class in every split: the class list is the union of all split folders' classes.
    per_split = {name: set(_class_folders(root_dir / name)) for name in splits} or {split: set(_class_folders(folder))}
    classes = sorted(set().union(*per_split.values()))
    lacking = sorted(set(classes) - per_split.get(split, set(classes)))
    if lacking:  # said by the split that lacks them, so a run building train and test says each fact once
        log.warning("dataset.root=%s: %s/ lacks %s, which other split folders hold; labels follow the union of "
                    "their %d classes", root, split, lacking, len(classes))
    base = _ImageFolder(folder, classes)
    return ClassificationDataset(base, preprocess, base.classnames, list(COMPARISON_TEMPLATES),
                                 [label for _, label in base.items])


def _build_hf(split: str, preprocess: Callable, root: str | None, seed: int, size: int | None,
              hf_id: str | None = None, hf_config: str | None = None, image_column: str = "image",
              label_column: str = "label"):
    """A `datasets` hub id or save_to_disk folder; `root` caches hub downloads (null: HF_DATASETS_CACHE)."""
    from explainguide.data.hub import HFImages, load_hf_split

    if not hf_id:
        raise DatasetError("dataset=hf needs dataset.hf_id=<hub id, or a save_to_disk folder>")
    base = HFImages(load_hf_split(hf_id, hf_config, split, cache_dir=root), image_column, label_column,
                    where=f"{hf_id}[{split}]")
    # Arrow datasets carry no prompts; their own set is CLIP's plain one.
    return ClassificationDataset(base, preprocess, base.classnames, list(SIMPLE_TEMPLATES), base.labels)


def _build_wds(split: str, preprocess: Callable, root: str | None, seed: int, size: int | None,
               hf_id: str | None = None):
    """A CLIP_benchmark webdataset folder, or a hub repo in that layout fetched to `root` (null: HF_HUB_CACHE)."""
    from explainguide.data.hub import download_snapshot
    from explainguide.data.wds import CLASSNAMES_FILE, TEMPLATES_FILE, WdsShards, read_classnames, read_templates

    if not hf_id:
        raise DatasetError("dataset=wds needs dataset.hf_id=<hub repo like clip-benchmark/wds_vtab-pets, "
                           "or a local folder in that layout>")
    folder = Path(hf_id).expanduser()
    if not folder.is_dir():
        folder = download_snapshot(hf_id, [CLASSNAMES_FILE, TEMPLATES_FILE, f"{split}/*"], cache_dir=root)
    base = WdsShards(folder, split)
    templates = read_templates(folder)
    if not templates:
        log.warning("%s has no %s: its own templates are %s (dataset.template_set=imagenet80 or "
                    "dataset.templates=[...] choose others)", folder, TEMPLATES_FILE, SIMPLE_TEMPLATES)
    return ClassificationDataset(base, preprocess, read_classnames(folder), templates or list(SIMPLE_TEMPLATES),
                                 base.labels)


DATASETS: dict[str, Callable[..., ClassificationDataset]] = {
    "shapes": _build_shapes,
    "image_folder": _build_image_folder,
    "hf": _build_hf,
    "wds": _build_wds,
}
_COMMON = {"split", "preprocess", "root", "seed", "size"}


def _split_fix(err: SplitNotFound, split: str) -> str:
    """The missing-split message with its fix: map the task's split to one the source has (never test -> train)."""
    candidates = [name for name in err.available if name != "train"] if split != "train" else err.available
    example = f"'dataset.split_map={{{split}: {(candidates or ['<one of them>'])[-1]}}}'"
    if err.missing != split:
        return (f"{err.where} has no split {err.missing!r}, which dataset.split_map maps {split!r} to; its splits: "
                f"{err.available}; map {split!r} to one of them, e.g. {example}")
    return f"{err.where} has no split {split!r}; its splits: {err.available}; add it, or map it, e.g. {example}"


def build_dataset(
    name: str,
    split: str,
    preprocess: Callable,
    root: str | None = None,
    seed: int = 0,
    size: int | None = None,
    limit: int | None = None,
    templates: list[str] | None = None,
    template_set: str = "own",
    benchmark: str | None = None,
    classnames_file: str | None = None,
    split_map: Mapping[str, str] | None = None,
    **options,
) -> ClassificationDataset:
    """The `split` of dataset `name`, images passed through `preprocess`; at most `limit` items (evenly spaced).

    `split_map` renames splits for the source ({test: validation}); `options` go to the builder.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    builder = DATASETS[name]
    accepted = set(inspect.signature(builder).parameters) - _COMMON
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DatasetError(f"dataset={name} has no option(s) {['dataset.' + key for key in unknown]}; "
                           f"its options: {sorted(accepted) or 'none'}; remove them or pick another dataset")
    source_split = (split_map or {}).get(split, split)
    try:
        dataset = builder(split=source_split, preprocess=preprocess, root=root, seed=seed, size=size, **options)
    except SplitNotFound as err:
        raise DatasetError(_split_fix(err, split)) from None
    dataset.classnames = resolve_classnames(dataset.classnames, dataset.labels, benchmark, classnames_file)
    dataset.templates = resolve_templates(template_set, benchmark, dataset.templates, templates)
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(torch.linspace(0, len(dataset) - 1, limit).long().tolist())
    return dataset
