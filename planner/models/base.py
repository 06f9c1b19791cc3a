"""The interface by which a model exposes its quantizable tensors and its early exits.

The contract with `planner.quant` is structural: every tensor listed in `ModelAdapter.spec()` is
the ``.weight`` of an ``nn.Linear`` or ``nn.Embedding`` submodule of `ModelAdapter.module`, and
its TensorSpec.name is exactly that parameter's qualified name (``module.get_parameter(name)``).
Quantizers may therefore swap or patch those submodules generically, without knowing the model.

A forward pass is split into stages so that callers can resume from cached activations:
``embed`` (stage 0) then ``run_block(i)`` for each block (stage i + 1), and ``pool`` turns a
block's hidden state into the per-example vector an exit head reads.  The ``*_packed`` variants
do the same on the batch's real tokens only (hidden states of shape (tokens, hidden), padding
left out): what the evaluator's passes over length buckets run, since every op but attention
works token by token and padding is ~8 % of an evaluation's rows.

Task and exit heads are not part of the adapter: they depend on the evaluation data, so they
live in `planner.exits.ExitHeads` (trained per model and dataset); the head of the last exit
is the model's task head.  ``ExitHeads.logits(stack(forward_exits(batch)))`` gives every exit's
class logits from one pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from planner.specs import ModelSpec, PlanError

__all__ = ["Batch", "ModelAdapter", "ModelFileError", "Packing", "TokenizedSplit"]


class ModelFileError(PlanError):
    """A model's files are missing or corrupt; the message names the file."""


@dataclass(frozen=True)
class Packing:
    """Where a right-padded batch's real tokens are, for hidden states kept without padding.

    `index[j]` is real token j's position in the flattened (batch × seq) padded layout, tokens
    in row-major order (text by text); `rows[j]` its text; `counts` (batch, 1) the real tokens
    of every text, as a float for the mean."""

    index: torch.Tensor
    rows: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        keep = attention_mask.bool()
        per_row = keep.sum(1)
        return cls(
            index=torch.nonzero(keep.reshape(-1)).reshape(-1),
            rows=torch.arange(keep.shape[0]).repeat_interleave(per_row),
            counts=per_row.to(torch.float32).clamp(min=1.0).unsqueeze(1),
        )

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, seq, …) → (tokens, …): the real tokens' rows."""
        return padded.reshape(-1, *padded.shape[2:]).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """(tokens, …) → (batch, seq, …), zeros at the padding."""
        out = packed.new_zeros(batch * seq, *packed.shape[1:])
        out.index_copy_(0, self.index, packed)
        return out.view(batch, seq, *packed.shape[1:])


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids of a batch of texts (all tensors of shape (batch, seq))."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @cached_property
    def packing(self) -> Packing:
        """The real tokens' positions (computed on first use; a Batch never changes)."""
        return Packing.of(self.attention_mask)

    def select(self, rows: torch.Tensor, length: int | None = None) -> Batch:
        """Rows `rows`, cut to `length` tokens (safe because padding is on the right)."""
        cut = slice(None) if length is None else slice(0, length)
        return Batch(
            self.input_ids[rows, cut], self.attention_mask[rows, cut], self.token_type_ids[rows, cut]
        )


