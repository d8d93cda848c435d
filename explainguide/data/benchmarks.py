"""Zero-shot benchmark metadata as data (benchmarks.json) and the rules that turn it into class names and
templates.

benchmarks.json has one entry per benchmark (the 11 CoOp datasets and the ImageNet variants):

* ``coop``: CoOp's hand-written template for the dataset (a one-item list);
* ``classnames`` (optional): a named list from `CLASSNAME_LISTS` that replaces the source's names
  (ImageNet's 1000 CLIP-cleaned names, taken from open_clip);
* ``rename`` (optional): raw source name -> the name CoOp uses; keyed by name, so any label order works;
* ``clean`` (optional): steps from `CLEANERS` applied to raw source names.

Other benchmarks take their class names from the dataset itself at load time (ClassLabel, classnames.txt,
folder names): writing fixed lists here would silently mislabel any source whose label order differs.
ImageNet-A and -R label 200-class subsets of ImageNet; their index lists are not written here either, so
their names come from the dataset (CLIP_benchmark's classnames.txt holds the right 200).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable, Sequence

from explainguide.data.base import DatasetError

log = logging.getLogger(__name__)

BENCHMARKS: dict[str, dict] = json.loads(Path(__file__).with_name("benchmarks.json").read_text(encoding="utf-8"))


def _imagenet1k() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet80() -> list[str]:
    """CLIP's 80 ImageNet prompt templates, with "{}" for the class name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    # open_clip keeps them as lambdas; formatting with "{}" turns each back into its template string.
    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def _reverse_path(name: str) -> str:
    """SUN397 "/a/apartment_building/outdoor" -> "outdoor apartment_building" (CoOp's order)."""
    parts = [part for part in name.split("/") if part]
    if len(parts) > 1 and len(parts[0]) == 1:
        parts = parts[1:]  # the leading index letter
    return " ".join(reversed(parts))


CLASSNAME_LISTS: dict[str, Callable[[], list[str]]] = {"imagenet1k": _imagenet1k}

CLEANERS: dict[str, Callable[[str], str]] = {
    "lower": str.lower,
    "camel_case": lambda name: re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name),  # UCF101 "ApplyEyeMakeup"
    "reverse_path": _reverse_path,
}


def _entry(benchmark: str | None) -> dict:
    if benchmark is None:
        return {}
    if benchmark not in BENCHMARKS:
        raise DatasetError(f"unknown dataset.benchmark={benchmark!r}; available: {sorted(BENCHMARKS)} or null")
    return BENCHMARKS[benchmark]


def _coop(benchmark: str | None, own: list[str]) -> list[str]:
    if benchmark is None:
        raise DatasetError(f"dataset.template_set=coop needs dataset.benchmark=<one of {sorted(BENCHMARKS)}>; "
                           f"or use dataset.template_set=imagenet80|own")
    return list(_entry(benchmark)["coop"])


TEMPLATE_SETS: dict[str, Callable[[str | None, list[str]], list[str]]] = {
    "coop": _coop,
    "imagenet80": lambda benchmark, own: imagenet80(),
    "own": lambda benchmark, own: list(own),
}


def resolve_templates(template_set: str, benchmark: str | None, own: list[str],
                      explicit: Sequence[str] | None) -> list[str]:
    """`explicit` when given, else the `template_set` (coop | imagenet80 | own) for `benchmark`."""
    if explicit:
        templates = [str(template) for template in explicit]
    elif template_set in TEMPLATE_SETS:
        templates = TEMPLATE_SETS[template_set](benchmark, own)
    else:
        raise DatasetError(f"unknown dataset.template_set={template_set!r}; available: {sorted(TEMPLATE_SETS)}")
    bad = [template for template in templates if template.count("{}") != 1]
    if bad:
        raise DatasetError(f"templates {bad} need exactly one '{{}}' for the class name; "
                           f"write them like 'a photo of a {{}}.'")
    return templates


def resolve_classnames(source: list[str] | None, labels: Sequence[int], benchmark: str | None,
                       classnames_file: str | None) -> list[str]:
    """Class names by precedence: `classnames_file`, the benchmark's fixed list, the source's own names
    (renamed and cleaned per benchmark); always with "_" as a space."""
    entry = _entry(benchmark)
    if classnames_file:
        origin, names = f"dataset.classnames_file={classnames_file!r}", _read_names(classnames_file)
    elif "classnames" in entry:
        origin, names = f"dataset.benchmark={benchmark!r}", CLASSNAME_LISTS[entry["classnames"]]()
    elif source is not None:
        origin, names = "the dataset", [_clean_raw(name, entry) for name in source]
    else:
        raise DatasetError("the dataset has plain integer labels and no class names; "
                           "set dataset.classnames_file=<text file, one class name a line>")
    n_classes = len(source) if source is not None else max(labels, default=-1) + 1
    if len(names) < n_classes or (source is not None and len(names) != len(source)):
        raise DatasetError(f"{origin} gives {len(names)} class names but the dataset has {n_classes} classes; "
                           f"give one name per class, in label order")
    top_label = max(labels, default=-1)
    if top_label >= len(names):
        where = "its class list" if origin == "the dataset" else origin
        raise DatasetError(f"the dataset has label {top_label} but {where} names only {len(names)} classes "
                           f"(labels 0..{len(names) - 1}); give one name per label, in label order")
    if classnames_file and len(names) > top_label + 1:
        log.warning("%s gives %d class names, the labels reach %d: the last %d classes have no images here but "
                    "stay candidates in every prediction", origin, len(names), top_label, len(names) - top_label - 1)
    return [" ".join(name.replace("_", " ").split()) for name in names]


def _clean_raw(name: str, entry: dict) -> str:
    name = entry.get("rename", {}).get(name, name)
    for step in entry.get("clean", []):
        name = CLEANERS[step](name)
    return name


def _read_names(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetError(f"dataset.classnames_file={path!r} does not exist; give a text file, one name a line")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
