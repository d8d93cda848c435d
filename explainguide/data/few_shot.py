"""K-shot training sets: which images, chosen reproducibly, recorded as JSON next to the run and reusable.

    indices = sample_k_shot(dataset.labels, k=1, seed=cfg.seed, classnames=dataset.classnames)
    save_indices(output_dir / "shots.json", indices, {"dataset": ..., "k": 1, "seed": cfg.seed})
    train = dataset.subset(load_indices(output_dir / "shots.json").indices)
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Sequence

from explainguide.data.base import DatasetError


class Shots(NamedTuple):
    indices: list[int]
    meta: dict


def sample_k_shot(labels: Sequence[int], k: int, seed: int, classnames: Sequence[str] | None = None) -> list[int]:
    """`k` dataset indices per class, sorted.

    Each class draws from its own generator seeded by (seed, k, class), so the shots depend on nothing else:
    runs that differ only in λ, model or the other classes get the same images. With `classnames`, a class
    absent from `labels` is an error too.
    """
    if k < 1:
        raise DatasetError(f"k={k}: a k-shot set needs k >= 1 images per class")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    classes = range(len(classnames)) if classnames is not None else sorted(by_class)
    chosen: list[int] = []
    for label in classes:
        pool = by_class.get(label, [])
        if len(pool) < k:
            name = f" ({classnames[label]!r})" if classnames is not None else ""
            raise DatasetError(f"class {label}{name} has {len(pool)} images, fewer than k={k}; "
                               f"lower k or use a split with more images")
        # A string seed is hashed with SHA-512 by `random`: stable across runs, processes and platforms.
        chosen += random.Random(f"{seed}/{k}/{label}").sample(pool, k)
    return sorted(chosen)


def save_indices(path: str | Path, indices: Sequence[int], meta: dict) -> Path:
    """Write `indices` and `meta` (JSON-serialisable: dataset, split, k, seed, ...) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"indices": [int(index) for index in indices], "meta": meta}, indent=2) + "\n",
                    encoding="utf-8")
    return path


SHOTS_FILE = "shots.json"  # the name a prompt-learning run gives its K-shot sample


def load_indices(path: str | Path) -> Shots:
    """The indices and meta written by `save_indices`, from the file or a run dir holding SHOTS_FILE."""
    path = Path(path)
    if path.is_dir():
        path = path / SHOTS_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: no such k-shot file; point at a run dir or the {SHOTS_FILE} of an earlier run")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not a k-shot file ({err}); point at a shots JSON written by an earlier run") from err
    if not isinstance(record, dict) or "indices" not in record:
        raise DatasetError(f"{path}: not a k-shot file (no 'indices'); point at a shots JSON from save_indices")
    return Shots([int(index) for index in record["indices"]], dict(record.get("meta", {})))
