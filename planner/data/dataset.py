"""Labelled text-classification datasets with fixed splits, stored as gzipped JSON lines.

A dataset file holds one JSON object per line: ``{"text", "label", "split", "source"}`` with
`split` one of ``train`` / ``calibration`` / ``test``.  The SHA-256 of the file's bytes is
checked on load so a corrupt or edited file is refused with a clear error instead of silently
moving every accuracy figure.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.specs import PlanError

__all__ = [
    "SPLITS",
    "DatasetError",
    "Split",
    "TextDataset",
    "builtin_dataset_path",
    "engine_data_dir",
    "load_builtin_dataset",
    "load_dataset",
]

SPLITS: tuple[str, ...] = ("train", "calibration", "test")
_HERE = Path(__file__).parent
_BUILTIN = _HERE / "stdlib_docstrings.jsonl.gz"


class DatasetError(PlanError):
    """A dataset file is missing, corrupt or malformed; the message names the file."""


def engine_data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Where trained heads and caches live: `path`, else $EDGEFIT_DATA_DIR, else ./var/engine."""
    chosen = Path(path) if path is not None else Path(os.environ.get("EDGEFIT_DATA_DIR") or "var/engine")
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


@dataclass(frozen=True)
class Split:
    """The texts of one split with integer labels (indices into `TextDataset.classes`)."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextDataset:
    """A labelled dataset with fixed train / calibration / test splits.

    `sha256` identifies the content (it keys every cache built from the dataset).
    """

    name: str
    classes: tuple[str, ...]
    splits: dict[str, Split] = field(hash=False)
    sha256: str

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DatasetError(f"dataset {self.name!r} has no split {name!r} (has {', '.join(self.splits)})")
        return self.splits[name]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subsample(self, split: str, n: int, seed: int = 0) -> TextDataset:
        """A copy whose `split` keeps `n` seeded-random rows (original order); new hash."""
        part = self.split(split)
        if n >= len(part):
            return self
        keep = sorted(random.Random(seed).sample(range(len(part)), n))
        small = Split(split, tuple(part.texts[i] for i in keep), tuple(part.labels[i] for i in keep))
        digest = hashlib.sha256(f"{self.sha256}|{split}|{n}|{seed}".encode()).hexdigest()
        return TextDataset(self.name, self.classes, {**self.splits, split: small}, digest)

    @classmethod
    def from_records(
        cls, name: str, records: Sequence[dict[str, Any]], classes: Sequence[str] | None = None
    ) -> TextDataset:
        """Build from ``{"text", "label", "split"}`` dicts; the hash covers texts, labels and splits."""
        labels = sorted({str(r["label"]) for r in records}) if classes is None else list(classes)
        index = {c: i for i, c in enumerate(labels)}
        texts: dict[str, list[str]] = {s: [] for s in SPLITS}
        ys: dict[str, list[int]] = {s: [] for s in SPLITS}
        for i, r in enumerate(records):
            try:
                text, label, split = str(r["text"]), str(r["label"]), str(r["split"])
            except (KeyError, TypeError) as exc:
                raise DatasetError(f"dataset {name!r}: record {i} lacks text/label/split") from exc
            if split not in texts:
                raise DatasetError(f"dataset {name!r}: record {i} has unknown split {split!r}")
            if label not in index:
                raise DatasetError(f"dataset {name!r}: record {i} has unknown label {label!r}")
            texts[split].append(text)
            ys[split].append(index[label])
        body = json.dumps([labels, texts, ys], sort_keys=True).encode()
        digest = hashlib.sha256(body).hexdigest()
        splits = {s: Split(s, tuple(texts[s]), tuple(ys[s])) for s in SPLITS}
        return cls(name=name, classes=tuple(labels), splits=splits, sha256=digest)


def _expected_digest(path: Path) -> str | None:
    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        return None
    return side.read_text().split()[0].strip().lower()


def load_dataset(
    path: str | os.PathLike[str], sha256: str | None = None, name: str | None = None
) -> TextDataset:
    """Load a gzipped JSON-lines dataset, verifying its SHA-256.

    Steps: read the bytes; compare their SHA-256 with `sha256` (or the ``<file>.sha256`` file next
    to it, when present) and refuse a mismatch; decompress and parse line by line, naming the
    line of any malformed record.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file {p} is missing")
    blob = p.read_bytes()
    expected = sha256 or _expected_digest(p)
    actual = hashlib.sha256(blob).hexdigest()
    if expected is not None and actual != expected:
        raise DatasetError(
            f"dataset file {p} is corrupt: SHA-256 {actual[:12]}… "
            f"does not match the expected {expected[:12]}…"
        )
    try:
        lines = gzip.decompress(blob).decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset file {p} is not valid gzipped UTF-8 JSON lines: {exc}") from exc
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"dataset file {p}, line {n}: invalid JSON ({exc.msg})") from exc
    return TextDataset.from_records(name or p.name.split(".")[0], records)


def builtin_dataset_path() -> Path:
    return _BUILTIN


def load_builtin_dataset() -> TextDataset:
    """The committed stdlib-docstrings task (10 classes), hash-verified."""
    return load_dataset(_BUILTIN, name="stdlib_docstrings")