class ModelAdapter(ABC):
    """What the planner needs from a model.

    Subclasses provide the module, the spec, a tokenizer and the three stages; `forward_exits`
    and `encode` are built on top of them.
    """

    #: Stable identifier (used in cache keys together with `fingerprint`).
    name: str
    #: The torch module owning every quantizable tensor (see the module docstring).
    module: nn.Module

    @abstractmethod
    def spec(self) -> ModelSpec:
        """Every quantizable tensor (Linear weights and embedding tables) and the exit points."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> Batch:
        """Tokenize and right-pad `texts`, truncating each to `max_length` tokens."""

    @abstractmethod
    def embed(self, batch: Batch) -> torch.Tensor:
        """Stage 0: token ids → hidden states of shape (batch, seq, hidden)."""

    @abstractmethod
    def run_block(self, index: int, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Stage index + 1: apply block `index` to `hidden`."""

    @property
    def n_blocks(self) -> int:
        return self.spec().n_blocks

    @property
    def fingerprint(self) -> str:
        """Identifies the weights (not just the architecture); part of every cache key."""
        return self.name

    def pool(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean of the hidden states over real (non-padding) tokens: (batch, hidden).

        One text without padding (every batch-1 request) takes the plain sum / length: the
        same numbers (the mask only multiplies by 1.0) in three ops instead of six."""
        if hidden.shape[0] == 1 and bool(batch.attention_mask.all()):
            return hidden.sum(1) / float(hidden.shape[1])
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def embed_packed(self, batch: Batch) -> torch.Tensor:
        """`embed` on the real tokens only: (tokens, hidden), in `batch.packing` order."""
        return batch.packing.pack(self.embed(batch))

    def run_block_packed(self, index: int, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """`run_block` on packed hidden states (tokens, hidden).  This default pads, runs the
        block and packs again (the same numbers, none of the saving); adapters whose blocks
        mix tokens only in attention override it."""
        seq = int(batch.input_ids.shape[1])
        padded = batch.packing.unpack(hidden, len(batch), seq)
        return batch.packing.pack(self.run_block(index, padded, batch))

    def pool_packed(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """`pool` on packed hidden states: the mean over each text's real tokens, (batch, hidden)."""
        p = batch.packing
        sums = hidden.new_zeros(len(batch), hidden.shape[-1]).index_add_(0, p.rows, hidden)
        return sums / p.counts.to(hidden.dtype)

    def forward_exits(self, batch: Batch) -> list[torch.Tensor]:
        """One pass; the pooled hidden state after every block (exit i ↔ block i)."""
        hidden = self.embed(batch)
        pooled = []
        for i in range(self.n_blocks):
            hidden = self.run_block(i, hidden, batch)
            pooled.append(self.pool(hidden, batch))
        return pooled

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Sentence embeddings: mean-pooled last block, L2-normalised (as sentence-transformers)."""
        with torch.inference_mode():
            pooled = self.forward_exits(self.tokenize(texts, max_length))[-1]
        return torch.nn.functional.normalize(pooled, dim=-1)


@dataclass(frozen=True)
class TokenizedSplit:
    """A split tokenized once and cut into length-sorted buckets to limit padding.

    `buckets[k]` is a Batch trimmed to its longest member; `order[k]` holds the original
    indices of its rows, so per-row outputs concatenated in bucket order are put back with
    `unsort`.
    """

    buckets: tuple[Batch, ...]
    order: tuple[np.ndarray, ...]
    n: int
    n_tokens: int

    @classmethod
    def build(
        cls, adapter: ModelAdapter, texts: Sequence[str], max_length: int, max_tokens_per_batch: int = 2048
    ) -> TokenizedSplit:
        """Steps: tokenize all texts once; sort by length; greedily fill buckets while
        (rows × longest length) stays within `max_tokens_per_batch`."""
        full = adapter.tokenize(texts, max_length)
        lengths = full.attention_mask.sum(1).numpy()
        idx = np.argsort(-lengths, kind="stable")
        buckets: list[Batch] = []
        order: list[np.ndarray] = []
        start = 0
        while start < len(idx):
            longest = int(lengths[idx[start]])
            rows = max(1, max_tokens_per_batch // max(longest, 1))
            chosen = idx[start : start + rows]
            buckets.append(full.select(torch.as_tensor(chosen), longest))
            order.append(chosen)
            start += rows
        return cls(tuple(buckets), tuple(order), len(texts), int(lengths.sum()))

    def unsort(self, per_bucket: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-bucket row outputs and restore the original row order."""
        out = torch.cat(list(per_bucket))
        perm = torch.as_tensor(np.concatenate(self.order))
        result = torch.empty_like(out)
        result[perm] = out
        return result

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.buckets)
