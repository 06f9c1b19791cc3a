"""Evaluation datasets: the built-in stdlib-docstrings task and a loader for labelled text files."""

from planner.data.dataset import (
    SPLITS,
    DatasetError,
    Split,
    TextDataset,
    builtin_dataset_path,
    engine_data_dir,
    load_builtin_dataset,
    load_dataset,
)
from planner.data.docstrings import build_dataset

__all__ = [
    "SPLITS",
    "DatasetError",
    "Split",
    "TextDataset",
    "build_dataset",
    "builtin_dataset_path",
    "engine_data_dir",
    "load_builtin_dataset",
    "load_dataset",
]
