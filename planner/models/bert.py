"""A small BERT encoder in plain torch whose parameter names match Hugging Face checkpoints.

Only what a mean-pooled sentence encoder uses is built (no pooler, no MLM head), so a
``model.safetensors`` from a BERT checkpoint loads with `load_state_dict(strict=False)` and the
missing/unexpected keys can be checked by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from planner.models.base import Batch, ModelAdapter, Packing
from planner.models.linear import OneDNNLinear, linear_gelu
from planner.specs import ModelSpec, TensorSpec

__all__ = ["BertAdapter", "BertConfig", "BertModule", "init_bert_"]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BertConfig:
        return cls(
            vocab_size=int(data["vocab_size"]),
            hidden_size=int(data["hidden_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=int(data["num_attention_heads"]),
            intermediate_size=int(data["intermediate_size"]),
            max_position_embeddings=int(data.get("max_position_embeddings", 512)),
            type_vocab_size=int(data.get("type_vocab_size", 2)),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(data.get("pad_token_id", 0)),
        )


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        out: torch.Tensor = self.LayerNorm(x)
        return out


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.query = OneDNNLinear(cfg.hidden_size, cfg.hidden_size)
        self.key = OneDNNLinear(cfg.hidden_size, cfg.hidden_size)
        self.value = OneDNNLinear(cfg.hidden_size, cfg.hidden_size)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = OneDNNLinear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = OneDNNLinear(cfg.hidden_size, cfg.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """Post-norm BERT layer; `keep` is a (batch, 1, 1, seq) bool mask of real tokens.

        `x` is (batch, seq, hidden), or with `packing` the real tokens only (tokens, hidden):
        then only attention sees the padded layout (Q/K/V scattered into it with zeros at the
        padding, which the mask hides; the context gathered back), and every Linear, GELU,
        residual add and LayerNorm runs on real tokens alone."""
        sa = self.attention.self
        b, t = keep.shape[0], keep.shape[-1]
        h = x.shape[-1]
        heads = sa.n_heads

        # Every Linear is *called* (never read as .weight): quantizers may swap a module for a
        # packed-weight one, and forward hooks (GPTQ calibration) must see each input.
        def split(y: torch.Tensor) -> torch.Tensor:
            padded = y if packing is None else packing.unpack(y, b, t)
            return padded.view(b, t, heads, h // heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(split(sa.query(x)), split(sa.key(x)), split(sa.value(x)), keep)
        ctx = ctx.transpose(1, 2).reshape(b, t, h)
        if packing is not None:
            ctx = packing.pack(ctx)
        ao = self.attention.output
        x = ao.LayerNorm(ao.dense(ctx) + x)
        inner = linear_gelu(self.intermediate.dense, x)
        out: torch.Tensor = self.output.LayerNorm(self.output.dense(inner) + x)
        return out


class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])


class BertModule(nn.Module):
    """``embeddings`` + ``encoder.layer[i]`` with Hugging Face BERT parameter names."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)


class BertAdapter(ModelAdapter):
    """ModelAdapter over a `BertModule`; subclasses supply weights and the tokenizer."""

    def __init__(self, name: str, module: BertModule, max_length: int = 128) -> None:
        self.name = name
        self.bert = module.eval()
        self.module = module
        self.config = module.config
        self.max_length = max_length
        self._spec = self._build_spec()

    def _build_spec(self) -> ModelSpec:
        """Steps: the three embedding tables (block -1, no multiply-adds: lookups), then every
        Linear of every layer with in × out multiply-adds per token; every block is an exit."""
        cfg = self.config
        tensors: list[TensorSpec] = []
        for name, mod in self.module.named_modules():
            if isinstance(mod, nn.Embedding):
                tensors.append(TensorSpec(f"{name}.weight", "embedding", tuple(mod.weight.shape), -1, 0))  # type: ignore[arg-type]
            elif isinstance(mod, nn.Linear):
                block = int(name.split(".")[2])
                shape = (mod.out_features, mod.in_features)
                tensors.append(TensorSpec(f"{name}.weight", "linear", shape, block, shape[0] * shape[1]))
        listed = {t.name for t in tensors}
        other = sum(p.numel() for n, p in self.module.named_parameters() if n not in listed)
        return ModelSpec(
            name=self.name,
            tensors=tuple(tensors),
            n_blocks=cfg.num_hidden_layers,
            exit_points=tuple(range(cfg.num_hidden_layers)),
            hidden_size=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            other_params=int(other),
            max_seq_len=cfg.max_position_embeddings,
        )

    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def n_blocks(self) -> int:
        return self.config.num_hidden_layers

    def embed(self, batch: Batch) -> torch.Tensor:
        out: torch.Tensor = self.bert.embeddings(batch.input_ids, batch.token_type_ids)
        return out

    def run_block(self, index: int, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._block(index, hidden, batch, None)

    def run_block_packed(self, index: int, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._block(index, hidden, batch, batch.packing)

    def _block(self, index: int, hidden: torch.Tensor, batch: Batch, packing: Packing | None) -> torch.Tensor:
        keep = batch.attention_mask.bool()[:, None, None, :]
        out: torch.Tensor = self.bert.encoder.layer[index](hidden, keep, packing)
        return out

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> Batch:
        ids = self._token_ids(list(texts), max_length or self.max_length)
        longest = max((len(x) for x in ids), default=1)
        input_ids = torch.full((len(ids), longest), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return Batch(input_ids, mask, torch.zeros_like(input_ids))

    def _token_ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids with [CLS] … [SEP], at most `max_length` of them per text."""
        raise NotImplementedError


def init_bert_(module: BertModule, seed: int, std: float = 0.02) -> BertModule:
    """Seeded BERT-style initialisation (normal(0, std) weights, zero biases, unit norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("LayerNorm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
