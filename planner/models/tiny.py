"""A tiny random-initialised BERT for fast tests: same structure as MiniLM, builds in milliseconds."""

from __future__ import annotations

import re
import zlib

from planner.models.bert import BertAdapter, BertConfig, BertModule, init_bert_

__all__ = ["TinyAdapter"]

_WORD = re.compile(r"\w+|[^\w\s]")
_PAD, _UNK, _CLS, _SEP, _N_SPECIAL = 0, 1, 2, 3, 4


class TinyAdapter(BertAdapter):
    """2 blocks, hidden 32, 4 heads, vocab 200; words are hashed (crc32) into the vocabulary."""

    def __init__(
        self,
        seed: int = 0,
        n_blocks: int = 2,
        hidden: int = 32,
        vocab: int = 200,
        n_heads: int = 4,
        max_length: int = 32,
    ) -> None:
        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=n_blocks,
            num_attention_heads=n_heads,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
        )
        # std 0.2 rather than BERT's 0.02 so that quantization noise visibly moves the outputs.
        super().__init__(
            f"tiny-{n_blocks}x{hidden}-s{seed}", init_bert_(BertModule(cfg), seed, std=0.2), max_length
        )

    def _token_ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        span = self.config.vocab_size - _N_SPECIAL
        out = []
        for text in texts:
            words = _WORD.findall(text.lower())[: max(max_length - 2, 0)]
            out.append([_CLS, *(_N_SPECIAL + zlib.crc32(w.encode()) % span for w in words), _SEP])
        return out
