"""Shared fixtures for engine tests: a tiny model, a tiny labelled dataset, a reference quantizer."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from planner.data import TextDataset
from planner.evaluate import Evaluator, QuantizeFn
from planner.exits import ExitHeads, prepare_heads
from planner.models import TinyAdapter
from planner.specs import TensorScheme

_TOPICS = {
    "animals": ["cat", "dog", "horse", "bird", "fish", "cow", "sheep", "goat", "mouse", "lion"],
    "weather": ["rain", "snow", "wind", "storm", "sun", "cloud", "fog", "hail", "thunder", "frost"],
    "food": ["bread", "cheese", "apple", "rice", "soup", "cake", "pasta", "salad", "butter", "honey"],
}
_FILLER = ["the", "a", "of", "and", "is", "very", "some", "with", "on", "in", "today", "we", "saw"]


def make_records(n_per_class: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """Texts mixing topic words with filler; 60/20/20 splits per class."""
    rng = random.Random(seed)
    records = []
    for label, words in _TOPICS.items():
        for i in range(n_per_class):
            n_topic = rng.randint(1, 3)
            tokens = rng.sample(words, n_topic) + rng.sample(_FILLER, rng.randint(2, 8))
            rng.shuffle(tokens)
            split = "train" if i < 0.6 * n_per_class else "calibration" if i < 0.8 * n_per_class else "test"
            records.append({"text": " ".join(tokens), "label": label, "split": split})
    return records


def reference_quantize(
    weight: torch.Tensor, scheme: TensorScheme, calib: torch.Tensor | None
) -> torch.Tensor:
    """Plain symmetric round-to-nearest, per row or per group; stands in for planner.quant in tests."""
    if scheme.precision == "fp32":
        return weight.clone()
    if scheme.precision == "fp16":
        return weight.half().float()
    rows, cols = weight.shape
    g = scheme.group_size or cols
    w = weight.reshape(rows, cols // g, g)
    qmax = 2 ** (scheme.bits - 1) - 1
    scale = (w.abs().amax(-1, keepdim=True) / max(qmax, 1)).clamp(min=1e-12)
    q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
    return (q * scale).reshape(rows, cols)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second thread only adds synchronisation (and the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def quantizer() -> QuantizeFn:
    return reference_quantize


@pytest.fixture(scope="session")
def tiny_dataset() -> TextDataset:
    return TextDataset.from_records("tiny-topics", make_records())


@pytest.fixture(scope="session")
def tiny_adapter() -> TinyAdapter:
    return TinyAdapter(seed=0, n_blocks=2)


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="session")
def tiny_heads(tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, engine_dir: Path) -> ExitHeads:
    return prepare_heads(tiny_adapter, tiny_dataset, data_dir=engine_dir)


@pytest.fixture()
def tiny_evaluator(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tiny_heads: ExitHeads, tmp_path: Path
) -> Evaluator:
    return Evaluator(
        tiny_adapter, tiny_dataset, tiny_heads, cache_dir=tmp_path, quantizer=reference_quantize, threads=1
    )
