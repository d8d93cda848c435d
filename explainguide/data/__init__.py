"""Datasets: a registry of builders (`build_dataset`), templates as data, and the embedded shapes world."""

from explainguide.data.registry import DATASETS, DatasetError, build_dataset

__all__ = ["DATASETS", "DatasetError", "build_dataset"]
