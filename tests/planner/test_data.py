"""The built-in stdlib-docstrings task and the dataset loader."""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from planner.data import DatasetError, TextDataset, builtin_dataset_path, load_builtin_dataset, load_dataset
from planner.data.docstrings import FAMILIES, MASK, build_records


@pytest.fixture(scope="module")
def builtin() -> TextDataset:
    return load_builtin_dataset()


def test_builtin_has_ten_balanced_classes(builtin: TextDataset) -> None:
    assert builtin.n_classes == 10
    assert set(builtin.classes) == set(FAMILIES)
    counts: Counter[int] = Counter()
    for split in builtin.splits.values():
        counts.update(split.labels)
    assert all(counts[i] >= 100 for i in range(10)), counts
    total = sum(counts.values())
    assert 2000 <= total <= 3000


def test_builtin_splits_are_60_20_20_and_disjoint(builtin: TextDataset) -> None:
    sizes = {name: len(s) for name, s in builtin.splits.items()}
    total = sum(sizes.values())
    assert abs(sizes["train"] / total - 0.6) < 0.02
    assert abs(sizes["calibration"] / total - 0.2) < 0.02
    texts = [set(s.texts) for s in builtin.splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(t) for t in texts) == total  # no duplicates inside a split either


def test_module_names_are_masked(builtin: TextDataset) -> None:
    leaks = re.compile(
        r"\b(tkinter|asyncio|smtplib|unittest|json|pathlib|decimal|xml|urllib|idlelib)\b", re.I
    )
    texts = [t for s in builtin.splits.values() for t in s.texts]
    assert not [t for t in texts if leaks.search(t)]
    assert sum(MASK in t for t in texts) > 100


def test_builtin_file_is_small_and_hash_pinned() -> None:
    path = builtin_dataset_path()
    assert path.stat().st_size < 1_000_000
    assert path.with_name(path.name + ".sha256").is_file()


def _corrupt_copy(tmp_path: Path) -> Path:
    src = builtin_dataset_path()
    dst = tmp_path / src.name
    blob = bytearray(src.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    dst.write_bytes(bytes(blob))
    sidecar = src.with_name(src.name + ".sha256")
    (tmp_path / sidecar.name).write_text(sidecar.read_text())
    return dst


def test_corrupt_file_is_refused_with_its_name(tmp_path: Path) -> None:
    bad = _corrupt_copy(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(str(bad))):
        load_dataset(bad)


def test_missing_file_and_wrong_hash_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing"):
        load_dataset(tmp_path / "nope.jsonl.gz")
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset(builtin_dataset_path(), sha256="0" * 64)


def test_malformed_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a", "label": "x", "split": "train"}\n{oops\n'))
    with pytest.raises(DatasetError, match="line 2"):
        load_dataset(path)


def test_records_with_unknown_split_are_refused() -> None:
    with pytest.raises(DatasetError, match="split"):
        TextDataset.from_records("d", [{"text": "a", "label": "x", "split": "dev"}])


def test_hash_changes_with_content() -> None:
    recs = [{"text": "a b", "label": "x", "split": "train"}, {"text": "c", "label": "y", "split": "test"}]
    a = TextDataset.from_records("d", recs)
    b = TextDataset.from_records("d", [*recs[:1], {**recs[1], "label": "x"}])
    assert a.sha256 != b.sha256
    assert a.split("test").labels == (1,)


def test_subsample_keeps_other_splits(builtin: TextDataset) -> None:
    small = builtin.subsample("calibration", 50, seed=1)
    assert len(small.split("calibration")) == 50
    assert small.split("test") == builtin.split("test")
    assert small.sha256 != builtin.sha256
    assert set(small.split("calibration").texts) <= set(builtin.split("calibration").texts)


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11), reason="the committed file was built from the 3.11 stdlib"
)
@pytest.mark.skipif(
    not os.environ.get("EDGEFIT_REBUILD_DATA"),
    reason="re-reads the whole stdlib (~5-15 s); set EDGEFIT_REBUILD_DATA=1 to run",
)
def test_build_records_reproduces_the_committed_file_shape() -> None:
    rebuilt = build_records()
    with gzip.open(builtin_dataset_path(), "rt", encoding="utf-8") as fh:
        committed = [json.loads(line) for line in fh]
    # Patch releases may touch a few docstrings; the bulk must be identical.
    same = {(r["text"], r["label"], r["split"]) for r in rebuilt} & {
        (r["text"], r["label"], r["split"]) for r in committed
    }
    assert len(same) >= 0.95 * len(committed)
