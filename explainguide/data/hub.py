"""Hugging Face sources that never hang: `load_hf_split` (a `datasets` hub id or a save_to_disk folder),
`download_snapshot` (a hub dataset repo's files) and `HFImages`, the (PIL image, label) view of a split.

Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the hub not answering within a few seconds) means the
local cache only: no retries, no timeouts. A cache miss is one DatasetError line naming the id, the cache
folder and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch.utils.data import Dataset

from explainguide.data.base import DatasetError, SplitNotFound, image_from_bytes
from explainguide.images import load_image
from explainguide.offline import hub_requests_off, offline_reason


def _not_cached(hf_id: str, cache: str, variable: str, reason: str) -> DatasetError:
    return DatasetError(
        f"dataset.hf_id={hf_id!r} is not in the local cache {cache} and the hub is {reason}; run once online to "
        f"cache it (or point {variable} or dataset.root at a cache that has it), or set dataset.hf_id to a local copy")


def load_hf_split(hf_id: str, hf_config: str | None, split: str, cache_dir: str | None):
    """Split `split` of a save_to_disk folder, a local data folder, or a hub dataset (cached in `cache_dir`)."""
    import datasets

    folder = Path(hf_id).expanduser()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return _saved_split(datasets.load_from_disk(str(folder)), split, hf_id)
    if hf_id.startswith(("/", ".", "~")) and not folder.is_dir():  # a path, never a hub id ("owner/name")
        raise DatasetError(f"dataset.hf_id={hf_id!r} is not a folder; give the folder written by save_to_disk "
                           "(or a local data folder), or a hub id such as 'owner/name'")
    reason = None if folder.is_dir() else offline_reason()
    download = datasets.DownloadConfig(max_retries=0, local_files_only=True) if reason else None
    with hub_requests_off(reason is not None):
        try:
            return datasets.load_dataset(hf_id, hf_config, split=split, cache_dir=cache_dir,
                                         download_config=download)
        except (ConnectionError, FileNotFoundError) as err:
            if reason is not None:
                raise _not_cached(hf_id, str(cache_dir or datasets.config.HF_DATASETS_CACHE), "HF_DATASETS_CACHE",
                                  reason) from None
            raise DatasetError(f"dataset.hf_id={hf_id!r} could not be loaded ({type(err).__name__}: {err}); "
                               f"check the id, or log in for gated datasets") from None
        except ValueError as err:
            if "split" not in str(err):
                raise
            available = re.findall(r"'([^']+)'", str(err).partition("one of")[2])  # datasets lists them so
            if not available:
                raise DatasetError(f"dataset.hf_id={hf_id!r} has no split {split!r} ({err}); map the task's split "
                                   "to one it has with dataset.split_map") from None
            raise SplitNotFound(f"dataset.hf_id={hf_id!r}", split, available) from None


def _saved_split(saved, split: str, hf_id: str):
    """A saved DatasetDict gives its `split`; a saved single Dataset is used as is, whatever the split."""
    if not hasattr(saved, "keys"):
        return saved
    if split not in saved:
        raise SplitNotFound(f"dataset.hf_id={hf_id!r}", split, sorted(saved))
    return saved[split]


def download_snapshot(repo_id: str, patterns: list[str], cache_dir: str | None) -> Path:
    """The local folder of hub dataset repo `repo_id` with (at least) the files matching `patterns`."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    reason = offline_reason()
    with hub_requests_off(reason is not None):
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns,
                                                          cache_dir=cache_dir,
                                                          local_files_only=reason is not None))
        except LocalEntryNotFoundError:
            raise _not_cached(repo_id, str(cache_dir or constants.HF_HUB_CACHE), "HF_HUB_CACHE",
                              reason or "not answering") from None
        except RepositoryNotFoundError:
            raise DatasetError(f"dataset.hf_id={repo_id!r} is not a dataset repo on the hub; check the id, "
                               f"or log in for gated datasets") from None


class HFImages(Dataset):
    """(PIL image, label) rows of a `datasets.Dataset`, read from `image_column` and `label_column`.

    `classnames` comes from a ClassLabel label column (None for plain integers); `labels` is read once,
    without decoding images.
    """

    def __init__(self, table, image_column: str, label_column: str, where: str):
        from datasets import ClassLabel, Image, Value

        for option, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in table.column_names:
                raise DatasetError(f"dataset.{option}={column!r} is not a column of {where}; "
                                   f"its columns: {table.column_names}")
        feature = table.features[label_column]
        if not (isinstance(feature, ClassLabel) or (isinstance(feature, Value) and "int" in feature.dtype)):
            raise DatasetError(f"dataset.label_column={label_column!r} of {where} holds {feature}; "
                               f"pick a ClassLabel or integer column")
        self.classnames = list(feature.names) if isinstance(feature, ClassLabel) else None
        self.labels = [int(label) for label in table.with_format(None)[label_column]]
        if any(label < 0 for label in self.labels):
            raise DatasetError(f"{where} has unlabelled rows (label -1) in {label_column!r}; "
                               f"pick a labelled split with dataset.split_map")
        image_feature = table.features[image_column]
        if isinstance(image_feature, Image):
            # Raw bytes: decoded here like any other source, not by `datasets`.
            table = table.cast_column(image_column, Image(decode=False))
        elif image_feature != Value("string"):
            raise DatasetError(f"dataset.image_column={image_column!r} of {where} holds {image_feature}; "
                               f"pick an Image column or a column of file paths")
        self.table, self.image_column, self.where = table.select_columns([image_column]), image_column, where

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        value = self.table[index][self.image_column]
        if isinstance(value, str):
            return load_image(value), self.labels[index]
        if value.get("bytes") is not None:
            return image_from_bytes(value["bytes"], f"{self.where}[{index}]"), self.labels[index]
        return load_image(value["path"]), self.labels[index]
