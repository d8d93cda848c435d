"""What every dataset builder shares: the `ClassificationDataset` it returns, the `DatasetError` it raises,
and decoding of in-memory image bytes (tar members, Arrow rows)."""

from __future__ import annotations

import io
from typing import Callable, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

# load_image reads files only; bytes from shards and Arrow rows go through its colour conversion so every
# source gets the same RGB (alpha over white, 16-bit gray scaled, EXIF orientation applied).
from explainguide.images import _to_rgb

WHITE = (255, 255, 255)


class DatasetError(ValueError):
    """A dataset could not be built; the message names the value and the fix."""


class SplitNotFound(DatasetError):
    """A source lacks the split asked for: `where` (e.g. "dataset.root='data'") has `available` splits, not
    `missing`. `build_dataset` words the fix, since only it knows whether dataset.split_map already renamed it."""

    def __init__(self, where: str, missing: str, available: list[str]):
        self.where, self.missing, self.available = where, missing, available
        super().__init__(f"{where} has no split {missing!r}; its splits: {available}")


class ClassificationDataset(Dataset):
    """(transform(image), label) items of `base`, with `classnames`, `templates` and every item's label.

    `labels` is known without decoding any image, so k-shot sampling and class counts stay cheap.
    `classnames` may be None straight out of a builder whose source has no names; `build_dataset` fills it.
    """

    def __init__(self, base, transform: Callable, classnames: list[str] | None, templates: list[str],
                 labels: Sequence[int]):
        if len(labels) != len(base):
            raise DatasetError(f"{len(labels)} labels for {len(base)} images; the source is inconsistent")
        self.base, self.transform = base, transform
        self.classnames, self.templates, self.labels = classnames, templates, [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label

    def subset(self, indices: Sequence[int]) -> ClassificationDataset:
        """The items at `indices`, in that order, with the same class names and templates."""
        indices = [int(index) for index in indices]
        return ClassificationDataset(Subset(self.base, indices), self.transform, self.classnames, self.templates,
                                     [self.labels[index] for index in indices])


def image_from_bytes(data: bytes, where: str) -> Image.Image:
    """Decode an encoded image (PNG, JPEG, WebP, ...) to RGB as `load_image` would decode the same file."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img), WHITE)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        reason = "unknown image format" if isinstance(err, UnidentifiedImageError) else f"{type(err).__name__}: {err}"
        raise DatasetError(f"{where}: not a readable image ({reason}); re-encode or drop this sample") from None
