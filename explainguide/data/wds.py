"""The CLIP_benchmark webdataset layout, read with the stdlib `tarfile`:

    <folder>/classnames.txt                          one class name a line, line i = label i
    <folder>/zeroshot_classification_templates.txt   one template a line, "{c}" for the class name
    <folder>/<split>/*.tar                           uncompressed shards of <key>.webp|jpg|jpeg|png + <key>.cls

Shards are indexed once (member offsets and labels); an item is one seek and read, so the dataset supports
random access and any DataLoader sampler.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from torch.utils.data import Dataset

from explainguide.data.base import DatasetError, SplitNotFound, image_from_bytes

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
IMAGE_EXTENSIONS = ("webp", "jpg", "jpeg", "png")  # first present wins when a sample has several


def read_classnames(folder: Path) -> list[str]:
    path = folder / CLASSNAMES_FILE
    if not path.is_file():
        raise DatasetError(f"{folder}: no {CLASSNAMES_FILE}; a webdataset folder needs one class name a line")
    # Blank lines are kept: they are (unnamed) classes, and dropping them would shift every later label.
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def read_templates(folder: Path) -> list[str]:
    """The folder's own templates with "{}" placeholders; [] when it ships none."""
    path = folder / TEMPLATES_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip().replace("{c}", "{}") for line in lines if line.strip()]


def _shard_order(path: Path):
    # "10.tar" after "9.tar": shards written as %d.tar must keep their numeric order.
    return (not path.stem.isdigit(), int(path.stem) if path.stem.isdigit() else 0, path.name)


class WdsShards(Dataset):
    """(PIL image, label) samples of `<folder>/<split>/*.tar`, in shard then member order."""

    def __init__(self, folder: Path, split: str):
        split_folder = folder / split
        shards = sorted(split_folder.glob("*.tar"), key=_shard_order)
        if not split_folder.is_dir():
            present = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
            raise SplitNotFound(str(folder), split, present)
        if not shards:
            raise DatasetError(f"{split_folder}: no *.tar shards; put the split's shards there, or map the task's "
                               "split to another folder with dataset.split_map")
        self.items: list[tuple[Path, int, int, str]] = []  # shard, data offset, size, name for errors
        self.labels: list[int] = []
        for shard in shards:
            self._index(shard)

    def _index(self, shard: Path) -> None:
        try:
            with tarfile.open(shard, "r:") as tar:
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in tar:
                    if member.isfile():
                        folder, _, filename = member.name.rpartition("/")
                        stem, _, extension = filename.partition(".")
                        samples.setdefault(f"{folder}/{stem}", {})[extension.lower()] = member
                for key, parts in samples.items():
                    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
                    if image is None or "cls" not in parts:
                        raise DatasetError(f"{shard}: sample {key.lstrip('/')!r} has only {sorted(parts)}; each "
                                           f"sample needs an image ({'/'.join(IMAGE_EXTENSIONS)}) and a .cls label")
                    self.labels.append(_label(tar.extractfile(parts["cls"]).read(), shard, key))
                    self.items.append((shard, image.offset_data, image.size, f"{shard}:{image.name}"))
        except tarfile.TarError as err:
            raise DatasetError(f"{shard}: not an uncompressed tar shard ({err}); re-download or repack it") from None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        shard, offset, size, where = self.items[index]
        with open(shard, "rb") as file:
            file.seek(offset)
            data = file.read(size)
        return image_from_bytes(data, where), self.labels[index]


def _label(data: bytes, shard: Path, key: str) -> int:
    try:
        return int(data)
    except ValueError:
        raise DatasetError(f"{shard}: {key.lstrip('/')}.cls holds {data[:20]!r}, not an integer label; "
                           f"labels must be 0-based class indices") from None
