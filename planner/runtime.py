"""Run a plan on this host with real low-bit kernels, and measure it.

Kernels (torch 2.13 CPU):

* int8, per-channel (symmetric or asymmetric): ``aten._weight_int8pack_mm`` — weight-only int8,
  activations stay float; an asymmetric zero point becomes an exact rank-1 correction
  ``(Σ_k x_k) · s_n · (128 - z_n)``;
* int4, grouped or per-channel (symmetric or asymmetric), N % 16 == 0 and K % 32 == 0:
  ``aten._convert_weight_to_int4pack_for_cpu`` + ``aten._weight_int4pack_mm_for_cpu``, whose
  dequantization is ``(q - 8) · scale + zero``, so our ``(q - z) · s`` maps to zero = (8 - z) · s
  and a per-channel scale is repeated over kernel groups of 32–256;
* fp16: stored fp16, upcast to fp32 per call (CPU fp16 GEMM is slower than fp32 here);
* int2, int3, grouped int8 and shapes the int4 kernel rejects: **dequantized at load** to fp32
  (no speed or memory gain at run time, but identical numerics);
* embeddings at any integer precision: rows kept bit-packed, gathered and dequantized per lookup
  (memory really is the packed size) when dim·bits fits whole 8-code chunks, else dequantized
  at load.

W8A8 (``build_runtime_model(..., w8a8=True)``): ``Int8DynamicLinear`` — int8 per-output-channel
symmetric weights × per-token dynamic symmetric int8 activations on ``torch._int_mm`` (int8 ×
int8 → int32), rescaled by act_scale × weight_scale, plus bias.  On the 2-core hosts measured
(Intel Xeon, AMD EPYC Zen 5) ``_int_mm`` is 3–8× faster per GEMM than fp32 at 57 × 384 × 1536
in isolation, while the weight-only kernels above are not faster than fp32 at all.  FP32 layers
(and the FP32 baseline every speed-up is measured against) run on the host's faster fp32
path (`planner.models.linear`): oneDNN on AMD (2.3× torch's default F.linear there), MKL's
F.linear on Intel (oneDNN 0.83–0.85× of it on the Xeon measured).
int2/int3/int4 per-channel codes are widened exactly to int8 at load (the package stays
packed; run-time memory is int8: "int4 weights unpacked to int8 at load, W8A8 _int_mm");
grouped scales are re-quantized per channel to int8 at load (reported per tensor).  The
Linears reading a LayerNorm output take asymmetric activations, Q/K/V's by default at ~16 bits
as two int8 digits on the same kernel (`attention_input_bits` / `intermediate_input_bits`,
kernel "W8A16", cost regime "w8a16").  Sibling
layers reading one input (Q, K, V) run as one fused GEMM.  A BERT layer whose six Linears are
all W8A8 runs as one fused block (`w8a8_bert_block`, same numerics) through ``torch.compile``
(inductor fuses activation quantization, rescale, bias, residual, LayerNorm, GELU and the
attention softmax; one graph shared by every layer and plan, sequence length dynamic; ~13 s
compile per process at batch 1, ~5 s more for batches;
EDGEFIT_RUNTIME_COMPILE=0 or a compile failure runs it eagerly).  Activations are quantized
too, so the runtime's accuracy differs from the evaluator's weight-only figures:
`evaluate_runtime` measures it.

Early exit: `EarlyExitRunner` runs block by block and stops at the first exit head whose
max softmax probability reaches the threshold (per row: exited rows leave the batch);
`measure_text_latency` times runners at batch 1, interleaved, under inference mode with a
fixed thread count.

``aten._dyn_quant_matmul_4bit`` is not used: on x86 it is a reference fallback (KleidiAI packs
only on ARM).  ``torch.ao.quantization.quantize_dynamic`` is deprecated and not used.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from planner.cost import FUSED_REGIME
from planner.exits.curve import ThresholdCurve, confidences, threshold_curve
from planner.exits.heads import ExitHeads
from planner.files import replacing
from planner.models.base import Batch, ModelAdapter, Packing, TokenizedSplit
from planner.models.bert import BertAdapter, _Layer
from planner.models.linear import onednn_linear, onednn_linear_available, onednn_linear_gelu, onednn_product
from planner.quant.api import quantize
from planner.quant.apply import QuantCache, quantizable_parameter, quantize_plan
from planner.quant.core import QuantizedTensor, dequantize
from planner.quant.packing import pack_codes, unpack_codes
from planner.specs import ModelSpec, Plan, PlanError, TensorScheme

__all__ = [
    "DEFAULT_ATTENTION_INPUT_BITS",
    "DEFAULT_INTERMEDIATE_INPUT_BITS",
    "KERNEL_BYPASSED",
    "KERNEL_DEQUANT_AT_LOAD",
    "KERNEL_FP16_UPCAST",
    "KERNEL_FP32",
    "KERNEL_FP32_DEFAULT",
    "KERNEL_FP32_ONEDNN",
    "KERNEL_INT4",
    "KERNEL_INT8",
    "KERNEL_PACKED_GATHER",
    "KERNEL_W8A8",
    "KERNEL_W8A8_FROM_INT4",
    "KERNEL_W8A8_FROM_LOWBIT",
    "KERNEL_W8A8_FUSED",
    "KERNEL_W8A16",
    "KERNEL_W8A16_FUSED",
    "RAW_INT_MM",
    "W8A8_ENV",
    "DequantLinear",
    "EarlyExitRunner",
    "ExitDecision",
    "Fp16Linear",
    "Int4Linear",
    "Int8DynamicLinear",
    "Int8Linear",
    "Int8MatmulProbe",
    "KernelChoice",
    "KernelReport",
    "LatencyStats",
    "MemoryStats",
    "PackedEmbedding",
    "RuntimeEval",
    "TextLatency",
    "aot_packages_loaded",
    "benchmark_linear",
    "build_runtime_model",
    "compiled_vector_isa",
    "evaluate_runtime",
    "fused_block_compile_error",
    "int4_kernel_supported",
    "int8_kernel_supported",
    "int_mm_supported",
    "measure_batch_latency",
    "measure_latency",
    "measure_memory",
    "measure_text_latency",
    "module_storage_bytes",
    "observed_kernels",
    "probe_int8_matmul",
    "quantize_rows_int8",
    "quantize_rows_int8_asym",
    "quantize_rows_two_digits_asym",
    "runtime_exit_curve",
    "runtime_exit_logits",
    "runtime_layer",
    "w8a8_pays_off",
]

KERNEL_INT8 = "int8pack_mm"
KERNEL_INT4 = "int4pack_mm_for_cpu"
KERNEL_FP16_UPCAST = "fp16-storage upcast-per-call fp32"
KERNEL_DEQUANT_AT_LOAD = "dequantized-at-load fp32"
KERNEL_FP32_ONEDNN = "fp32 oneDNN linear"
KERNEL_FP32_DEFAULT = "fp32 F.linear"
#: The fp32 path this host's model takes (planner.models.linear: oneDNN unless the CPU is Intel).
KERNEL_FP32 = KERNEL_FP32_ONEDNN if onednn_linear_available() else KERNEL_FP32_DEFAULT
KERNEL_PACKED_GATHER = "packed-row-gather dequant"
#: `benchmark_linear`'s name for the bare int8 GEMM (int8 operands in, int32 out): not a
#: runtime kernel of its own, the product every W8A8 kernel is built on.
RAW_INT_MM = "_int_mm (int8 operands, no activation quantization)"
KERNEL_BYPASSED = "bypassed: fp32 matmul on .weight dequantized per read"
KERNEL_W8A8 = "w8a8 _int_mm"
KERNEL_W8A8_FROM_INT4 = "int4 weights unpacked to int8 at load, W8A8 _int_mm"
KERNEL_W8A8_FROM_LOWBIT = "low-bit weights widened to int8 at load, W8A8 _int_mm"
#: Any of the three above, run inside a fused BERT block (`w8a8_bert_block`): torch.compile,
#: or an AOTInductor package at batch 1 when every block is fused (`aot_packages_loaded`).
KERNEL_W8A8_FUSED = "W8A8 _int_mm in a compiled fused block"
#: A W8A8 Linear whose input (a LayerNorm output) is quantized to ~16 bits as two int8
#: digits (`quantize_rows_two_digits_asym`), one _int_mm on twice the rows; alone / fused.
KERNEL_W8A16 = "W8A16 _int_mm (activations as two int8 digits)"
KERNEL_W8A16_FUSED = "W8A16 _int_mm (activations as two int8 digits) in a compiled fused block"
_INT4_GROUPS = (32, 64, 128, 256)
_INT8_ACT_NOTE = "per-token int8 activations"
#: How planner.cost prices each kernel (a bypassed layer runs fp32 on a dequantized weight).
_REGIME_OF_KERNEL: dict[str, str] = {
    KERNEL_FP32: "fp32",
    KERNEL_W8A8: "w8a8",
    KERNEL_W8A8_FROM_INT4: "w8a8",
    KERNEL_W8A8_FROM_LOWBIT: "w8a8",
    KERNEL_W8A8_FUSED: FUSED_REGIME,
    KERNEL_W8A16: "w8a16",
    KERNEL_W8A16_FUSED: "w8a16-fused",
    KERNEL_INT8: "weight-only",
    KERNEL_INT4: "weight-only",
    KERNEL_DEQUANT_AT_LOAD: "dequant",
    KERNEL_BYPASSED: "dequant",
    KERNEL_FP16_UPCAST: "fp16-upcast",
    KERNEL_PACKED_GATHER: "gather",
}


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]), lead


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # `.float()` returns an fp32 tensor itself too, but only after a trip through the
    # dispatcher (~1 µs) on every Linear call at batch 1.
    return x if x.dtype == torch.float32 else x.float()


class _QuantLinearBase(nn.Module):
    in_features: int
    out_features: int

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self._qt_scheme = qt.scheme
        self.bias: torch.Tensor | None
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # Model code that reads `.weight` instead of calling the layer bypasses the kernel;
        # these counters let `observed_kernels` report what really ran.
        self.calls = 0
        self.weight_reads = 0

    @property
    def weight(self) -> torch.Tensor:
        """The fp32 weight, rebuilt from the stored form on every read (never cached)."""
        self.weight_reads += 1
        return self._dequantized_weight()

    def _dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _finish(self, y: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        self._count_call()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _count_call(self) -> None:
        # Straight into the instance dict: nn.Module.__setattr__ (its checks against parameters,
        # buffers and submodules) took ~10 µs per call on a 2 GHz AVX2 host — at batch 1, a
        # third of what a Linear on dequantized weights cost over the FP32 model's.
        self.__dict__["calls"] += 1

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self._qt_scheme}"


def int8_kernel_supported(qt: QuantizedTensor) -> bool:
    return qt.scheme.precision == "int8" and qt.scheme.group_size is None


class Int8Linear(_QuantLinearBase):
    """Weight-only int8 Linear on ``aten._weight_int8pack_mm`` (per-channel scales)."""

    def __init__(
        self, qt: QuantizedTensor, bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(qt, bias)
        if not int8_kernel_supported(qt):
            raise PlanError(f"Int8Linear needs per-channel int8, got {qt.scheme}")
        assert qt.codes is not None and qt.scales is not None
        self.act_dtype = act_dtype
        self.weight_int8: torch.Tensor
        self.scales: torch.Tensor
        self.zero_correction: torch.Tensor | None
        self.register_buffer("weight_int8", (qt.codes.to(torch.int16) - 128).to(torch.int8).contiguous())
        scales = qt.scales.float().reshape(-1)
        self.register_buffer("scales", scales.to(act_dtype).contiguous())
        corr = None
        if qt.zeros is not None:
            corr = scales * (128.0 - qt.zeros.float().reshape(-1))
        self.register_buffer("zero_correction", corr)

    def _dequantized_weight(self) -> torch.Tensor:
        w = self.weight_int8.float() * self.scales.float().unsqueeze(1)
        return w if self.zero_correction is None else w + self.zero_correction.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flat(x)
        xa = x2.to(self.act_dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(xa, self.weight_int8, self.scales).float()
        if self.zero_correction is not None:
            y = y + x2.float().sum(dim=-1, keepdim=True) * self.zero_correction
        return self._finish(y, lead)


def _int4_group(qt: QuantizedTensor) -> int | None:
    n, k = qt.shape
    if n % 16 or k % 32:
        return None
    if qt.scheme.group_size is not None:
        return qt.scheme.group_size if qt.scheme.group_size in _INT4_GROUPS else None
    for g in reversed(_INT4_GROUPS):
        if k % g == 0:
            return g
    return None


def int4_kernel_supported(qt: QuantizedTensor) -> bool:
    return qt.scheme.precision == "int4" and _int4_group(qt) is not None


class Int4Linear(_QuantLinearBase):
    """Group-wise int4 Linear on ``aten._weight_int4pack_mm_for_cpu``."""

    def __init__(
        self, qt: QuantizedTensor, bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(qt, bias)
        group = _int4_group(qt)
        if qt.scheme.precision != "int4" or group is None:
            raise PlanError(
                f"Int4Linear needs int4 with out % 16 == 0 and in % 32 == 0, got {qt.scheme} {qt.shape}"
            )
        assert qt.codes is not None and qt.scales is not None
        n, k = qt.shape
        self.group = group
        self.act_dtype = act_dtype
        # The kernel takes only groups of 32-256: a per-channel scale is repeated over them (exact).
        per = k // group
        scale = qt.scales.float()
        zero = qt.zero_points()
        if qt.group_size > group:
            scale = scale.repeat_interleave(qt.group_size // group, dim=1)
            zero = zero.repeat_interleave(qt.group_size // group, dim=1)
        assert scale.shape == (n, per)
        zero_f = (8.0 - zero) * scale
        self.weight_int4: torch.Tensor
        self.scales_and_zeros: torch.Tensor
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qt.codes.to(torch.int32).contiguous(), 2)
        self.register_buffer("weight_int4", packed)
        sz = torch.stack([scale, zero_f], dim=2).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(act_dtype))

    def _dequantized_weight(self) -> torch.Tensor:
        # The CPU int4 layout is opaque; multiplying the identity reads the weight back out.
        eye = torch.eye(self.in_features, dtype=self.act_dtype)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.weight_int4, self.group, self.scales_and_zeros
        )
        return wt.float().T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flat(x)
        xa = x2.to(self.act_dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            xa, self.weight_int4, self.group, self.scales_and_zeros
        )
        return self._finish(y.float(), lead)


class _Fp32ProductLinear(_QuantLinearBase):
    """A Linear that multiplies in fp32 on its stored weight as `_dequantized_weight` gives it,
    making the FP32 model's call (`OneDNNLinear`): the bias inside the product, the input's
    leading dims left to the op, GELU fused where the model asks for it (`linear_gelu`).

    An AVX2 host without a fast `_int_mm` runs every integer plan here; with the bias and GELU
    as passes of their own and reshapes around the product, those plans ran 6 % slower than
    FP32 at batch 1 (31.2 against 29.4 ms per text on an AMD Zen 1 host)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count_call()
        return onednn_linear(_fp32(x), self._dequantized_weight(), self.bias)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """`F.gelu(self(x))` in one fp32 product with GELU as its post-op."""
        self._count_call()
        return onednn_linear_gelu(_fp32(x), self._dequantized_weight(), self.bias)


class Fp16Linear(_Fp32ProductLinear):
    """fp16-stored Linear; upcasts to fp32 per call (fp16 GEMM on this CPU is slower than fp32)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qt, bias)
        if qt.values is None or qt.values.dtype != torch.float16:
            raise PlanError(f"Fp16Linear needs an fp16 tensor, got {qt.scheme}")
        self.weight_fp16: torch.Tensor
        self.register_buffer("weight_fp16", qt.values.contiguous())

    def _dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp16.float()


class DequantLinear(_Fp32ProductLinear):
    """A Linear whose low-bit weight was dequantized to fp32 at load (same numerics, no speed-up)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qt, bias)
        self.weight_fp32: torch.Tensor
        self.register_buffer("weight_fp32", dequantize(qt).contiguous())

    def _dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp32


class _SmallTableCopy(nn.Module):
    """An embedding whose small table (fp32 copy ≤ `SMALL_TABLE_BYTES`) is looked up from an fp32
    copy built on first use, kept in the instance dict under `_COPY_KEY` (not a buffer: the
    package and `module_storage_bytes` see the stored form only); `_apply` (`.to()`,
    `.float()`, …) drops it, so the next lookup rebuilds it from the moved buffers."""

    #: fp32 bytes up to which a table keeps a copy (inside the runtime overhead the cost model
    #: budgets, 32 MiB).
    SMALL_TABLE_BYTES = 1 << 20
    _COPY_KEY = "_table_copy"

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> _SmallTableCopy:
        self.__dict__.pop(self._COPY_KEY, None)
        super()._apply(fn, recurse)
        return self

    def _table_copy(self, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        table: torch.Tensor | None = self.__dict__.get(self._COPY_KEY)
        if table is None:
            table = build()
            self.__dict__[self._COPY_KEY] = table
        return table


class PackedEmbedding(_SmallTableCopy):
    """An embedding table kept bit-packed: each lookup unpacks and dequantizes only its rows.

    Needs dim % 8 == 0 so every row starts on a whole chunk of the dense bit stream.  Hot rows
    (`TensorScheme.hot_rows`) stay int8 with their row scale; a lookup that hits one takes it
    instead of the low-bit row (`hot_slot` maps a row id to its hot row, −1 for the others).
    A small table (fp32 copy ≤ `SMALL_TABLE_BYTES`, e.g. BERT's 512 position rows) is
    dequantized once, on its first lookup, and then looked up as plain rows: the same numbers,
    one `F.embedding` instead of a dozen small ops per call (the int2 position table at 48
    tokens: 90 → 4 µs per lookup, measured); the package and the buffers stay packed.
    """

    _COPY_KEY = "_dequantized"

    def __init__(self, qt: QuantizedTensor, padding_idx: int | None = None) -> None:
        super().__init__()
        rows, dim = qt.shape
        if not qt.scheme.is_integer or dim % 8:
            raise PlanError(
                f"PackedEmbedding needs an integer scheme and dim % 8 == 0, got {qt.scheme} {qt.shape}"
            )
        assert qt.codes is not None and qt.scales is not None
        self.num_embeddings, self.embedding_dim = rows, dim
        #: Whether lookups use a dequantized copy built on first use (see the class docstring).
        self.dequantize_once = rows * dim * 4 <= self.SMALL_TABLE_BYTES
        self.padding_idx = padding_idx
        self.bits = qt.scheme.bits
        self.group = qt.group_size
        row_bytes = dim * self.bits // 8
        self.packed_rows: torch.Tensor
        self.scales: torch.Tensor
        self.zeros: torch.Tensor | None
        self.hot_slot: torch.Tensor | None
        self.hot_codes: torch.Tensor | None
        self.hot_scales: torch.Tensor | None
        packed = pack_codes(qt.codes.numpy(), self.bits)
        self.register_buffer("packed_rows", torch.from_numpy(packed).reshape(rows, row_bytes))
        self.register_buffer("scales", qt.scales.contiguous())
        # Symmetric tables use the fixed mid-point zero; storing it would only cost memory.
        self.register_buffer("zeros", None if qt.zeros is None else qt.zeros.contiguous())
        self.mid_zero = float(2 ** (self.bits - 1))
        slot = hot_codes = hot_scales = None
        if qt.hot_index is not None:
            assert qt.hot_codes is not None and qt.hot_scales is not None
            # int16 slots while they fit (every count the planner tries does): half the map.
            dtype = torch.int16 if len(qt.hot_index) < 2**15 else torch.int32
            slot = torch.full((rows,), -1, dtype=dtype)
            slot[qt.hot_index.long()] = torch.arange(len(qt.hot_index), dtype=dtype)
            hot_codes, hot_scales = qt.hot_codes.contiguous(), qt.hot_scales.contiguous()
        self.register_buffer("hot_slot", slot)
        self.register_buffer("hot_codes", hot_codes)
        self.register_buffer("hot_scales", hot_scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dequantize_once:
            table = self._table_copy(lambda: self.lookup_packed(torch.arange(self.num_embeddings)))
            return F.embedding(ids, table)
        return self.lookup_packed(ids)

    def lookup_packed(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of `ids` unpacked and dequantized from the packed buffers.

        Hot rows first, from their int8 codes; only the other ids go through the low-bit
        stream.  Hot rows are the table's most looked-up rows, so most tokens hit one (98 % of
        the test split's tokens with 4,096 of the word table's 30,522): unpacking every row
        and then overwriting the hot ones cost the word table's int3 g64 + 4,096 hot rows
        96 → 43 µs per 45-token text, int4 g32 + 1,024 hot rows 81 → 57 µs (measured on an
        AMD Zen 4 host; the same numbers, tests compare with `dequantize` exactly).
        """
        # In numpy: at batch 1 a lookup is a dozen tiny ops on a few dozen rows, and numpy's
        # cost per op (~1 µs) is below torch's dispatch (~5 µs).  Measured on a 48-token text:
        # int3 g64 + 4,096 hot rows 140 → 104 µs, int2 g32 + 256 hot rows 123 → 90 µs.  The
        # same float32 operations in the same order, so the same numbers.
        flat = ids.reshape(-1).numpy()
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            # numpy would read row −1 as the last row; nn.Embedding refuses, and so does this.
            raise IndexError(f"index out of range: ids must be in 0..{self.num_embeddings - 1}")
        if self.hot_slot is None:
            return torch.from_numpy(self._dequantize_rows(flat)).reshape(*ids.shape, self.embedding_dim)
        assert self.hot_codes is not None and self.hot_scales is not None
        slot = self.hot_slot.numpy()[flat]
        is_hot = slot >= 0
        k = slot[is_hot]
        out = np.empty((flat.size, self.embedding_dim), dtype=np.float32)
        hot = self.hot_codes.numpy()[k].astype(np.float32)
        hot -= np.float32(128.0)
        hot *= self.hot_scales.numpy()[k].astype(np.float32)
        out[is_hot] = hot
        if k.size < flat.size:
            cold = ~is_hot
            out[cold] = self._dequantize_rows(flat[cold])
        return torch.from_numpy(out).reshape(*ids.shape, self.embedding_dim)

    def _dequantize_rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim) float32: the low-bit rows `rows` unpacked and dequantized."""
        n = rows.size
        codes = unpack_codes(self.packed_rows.numpy()[rows], self.bits, n * self.embedding_dim)
        q = codes.reshape(n, -1, self.group).astype(np.float32)
        if self.zeros is None:
            q -= np.float32(self.mid_zero)
        else:
            q -= self.zeros.numpy()[rows].astype(np.float32)[..., None]
        q *= self.scales.numpy()[rows].astype(np.float32)[..., None]
        return q.reshape(n, self.embedding_dim)


class _Fp16Embedding(_SmallTableCopy):
    """An fp16 table whose looked-up rows are upcast to fp32 per call — or, for a small table
    (e.g. BERT's two token-type rows), upcast once on first lookup: one `F.embedding` instead
    of two ops per call (15 → 5 µs per text on an AMD Zen 4 host); the buffer and the package
    stay fp16."""

    _COPY_KEY = "_upcast"

    def __init__(self, qt: QuantizedTensor, padding_idx: int | None = None) -> None:
        super().__init__()
        assert qt.values is not None
        self.padding_idx = padding_idx
        self.weight_fp16: torch.Tensor
        self.register_buffer("weight_fp16", qt.values.to(torch.float16).contiguous())
        self.upcast_once = qt.values.numel() * 4 <= self.SMALL_TABLE_BYTES

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.upcast_once:
            return F.embedding(ids, self._table_copy(self.weight_fp16.float))
        return F.embedding(ids, self.weight_fp16).float()


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel runs one tensor, and why when it is not a low-bit kernel."""

    name: str
    precision: str
    kernel: str
    note: str = ""


@dataclass(frozen=True)
class KernelReport:
    choices: tuple[KernelChoice, ...]

    def by_kernel(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.choices:
            counts[c.kernel] = counts.get(c.kernel, 0) + 1
        return counts

    def kernel_for(self, name: str) -> str:
        for c in self.choices:
            if c.name == name:
                return c.kernel
        raise KeyError(name)

    def regimes(self) -> dict[str, str]:
        """Tensor name → the cost model's kernel regime (planner.cost.REGIMES) it runs in."""
        return {c.name: _REGIME_OF_KERNEL[c.kernel] for c in self.choices}

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": [c.__dict__.copy() for c in self.choices], "counts": self.by_kernel()}


def runtime_layer(
    owner: nn.Module,
    qt: QuantizedTensor,
    act_dtype: torch.dtype = torch.bfloat16,
    dequant_all: bool = False,
    w8a8: bool = False,
) -> tuple[nn.Module, str, str]:
    """The replacement for `owner` (an nn.Linear / nn.Embedding) storing `qt`; (module, kernel, note).

    `dequant_all` dequantizes every integer Linear at load instead (fp32 F.linear).  `w8a8`
    runs every integer Linear on `Int8DynamicLinear` (int8 weights × per-token int8
    activations on torch._int_mm; int2/3/4 codes widened to int8 at load): on this 2-core
    x86 host 4–8× faster per Linear than fp32 F.linear, but activations are quantized too,
    so the runtime's accuracy must be measured on its own (`evaluate_runtime`).
    """
    p = qt.scheme.precision
    if isinstance(owner, nn.Embedding):
        if p == "fp32":
            return owner, KERNEL_FP32, "lookup"
        if p == "fp16":
            table16 = _Fp16Embedding(qt, owner.padding_idx)
            if table16.upcast_once:
                return table16, KERNEL_FP16_UPCAST, "small table: upcast once, on first lookup"
            return table16, KERNEL_FP16_UPCAST, "lookup"
        if qt.shape[1] % 8 == 0:
            packed = PackedEmbedding(qt, owner.padding_idx)
            if packed.dequantize_once:
                return packed, KERNEL_PACKED_GATHER, "small table: dequantized once, on first lookup"
            return packed, KERNEL_PACKED_GATHER, "rows stay bit-packed"
        table = nn.Embedding.from_pretrained(dequantize(qt), freeze=True, padding_idx=owner.padding_idx)
        return table, KERNEL_DEQUANT_AT_LOAD, "dim % 8 != 0"
    if not isinstance(owner, nn.Linear):
        raise PlanError(f"cannot run {type(owner).__name__}: only nn.Linear and nn.Embedding are quantizable")
    bias = owner.bias
    if p == "fp32":
        return owner, KERNEL_FP32, ""
    if p == "fp16":
        return Fp16Linear(qt, bias), KERNEL_FP16_UPCAST, ""
    act = str(act_dtype).removeprefix("torch.")
    if dequant_all:
        return DequantLinear(qt, bias), KERNEL_DEQUANT_AT_LOAD, "dequant_all requested"
    if w8a8 and qt.scheme.is_integer:
        layer = Int8DynamicLinear(qt, bias)
        kernel = {"int8": KERNEL_W8A8, "int4": KERNEL_W8A8_FROM_INT4}.get(p, KERNEL_W8A8_FROM_LOWBIT)
        return layer, kernel, f"{_INT8_ACT_NOTE}; weights {layer.how}"
    if int8_kernel_supported(qt):
        zero_note = "" if qt.zeros is None else "; zero point as rank-1 term"
        return Int8Linear(qt, bias, act_dtype), KERNEL_INT8, f"{act} activations{zero_note}"
    if int4_kernel_supported(qt):
        return Int4Linear(qt, bias, act_dtype), KERNEL_INT4, f"{act} activations"
    if p == "int8":
        note = "no grouped int8 kernel on CPU"
    elif p == "int4":
        note = "int4 kernel needs out % 16 == 0 and in % 32 == 0"
    else:
        note = f"no {p} kernel on CPU"
    return DequantLinear(qt, bias), KERNEL_DEQUANT_AT_LOAD, note


def observed_kernels(model: nn.Module, report: KernelReport) -> KernelReport:
    """`report` corrected by what ran: a layer whose weight was read but never called was
    bypassed by the model code (fp32 matmul on a weight dequantized per read)."""
    choices = []
    for c in report.choices:
        layer = model.get_submodule(c.name[: -len(".weight")])
        if isinstance(layer, _QuantLinearBase) and layer.weight_reads and not layer.calls:
            choices.append(
                KernelChoice(
                    c.name, c.precision, KERNEL_BYPASSED, f"model read .weight; built for {c.kernel}"
                )
            )
        else:
            choices.append(c)
    return KernelReport(tuple(choices))


#: Activation bits of the W8A8 Linears that read a LayerNorm output (see
#: `_mark_normalized_inputs` for the measurements behind them): Q/K/V as two int8 digits,
#: the FFN input as one.
DEFAULT_ATTENTION_INPUT_BITS = 16
DEFAULT_INTERMEDIATE_INPUT_BITS = 8


def build_runtime_model(
    module: nn.Module,
    spec: ModelSpec,
    plan: Plan,
    *,
    quantized: Mapping[str, QuantizedTensor] | None = None,
    calib_inputs_by_tensor: Mapping[str, torch.Tensor] | None = None,
    cache: QuantCache | None = None,
    inplace: bool = False,
    act_dtype: torch.dtype = torch.bfloat16,
    dequant_all: bool = False,
    w8a8: bool = False,
    attention_input_bits: int = DEFAULT_ATTENTION_INPUT_BITS,
    intermediate_input_bits: int = DEFAULT_INTERMEDIATE_INPUT_BITS,
) -> tuple[nn.Module, KernelReport]:
    """A copy of `module` whose quantizable layers run `plan` with real kernels.

    Steps: (1) quantize every tensor of `spec` under `plan` (or take `quantized`, e.g. read
    from a package); (2) copy the module unless `inplace`; (3) swap each owning nn.Linear /
    nn.Embedding for the layer `runtime_layer` picks; (4) report per tensor which kernel runs.
    `act_dtype` is what the int8/int4 kernels take as activations: bfloat16 by default because
    their float32 path is a slow reference loop on x86 (50-120x slower than F.linear at 32-128
    rows, measured); pass torch.float32 for bit-faithful numerics.  `dequant_all` runs every
    integer Linear as fp32 F.linear on weights dequantized at load; `w8a8` runs every integer
    Linear as W8A8 on torch._int_mm (see `runtime_layer`); `attention_input_bits` and
    `intermediate_input_bits` (8 or 16) are the activation precisions of the W8A8 Linears that
    read a LayerNorm output — Q/K/V and the FFN input (16: two int8 digits, see
    `_mark_normalized_inputs`).
    """
    plan.validate(spec)
    for field, bits in (
        ("attention_input_bits", attention_input_bits),
        ("intermediate_input_bits", intermediate_input_bits),
    ):
        if bits not in (8, 16):
            raise PlanError(f"{field} must be 8 or 16, got {bits!r}")
    if quantized is None:
        quantized = quantize_plan(module, spec, plan, calib_inputs_by_tensor, cache)
    target = module if inplace else copy.deepcopy(module)
    choices = []
    for t in spec.tensors:
        if t.name not in quantized:
            raise PlanError(f"tensor {t.name!r}: no quantized weights given")
        qt = quantized[t.name]
        if qt.scheme != plan.scheme(t.name):
            raise PlanError(f"tensor {t.name!r}: quantized as {qt.scheme}, plan says {plan.scheme(t.name)}")
        quantizable_parameter(target, t.name)
        owner_name = t.name[: -len(".weight")]
        owner = target.get_submodule(owner_name)
        layer, kernel, note = runtime_layer(owner, qt, act_dtype, dequant_all, w8a8)
        if layer is not owner:
            parent_name, _, child = owner_name.rpartition(".")
            setattr(target.get_submodule(parent_name) if parent_name else target, child, layer)
        elif qt.values is not None:
            with torch.no_grad():
                quantizable_parameter(target, t.name).copy_(qt.values.float())
        choices.append(KernelChoice(t.name, qt.scheme.precision, kernel, note))
    _mark_normalized_inputs(target, attention_input_bits, intermediate_input_bits)
    _share_input_quantization(target)
    fused = _fuse_bert_layers(target)
    reported = []
    for c in choices:
        layer = target.get_submodule(c.name[: -len(".weight")])
        in_block = any(name == c.name or name.endswith("." + c.name) for name in fused)
        two_digits = isinstance(layer, Int8DynamicLinear) and layer.two_digit_input
        if two_digits:
            note = c.note.replace(_INT8_ACT_NOTE, "per-token asymmetric activations as two int8 digits")
            kernel = KERNEL_W8A16_FUSED if in_block else KERNEL_W8A16
            c = replace(c, kernel=kernel, note=f"{c.kernel}; {note}")
        elif in_block:
            c = replace(c, kernel=KERNEL_W8A8_FUSED, note=f"{c.kernel}; {c.note}" if c.note else c.kernel)
        reported.append(c)
    # Inference only: no autograd bookkeeping per call, and every runtime model (built here or
    # loaded from a package) meets the compiled block with the same requires_grad flags, so
    # dynamo's guards do not compile a second graph per origin.
    for param in target.parameters():
        param.requires_grad_(False)
    return target.eval(), KernelReport(tuple(reported))


def _mark_normalized_inputs(model: nn.Module, attention_bits: int, intermediate_bits: int) -> None:
    """Asymmetric per-token activations for the W8A8 Linears that read a LayerNorm output
    (BERT's query/key/value and intermediate).  Those rows are skewed (a few large channels
    of one sign), so symmetric int8 leaves half its codes unused; on the demo model's
    CALIBRATION split the asymmetric grid there raised the W8A8 runtime's full-depth agreement
    with FP32 from 0.968 to 0.970 (the 6.1× mixed plan) and 0.980 to 0.982 (uniform int8),
    while making the attention-context and GELU-output inputs asymmetric too lowered it
    (0.966 / 0.958 for the 6.1× plan): those stay symmetric.

    16 bits quantizes a site's inputs as two int8 digits (`quantize_rows_two_digits_asym`, one
    `_int_mm` on twice the rows).  The defaults (Q/K/V 16, FFN input 8) come from
    `python -m bench engine` on 2026-12-04 (AMD EPYC with AVX-512 VNNI, the 6.05× frontier plan
    at its calibrated exit threshold; test agreement is the worse of evaluator and runtime):

        Q/K/V  FFN in   test agreement   batch-1 ms / FP32 ms (same run)
          8      8          0.9497          5.15 / 15.61  3.03×
         16      8          0.9537          4.71 / 13.65  2.90×
         16     16          0.9557          6.39 / 15.59  2.44×

    The FFN input's GEMM is the wider one (384→1536 against 3 × 384→384), so its second digit
    costs more than the Q/K/V one and brings less; both at 16 bits missed the 2.5× latency
    target, Q/K/V alone meets it with the 0.95 agreement target."""
    for layer in model.modules():
        if not isinstance(layer, _Layer):
            continue
        sa = layer.attention.self
        for m, bits in (
            (sa.query, attention_bits),
            (sa.key, attention_bits),
            (sa.value, attention_bits),
            (layer.intermediate.dense, intermediate_bits),
        ):
            if isinstance(m, Int8DynamicLinear):
                m.asymmetric_input = True
                m.two_digit_input = bits == 16


def _share_input_quantization(model: nn.Module) -> None:
    """Fuse W8A8 siblings (same parent module and input width, e.g. query/key/value) into one
    GEMM per input (`_FusedSiblings`; a hit needs the very same input tensor object)."""
    for parent in model.modules():
        kids = [m for m in parent.children() if isinstance(m, Int8DynamicLinear)]
        if len(kids) > 1 and len({k.in_features for k in kids}) == 1:
            fused = _FusedSiblings(kids)
            for kid in kids:
                kid.shared_input = fused


def _fuse_bert_layers(model: nn.Module) -> set[str]:
    """Run every BERT layer whose six Linears are all W8A8 as one fused block (`_W8A8BertLayer`);
    the qualified weight names of the Linears now inside fused blocks.

    The layer keeps its submodules, names and buffers (reports and `get_submodule` still see
    them); only its class changes, so its forward is `w8a8_bert_block` on the same tensors.
    """
    fused_names: set[str] = set()
    for layer_name, layer in model.named_modules():
        if type(layer) is not _Layer:
            continue
        sa = layer.attention.self
        linears = [
            sa.query,
            sa.key,
            sa.value,
            layer.attention.output.dense,
            layer.intermediate.dense,
            layer.output.dense,
        ]
        if not all(isinstance(m, Int8DynamicLinear) and m.bias is not None for m in linears):
            continue
        # The block's arithmetic fixes which inputs are asymmetric (see `w8a8_bert_block`).
        if [cast(Int8DynamicLinear, m).asymmetric_input for m in linears] != [True] * 3 + [
            False,
            True,
            False,
        ]:
            continue
        qkv = [m for m in linears[:3] if isinstance(m, Int8DynamicLinear)]
        fused = cast("_FusedSiblings | None", qkv[0].shared_input)
        if fused is None or not all(m.shared_input is fused for m in qkv):
            continue
        if fused.slices != {id(m): s for m, s in zip(qkv, _qkv_slices(qkv[0].out_features), strict=True)}:
            continue
        norms = [layer.attention.output.LayerNorm, layer.output.LayerNorm]
        if not all(type(n) is nn.LayerNorm and n.elementwise_affine for n in norms):
            continue
        layer.__class__ = _W8A8BertLayer
        for sub, module in layer.named_modules():
            if module in linears:
                fused_names.add(f"{layer_name}.{sub}.weight")
    return fused_names


def _qkv_slices(h: int) -> list[slice]:
    return [slice(0, h), slice(h, 2 * h), slice(2 * h, 3 * h)]


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_bias: torch.Tensor
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, keep)` written as plain ops, for the compiled
    block: inductor then fuses scale, mask and softmax into one loop around two small GEMMs,
    and the block runs ~12 % faster at batch 1 than with torch's fused CPU attention called as
    an opaque kernel (measured at 57 tokens, interleaved).  Eager code keeps SDPA: on strided
    multi-text batches these plain ops are 1.5–4× slower than it.

    The mask arrives as an additive float bias (0 for a real token, −inf for padding; see
    `attention_mask_bias`), not as the bool `keep`: inductor's loop over a bool mask converts
    it element by element and cost ~65 µs per block at 57 tokens against ~15 µs with the
    added bias (measured, kernel profile).  The result is the same: score + 0 is the score and
    score + −inf is −inf, as masked_fill gives.  Every query row keeps at least its own [CLS]
    key, so no softmax row is all −inf.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    weights = torch.softmax(scores + mask_bias, dim=-1)
    return torch.matmul(weights, v)


def attention_mask_bias(keep: torch.Tensor) -> torch.Tensor:
    """The additive float form of a bool `keep` mask: 0 where True, −inf where False."""
    return torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))


def w8a8_bert_block(
    x: torch.Tensor,
    mask_bias: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    heads: int,
    eps1: float,
    eps2: float,
    qkv_two_digits: bool = False,
    intermediate_two_digits: bool = False,
) -> torch.Tensor:
    """One post-norm BERT layer with every Linear on W8A8 `_int_mm` (the numerics of
    `Int8DynamicLinear`: per-token symmetric int8 activations, per-channel int8 weights).

    `weights`: (qkv int8, qkv scale, qkv row sums, qkv bias, attention-output int8, scale,
    bias, norm 1 weight, bias, intermediate int8, scale, row sums, bias, output int8, scale,
    bias, norm 2 weight, bias); Q, K and V run as one GEMM on their concatenated weights.  The
    two GEMMs reading a LayerNorm output (Q/K/V, intermediate) take asymmetric per-token
    activations (as two int8 digits if `qkv_two_digits` / `intermediate_two_digits`), the
    other two symmetric — as `build_runtime_model` marks the layers.  A pure function of
    tensors (no Python state), so one `torch.compile` serves every layer of every plan of the
    same shapes (and digits).
    """
    wqkv, sqkv, rqkv, bqkv, wo, so, bo, g1, b1, wi, si, ri, bi, w2, s2, b2, g2, b2n = weights
    b, t, h = x.shape
    x2 = x.reshape(b * t, h)
    qkv = (
        _int8_product(x2, wqkv, sqkv, rqkv, bqkv, True, qkv_two_digits)
        .view(b, t, 3, heads, h // heads)
        .permute(2, 0, 3, 1, 4)
    )
    ctx = _masked_attention(qkv[0], qkv[1], qkv[2], mask_bias)
    ctx = ctx.transpose(1, 2).reshape(b * t, h)
    y = F.layer_norm(_int8_product(ctx, wo, so, None, bo, False) + x2, (h,), g1, b1, eps1)
    inner = F.gelu(_int8_product(y, wi, si, ri, bi, True, intermediate_two_digits))
    out = F.layer_norm(_int8_product(inner, w2, s2, None, b2, False) + y, (h,), g2, b2n, eps2)
    return out.view(b, t, h)


def w8a8_bert_block_and_exit(
    x: torch.Tensor,
    mask_bias: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    heads: int,
    eps1: float,
    eps2: float,
    qkv_two_digits: bool,
    intermediate_two_digits: bool,
    logits: torch.Tensor,
    head_weight: torch.Tensor,
    head_select: torch.Tensor,
    head_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`w8a8_bert_block` on ONE text without padding, then this block's part of every exit
    head: (block output, running logits, max softmax probability, class of this block's head).

    The block's mean-pooled state times `head_weight` (hidden × heads·classes: for each head
    that reads this block, its columns for it; zeros elsewhere) is added to `logits`, the
    running logits of all heads (a dense head reads every block up to its own, so its logits
    are complete at its block); `head_select` (heads·classes × classes) picks this block's
    head and `head_bias` is its bias.  One compiled call per block replaces the block plus
    the eager pooling and classifying between blocks (~10 small ops).  The sum runs in another
    order than `F.linear` over the concatenated pooled states: the same logits to float
    rounding, so only a text whose confidence sits within rounding of the threshold can exit
    elsewhere than in the batched evaluation.
    """
    out = w8a8_bert_block(x, mask_bias, weights, heads, eps1, eps2, qkv_two_digits, intermediate_two_digits)
    pooled = out.sum(1) / out.shape[1]
    logits = torch.addmm(logits, pooled, head_weight)
    conf, pred = torch.softmax(logits @ head_select + head_bias, dim=-1).max(dim=-1)
    return out, logits, conf, pred


#: Whether fused W8A8 blocks run through ``torch.compile`` (inductor fuses the activation
#: quantization, rescale, bias, residual, LayerNorm and GELU passes into a few C++ loops).
#: EDGEFIT_RUNTIME_COMPILE=0 keeps them eager (the same function, op by op); a compile
#: failure (e.g. no C++ compiler on the host) falls back to eager for the process.
_COMPILE_STATE: dict[str, Any] = {
    "enabled": os.environ.get("EDGEFIT_RUNTIME_COMPILE", "1") != "0",
    "fn": None,
    "fn_exit": None,
    "error": None,
}


_BlockExitOutput: TypeAlias = "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]"


#: Specializations one block function may compile (dynamo's default is 8).  Weight shapes,
#: head count, eps, the two digit flags and batch 1 vs batched each specialize the graph, so a
#: process holding a few architectures or variants (a worker measuring many plans, a server
#: with several models) can pass 8 — after which dynamo runs every new specialization eagerly
#: (~2× slower per block) with one log line and no error.
_RECOMPILE_LIMIT = 64


def _compiled(key: str, fn: Callable[..., Any]) -> Any:
    """`fn` through ``torch.compile`` once per process (None when compiling is off or failed).

    dynamic=None: weight shapes stay static (vectorized inner loops); batch and sequence
    length are marked dynamic per call, so one graph serves every text length.
    realize_opcount_threshold=4: store the rescaled GELU output once instead of letting the
    quantization loop recompute it (inductor's default, 30, inlined the chain into both the
    row-max and the rounding pass: erf twice per element).  Same numbers; the GELU loop went
    from ~57 to ~30 µs per block at 57 tokens and batch 1 got 1–13 % faster in interleaved A/B
    runs (planner output bit-identical).  size_asserts=False: the generated wrapper re-checked
    the size and stride of all 19 inputs on every call, which dynamo's guards have already
    checked before it runs (−3.5 to −4.5 % per text at batch 1, interleaved A/B; inductor's
    cpp_wrapper: no gain).
    """
    if not _COMPILE_STATE["enabled"]:
        return None
    if _COMPILE_STATE[key] is None:
        # torch.compile's typed overloads omit `recompile_limit`, which the function takes.
        _COMPILE_STATE[key] = torch.compile(  # type: ignore[call-overload]
            fn,
            dynamic=None,
            options={"realize_opcount_threshold": 4, "size_asserts": False},
            recompile_limit=_RECOMPILE_LIMIT,
        )
    return _COMPILE_STATE[key]


class _BlockAndExit(nn.Module):
    """`w8a8_bert_block_and_exit` with its Python scalars fixed, for ``torch.export``."""

    def __init__(self, heads: int, eps1: float, eps2: float, qkv_digits: bool, inter_digits: bool) -> None:
        super().__init__()
        self.flags = (heads, eps1, eps2, qkv_digits, inter_digits)

    def forward(
        self,
        x: torch.Tensor,
        mask_bias: torch.Tensor,
        logits: torch.Tensor,
        head_weight: torch.Tensor,
        head_select: torch.Tensor,
        head_bias: torch.Tensor,
        *weights: torch.Tensor,
    ) -> _BlockExitOutput:
        heads, eps1, eps2, qkv_digits, inter_digits = self.flags
        return w8a8_bert_block_and_exit(
            x,
            mask_bias,
            weights,
            heads,
            eps1,
            eps2,
            qkv_digits,
            inter_digits,
            logits,
            head_weight,
            head_select,
            head_bias,
        )


#: AOTInductor packages of `w8a8_bert_block_and_exit` (the batch-1 path), per specialization.
#: Why: the dynamo-compiled function spends ~85 µs per call outside its kernels (guard checks,
#: region entry, the Python wrapper); the same graph as an AOTInductor package ran 527–552 µs
#: per call against dynamo's 611–640 µs (62 tokens, tight loop; 472 vs 560 µs over 100 test
#: texts; bit-identical outputs; 2-core Xeon with AMX, 2026-12-04).  A package is compiled once
#: per (shapes, flags, thread count, torch version, source) — ~25 s — and kept on disk
#: (``$EDGEFIT_AOT_DIR``, default ``<tmp>/edgefit-aot``), so later processes only load it.
#: EDGEFIT_RUNTIME_AOT=0 keeps the dynamo path; any export/compile/load failure falls back to
#: it for the process (`fused_block_compile_error` says why).
_AOT_STATE: dict[str, Any] = {
    "enabled": os.environ.get("EDGEFIT_RUNTIME_AOT", "1") != "0",
    "packages": {},
    "error": None,
}
_AOT_LOCK = threading.Lock()
#: The sequence lengths a package accepts: [CLS] and [SEP] at least, BERT's 512 positions at most.
_AOT_TOKENS = (2, 512)


@functools.cache
def _aot_source_hash() -> str:
    """Hash of the code a package bakes in: a changed block function is a new package."""
    parts = [
        inspect.getsource(f)
        for f in (
            w8a8_bert_block,
            w8a8_bert_block_and_exit,
            _int8_product,
            quantize_rows_int8,
            quantize_rows_int8_asym,
            quantize_rows_two_digits_asym,
            _asym_row_grid,
            _masked_attention,
        )
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _tensor_signature(tensors: Sequence[torch.Tensor]) -> tuple[tuple[tuple[int, ...], str], ...]:
    return tuple((tuple(t.shape), str(t.dtype)) for t in tensors)


def _aot_block_and_exit(
    args: tuple[Any, ...], weights_signature: tuple[tuple[tuple[int, ...], str], ...]
) -> Callable[..., Any] | None:
    """The AOTInductor runner for `w8a8_bert_block_and_exit(*args)`'s specialization (loaded or
    compiled on first use), or None when it is off, failed, or `args` are outside its range.
    `weights_signature` is `_tensor_signature` of the weights, which the caller keeps per layer
    (`_W8A8BertLayer._block_args`: rebuilding it per call cost ~7 µs, on every block of every
    request)."""
    if not (_AOT_STATE["enabled"] and _COMPILE_STATE["enabled"]):
        return None
    x, mask_bias, weights, heads, eps1, eps2, qkv_digits, inter_digits, logits, hw, hs, hb = args
    if x.shape[0] != 1 or not _AOT_TOKENS[0] <= x.shape[1] <= _AOT_TOKENS[1]:
        return None
    key = (
        heads,
        eps1,
        eps2,
        qkv_digits,
        inter_digits,
        weights_signature,
        _tensor_signature((logits, hw, hs, hb)),
        torch.get_num_threads(),
    )
    runner = _AOT_STATE["packages"].get(key)
    if runner is not None:
        return cast("Callable[..., Any]", runner)
    with _AOT_LOCK, warnings.catch_warnings():
        # torch's own pytree code warns (FutureWarning, `LeafSpec`) on export and on every
        # package load: nothing for a caller to act on.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        runner = _AOT_STATE["packages"].get(key)
        if runner is not None:
            return cast("Callable[..., Any]", runner)
        try:
            tag = hashlib.sha256(repr((key, torch.__version__, _aot_source_hash())).encode()).hexdigest()[:24]
            folder = Path(os.environ.get("EDGEFIT_AOT_DIR") or Path(tempfile.gettempdir()) / "edgefit-aot")
            path = folder / f"block-exit-{tag}.pt2"
            if not path.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                tokens = torch.export.Dim("tokens", min=_AOT_TOKENS[0], max=_AOT_TOKENS[1])
                shapes = ({1: tokens}, {3: tokens}, None, None, None, None, tuple(None for _ in weights))
                # Callers run under inference mode; the export traces ordinary copies outside it.
                # Whole or absent: a crash never leaves half a package (aoti wants a .pt2 name).
                with torch.inference_mode(False), replacing(path, ".pt2") as partial:
                    flat = tuple(t.clone() for t in (x, mask_bias, logits, hw, hs, hb, *weights))
                    program = torch.export.export(
                        _BlockAndExit(heads, eps1, eps2, qkv_digits, inter_digits),
                        flat,
                        dynamic_shapes=shapes,
                    )
                    torch._inductor.aoti_compile_and_package(
                        program, package_path=str(partial), inductor_configs={"realize_opcount_threshold": 4}
                    )
            try:
                runner = torch._inductor.aoti_load_package(str(path))
            except Exception:
                path.unlink(missing_ok=True)  # damaged: the next process compiles it afresh
                raise
        except Exception as exc:  # no compiler, unsupported op, damaged file: the dynamo path runs
            _AOT_STATE["enabled"] = False
            _AOT_STATE["error"] = f"{type(exc).__name__}: {exc}"[:500]
            return None
        _AOT_STATE["packages"][key] = runner
        return cast("Callable[..., Any]", runner)


def aot_packages_loaded() -> int:
    """How many AOTInductor block packages this process runs (see `_AOT_STATE`)."""
    return len(_AOT_STATE["packages"])


def compiled_vector_isa() -> str:
    """The SIMD instruction set torch's inductor writes the fused blocks' loops for on this host
    ("none": scalar loops).  Worth printing: when inductor's probe of the host fails (its probe
    child once imported a stray ``re.py`` from the working directory), it compiles scalar loops
    without a word, and a W8A8 text took 5.4 ms instead of 2.6 ms."""
    try:
        from torch._inductor import cpu_vec_isa

        isa = cpu_vec_isa.pick_vec_isa()
    except Exception as exc:  # a private torch module: report, never fail a caller
        return f"unknown ({type(exc).__name__})"
    return str(isa) if isa else "none (scalar loops)"


def fused_block_compile_error() -> str | None:
    """Why fused blocks fell back in this process — from torch.compile to eager, or at batch 1
    from an AOTInductor package to torch.compile (None: no fallback, or never tried)."""
    err: str | None = _COMPILE_STATE["error"] or _AOT_STATE["error"]
    return err


#: (linears, `w8a8_bert_block` weights, heads, eps1, eps2, Q/K/V and intermediate inputs as
#: two digits, the weights' `_tensor_signature`) of one fused layer.
_BlockArgs: TypeAlias = (
    "tuple[tuple[Int8DynamicLinear, ...], tuple[torch.Tensor, ...], int, float, float, bool, bool, "
    "tuple[tuple[tuple[int, ...], str], ...]]"
)


class _W8A8BertLayer(_Layer):
    """A `planner.models.bert._Layer` whose six Linears are `Int8DynamicLinear`, run as one fused
    block (see `_fuse_bert_layers`); same submodules and buffers, forward = `w8a8_bert_block`."""

    def _parts(self) -> tuple[tuple[Int8DynamicLinear, ...], tuple[nn.LayerNorm, nn.LayerNorm], int]:
        sa = self.attention.self
        names = ("query", "key", "value")
        qkv = tuple(cast(Int8DynamicLinear, getattr(sa, n)) for n in names)
        ao = cast(Int8DynamicLinear, self.attention.output.dense)
        inter = cast(Int8DynamicLinear, self.intermediate.dense)
        out = cast(Int8DynamicLinear, self.output.dense)
        norms = (self.attention.output.LayerNorm, self.output.LayerNorm)
        return (*qkv, ao, inter, out), norms, int(sa.n_heads)

    def _block_args(self) -> _BlockArgs:
        """(linears, `w8a8_bert_block` weights, heads, eps1, eps2, digit flags, the weights'
        signature for the AOT package key), gathered once: walking the nested modules'
        attributes on every call cost ~10 % of batch-1 latency (measured), rebuilding the
        signature ~7 µs per block call.
        `_apply` (`.to()`, `.float()`, …) drops the cache, so moved or converted buffers are
        re-read — but the fused Q/K/V weights live on the `_FusedSiblings` group, which no
        `_apply` reaches, so moving a built runtime model is not supported (nothing in the
        product moves one: models are built where they run).
        Assigning a new buffer to a fused Linear directly would not be seen either."""
        cached = self.__dict__.get("_block_args_cache")
        if cached is None:
            linears, (n1, n2), heads = self._parts()
            fused = linears[0].shared_input
            assert fused is not None
            ao, inter, out = linears[3:]
            weights: tuple[torch.Tensor, ...] = (fused.weight, fused.scale, fused.rowsum, fused.bias)
            for layer, norm in ((ao, n1), (inter, None), (out, n2)):
                assert layer.bias is not None
                weights += (layer.weight_int8, layer.weight_scale)
                if layer is inter:
                    weights += (layer.weight_rowsum,)
                weights += (layer.bias,)
                if norm is not None:
                    weights += (norm.weight, norm.bias)
            digits = (fused.two_digits, inter.two_digit_input)
            cached = (
                linears,
                weights,
                heads,
                float(n1.eps),
                float(n2.eps),
                *digits,
                _tensor_signature(weights),
            )
            self.__dict__["_block_args_cache"] = cached
        return cast("_BlockArgs", cached)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> _W8A8BertLayer:
        self.__dict__.pop("_block_args_cache", None)
        super()._apply(fn, recurse)
        return self

    def forward(self, x: torch.Tensor, keep: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """Post-norm BERT layer; `keep` is a (batch, 1, 1, seq) bool mask of real tokens.
        Packed hidden states (`packing`, see `_Layer.forward`) are padded for the fused block,
        which takes the padded layout, and packed again."""
        if packing is not None:
            b, t = keep.shape[0], keep.shape[-1]
            return packing.pack(self.forward(packing.unpack(x, b, t), keep))
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x, keep)
        out: torch.Tensor = self._run_fused("fn", w8a8_bert_block, x, attention_mask_bias(keep))
        return out

    def forward_and_exit(
        self,
        x: torch.Tensor,
        mask_bias: torch.Tensor,
        logits: torch.Tensor,
        head: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> _BlockExitOutput:
        """`w8a8_bert_block_and_exit` for one unpadded text (`mask_bias` from
        `attention_mask_bias`, `head` = (head weight, select, bias) of this block); the
        block output, running logits, confidence and class of this block's exit head."""
        out: _BlockExitOutput = self._run_fused(
            "fn_exit", w8a8_bert_block_and_exit, x, mask_bias, logits, *head
        )
        return out

    def _run_fused(
        self,
        key: str,
        block: Callable[..., Any],
        x: torch.Tensor,
        mask_bias: torch.Tensor,
        *extra: torch.Tensor,
    ) -> Any:
        """`block(x, mask_bias, <this layer's weights and flags>, *extra)`, compiled
        (`_compiled(key, block)`) unless compiling is off or fails — then eager, same numbers."""
        linears, weights, heads, eps1, eps2, qkv_digits, inter_digits, signature = self._block_args()
        for layer in linears:
            # `calls` is a plain attribute: skip nn.Module.__setattr__'s parameter/buffer checks.
            layer.__dict__["calls"] += 1
        args = (x, mask_bias, weights, heads, eps1, eps2, qkv_digits, inter_digits, *extra)
        if key == "fn_exit":
            runner = _aot_block_and_exit(args, signature)
            if runner is not None:
                return tuple(runner(x, mask_bias, *extra, *weights))
        fn = _compiled(key, block)
        if fn is not None:
            torch._dynamo.maybe_mark_dynamic(x, 1)
            torch._dynamo.maybe_mark_dynamic(mask_bias, 3)
            if x.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(x, 0)
                torch._dynamo.maybe_mark_dynamic(mask_bias, 0)
            try:
                return fn(*args)
            except Exception as exc:  # compiler missing or broken: stay correct, run eager
                _COMPILE_STATE["enabled"] = False
                _COMPILE_STATE["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return block(*args)


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock seconds per call (time.perf_counter around the real call); measured, not predicted."""

    samples_s: tuple[float, ...]
    median_s: float
    p90_s: float
    mean_s: float
    min_s: float
    warmup: int
    threads: int
    predicted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, samples_s=list(self.samples_s))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks, as numpy's default.
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure_latency(
    fn: Callable[..., object],
    inputs: Sequence[object] = (),
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> LatencyStats:
    """Time `fn(*inputs)` `repeats` times after `warmup` untimed calls, under inference mode.

    `threads` sets torch's intra-op thread count for the measurement and restores it after.
    """
    if repeats < 1 or warmup < 0:
        raise PlanError(f"repeats ({repeats}) must be ≥ 1 and warmup ({warmup}) ≥ 0")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        samples = []
        with torch.inference_mode():
            for _ in range(warmup):
                fn(*inputs)
            for _ in range(repeats):
                start = time.perf_counter()
                fn(*inputs)
                samples.append(time.perf_counter() - start)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    ordered = sorted(samples)
    return LatencyStats(
        samples_s=tuple(samples),
        median_s=statistics.median(samples),
        p90_s=_percentile(ordered, 0.9),
        mean_s=statistics.fmean(samples),
        min_s=ordered[0],
        warmup=warmup,
        threads=used_threads,
    )


@dataclass(frozen=True)
class MemoryStats:
    """Memory of running a model, in bytes (measured, not predicted).

    `weights_bytes`: bytes of the module's parameter and buffer storages (each counted once)
    — exact for those; copies the runtime keeps outside them are not counted (the dequantized
    copy of a small embedding table, ≤ 1 MiB each, built on first lookup; a fused Q/K/V
    group's concatenated scales, row sums and bias).  On hosts that run integer Linears as
    W8A8, int2/3/4 weights are held widened to int8, so this exceeds the packed size.
    `activation_peak_bytes`: peak of net tensor allocations during one call as
    recorded by the torch profiler at op granularity (temporaries allocated and freed inside
    a single op are not seen, so this is a lower bound).  Process RSS is not used: it mixes in
    the interpreter, libraries and allocator caching.
    """

    weights_bytes: int
    activation_peak_bytes: int
    method: str = "storage bytes + torch.profiler(profile_memory) op-level allocation peak"
    predicted: bool = False

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_peak_bytes


def module_storage_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer storage of `module`, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def measure_memory(
    module: nn.Module, fn: Callable[..., object], inputs: Sequence[object] = ()
) -> MemoryStats:
    """Storage bytes of `module` plus the profiler-observed allocation peak of `fn(*inputs)`.

    Steps: (1) sum storage bytes; (2) profile one call with memory tracking; (3) order the
    ops' self allocations and the free events by start time and take the running sum's peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*inputs)
    timeline = []
    for event in prof.events():
        usage = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if usage:
            timeline.append((event.time_range.start, int(usage)))
    timeline.sort()
    current = peak = 0
    for _, delta in timeline:
        current += delta
        peak = max(peak, current)
    return MemoryStats(weights_bytes=module_storage_bytes(module), activation_peak_bytes=peak)


def benchmark_linear(
    out_features: int,
    in_features: int,
    rows: int,
    *,
    threads: int = 2,
    repeats: int = 30,
    warmup: int = 5,
    seed: int = 0,
    kernels: Sequence[str] | None = None,
) -> dict[str, LatencyStats]:
    """Time one Linear of the given shape on `rows` input rows under each host kernel.

    Kernels: fp32 F.linear (torch's default path, MKL), fp32 on oneDNN (the runtime's fp32
    layers use whichever of the two `KERNEL_FP32` names), int8pack_mm and int4pack_mm_for_cpu
    with fp32 and with bf16 activations, fp16 storage with per-call upcast, and the bare
    int8 × int8 → int32 `_int_mm` GEMM on int8 operands (`RAW_INT_MM`, what W8A8 Linears
    build on); `kernels` keeps only the named ones, and only those are built.  The variants
    are interleaved call by call so a noisy, shared machine slows them all alike.
    """
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    x = torch.randn(rows, in_features, generator=gen)
    x_int8 = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8, generator=gen)
    weight_int8_t = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=gen).t()

    @functools.cache  # shared by the fp32- and bf16-activation variants, built on demand
    def int8() -> QuantizedTensor:
        return quantize(weight, _scheme("int8"))

    @functools.cache
    def int4() -> QuantizedTensor:
        return quantize(weight, _scheme("int4", 32 if in_features % 128 else 128))

    builders: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
        KERNEL_FP32_DEFAULT: lambda: lambda t: F.linear(t, weight),
        KERNEL_FP32_ONEDNN: lambda: lambda t: onednn_product(t, weight),
        f"{KERNEL_INT8} (fp32 act)": lambda: Int8Linear(int8()),
        f"{KERNEL_INT8} (bf16 act)": lambda: Int8Linear(int8(), act_dtype=torch.bfloat16),
        f"{KERNEL_INT4} (fp32 act)": lambda: Int4Linear(int4()),
        f"{KERNEL_INT4} (bf16 act)": lambda: Int4Linear(int4(), act_dtype=torch.bfloat16),
        KERNEL_FP16_UPCAST: lambda: Fp16Linear(quantize(weight, _scheme("fp16"))),
        RAW_INT_MM: lambda: lambda _: torch._int_mm(x_int8, weight_int8_t),
    }
    if kernels is not None:
        unknown = set(kernels) - set(builders)
        if unknown:
            raise PlanError(f"unknown kernel(s) {', '.join(sorted(unknown))}; known: {', '.join(builders)}")
    layers = {name: builders[name]() for name in (builders if kernels is None else kernels)}
    samples: dict[str, list[float]] = {name: [] for name in layers}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                for name, layer in layers.items():
                    start = time.perf_counter()
                    layer(x)
                    if i >= warmup:
                        samples[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(old_threads)
    out = {}
    for name, s in samples.items():
        ordered = sorted(s)
        out[name] = LatencyStats(
            samples_s=tuple(s),
            median_s=statistics.median(s),
            p90_s=_percentile(ordered, 0.9),
            mean_s=statistics.fmean(s),
            min_s=ordered[0],
            warmup=warmup,
            threads=threads,
        )
    return out


def _scheme(precision: str, group_size: int | None = None) -> TensorScheme:
    return TensorScheme(precision, group_size, True, "rtn")


# --------------------------------------------------------------------------- W8A8 (_int_mm)


def int_mm_supported(
    rows: int, in_features: int, out_features: int, device: torch.device | None = None
) -> bool:
    """Whether ``torch._int_mm`` takes an (rows, in) × (in, out) int8 product on `device`.

    On CPU (torch 2.13) every shape works (checked down to 1×7×9); on CUDA the kernel needs
    rows > 16 and in, out multiples of 8.  Anything else falls back (see Int8DynamicLinear).
    """
    if rows < 1 or in_features < 1 or out_features < 1:
        return False
    dev = device or torch.device("cpu")
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return rows > 16 and in_features % 8 == 0 and out_features % 8 == 0
    return False


#: EDGEFIT_W8A8: "1" always runs integer Linears as W8A8, "0" never (fp32 on weights
#: dequantized at load), "auto" (or unset) decides by `probe_int8_matmul` once per process.
W8A8_ENV = "EDGEFIT_W8A8"


@dataclass(frozen=True)
class Int8MatmulProbe:
    """``torch._int_mm`` against this host's fp32 path (`onednn_linear`) on one model-sized
    GEMM, each the median of interleaved calls; measured."""

    rows: int
    in_features: int
    out_features: int
    int8_s: float
    fp32_s: float
    threads: int

    @property
    def int8_speedup(self) -> float:
        return self.fp32_s / self.int8_s

    @property
    def favours_w8a8(self) -> bool:
        """W8A8 adds per-token activation quantization to the GEMM, so an int8 GEMM merely as
        fast as fp32 would already lose; one slower than it (x86 without VNNI) makes every
        quantized plan slower than FP32 (~20× on the Zen 3 host measured)."""
        return self.int8_speedup > 1.0

    def describe(self) -> str:
        return (
            f"_int_mm {self.int8_s * 1e3:.3f} ms vs fp32 {self.fp32_s * 1e3:.3f} ms at "
            f"{self.rows}×{self.in_features}→{self.out_features}, {self.threads} threads "
            f"({self.int8_speedup:.2f}×)"
        )


_PROBES: dict[tuple[int, int, int, int], Int8MatmulProbe] = {}


def probe_int8_matmul(
    rows: int = 64,
    in_features: int = 384,
    out_features: int = 1536,
    *,
    repeats: int = 15,
    threads: int | None = None,
) -> Int8MatmulProbe:
    """Time one int8 × int8 → int32 `_int_mm` and the fp32 path at the same shape (the demo
    model's FFN input at a typical text's length), interleaved call by call
    (`benchmark_linear`); cached per process, shape and thread count.  Costs ~10–50 ms on a
    fast host; on an x86 host without VNNI the int8 side is a slow generic path (measured on
    a Zen 3 host: 13 ms against 0.55 ms fp32 at 50×384→1152), which is what this probe exists
    to notice.  `threads`: the thread count the model will run at (default: torch's current
    one) — the two paths scale differently with threads, so the answer can differ."""
    key = (rows, in_features, out_features, threads or torch.get_num_threads())
    if key in _PROBES:
        return _PROBES[key]
    got = benchmark_linear(
        out_features,
        in_features,
        rows,
        threads=key[3],
        repeats=repeats,
        warmup=2,
        kernels=(RAW_INT_MM, KERNEL_FP32),
    )
    probe = Int8MatmulProbe(
        rows, in_features, out_features, got[RAW_INT_MM].median_s, got[KERNEL_FP32].median_s, key[3]
    )
    _PROBES[key] = probe
    return probe


def w8a8_pays_off(threads: int | None = None) -> tuple[bool, str]:
    """Whether integer Linears should run as W8A8 on this host, and why (one line).

    `W8A8_ENV` forces it either way; otherwise W8A8 when `probe_int8_matmul` finds
    ``_int_mm`` faster than the fp32 path (`Int8MatmulProbe.favours_w8a8`) at `threads`
    (the thread count the model will run at; default torch's current one)."""
    setting = os.environ.get(W8A8_ENV, "auto").strip().lower()
    if setting in ("1", "0"):
        on = setting == "1"
        return on, f"{W8A8_ENV}={setting}: W8A8 {'forced on' if on else 'off'}"
    if setting not in ("", "auto"):
        raise PlanError(f"{W8A8_ENV} must be 1, 0 or auto, got {setting!r}")
    probe = probe_int8_matmul(threads=threads)
    if probe.favours_w8a8:
        return True, f"W8A8: {probe.describe()}"
    return False, f"fp32 on dequantized weights: int8 GEMMs are not faster here ({probe.describe()})"


def _int8_weight(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, bool, str]:
    """(int8 weight (out, in), fp32 scale per output channel, exact?, how) for the W8A8 kernel.

    Per-channel symmetric codes of any width ≤ 8 bits are exact int8 values after removing the
    mid-point zero (int4 codes 0..15 → −8..7).  Per-channel asymmetric codes are exact when
    q − z fits int8 (≤ 7 bits).  Grouped scales cannot ride on one per-channel rescale after
    the integer product, so those weights are dequantized and re-quantized to per-channel
    symmetric int8 at load (an int8 grid over an int4/int3 grid adds ≤ 1/16 of its step).
    """
    assert qt.codes is not None and qt.scales is not None
    bits = qt.scheme.bits
    if qt.scheme.group_size is None or qt.group_size == qt.shape[1]:
        if qt.zeros is None:
            w = (qt.codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
            return w.contiguous(), qt.scales.float().reshape(-1).contiguous(), True, "exact"
        if bits <= 7:
            w = (qt.codes.to(torch.int16) - qt.zeros.float().round().to(torch.int16)).to(torch.int8)
            return w.contiguous(), qt.scales.float().reshape(-1).contiguous(), True, "exact (zero folded)"
    dense = dequantize(qt)
    scale = (dense.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    w = torch.round(dense / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return w.contiguous(), scale.contiguous(), False, "re-quantized per channel to int8 at load"


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric int8 quantization: (codes (m, k) int8, scale (m, 1) fp32).

    scale = max|x_row| / 127 so the row's largest magnitude maps to ±127 and nothing clips;
    multiplying by the reciprocal (one division per row) keeps the eager cost to ~4 passes.
    """
    # abs + amax: measured 4× faster here than the single linalg.vector_norm(∞) reduction.
    amax = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
    q = (x * (127.0 / amax)).round_().to(torch.int8)
    return q, amax / 127.0


def quantize_rows_int8_asym(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric int8 quantization with an integer zero point:
    (codes (m, k) int8, scale (m, 1) fp32, zero (m, 1) int32), x ≈ scale · (codes − zero).

    The row's range, widened to include 0, maps onto all 256 codes (symmetric quantization
    spends half of them on the side a skewed row does not use), and 0 is exactly the code
    `zero`, so padding-like and near-zero inputs add no systematic offset.
    """
    steps, scale, zero = _asym_row_grid(x)
    q = (torch.round(steps) + zero).clamp_(-128, 127).to(torch.int8)
    return q, scale, zero.to(torch.int32)


def _asym_row_grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x / scale, scale (m, 1), zero (m, 1) as whole floats) of the per-row asymmetric grid
    shared by `quantize_rows_int8_asym` and `quantize_rows_two_digits_asym`."""
    lo, hi = torch.aminmax(x, dim=1, keepdim=True)  # one pass for both ends
    scale = ((hi.clamp(min=0.0) - lo.clamp(max=0.0)) / 255.0).clamp_(min=1e-12)
    inverse = 1.0 / scale  # one division per row; the elements are multiplied
    zero = -128.0 - torch.round(lo.clamp(max=0.0) * inverse)
    return x * inverse, scale, zero


#: The second digit's weight: x ≈ scale · (q − zero + r / RESIDUAL_STEPS), |r| ≤ 127.
RESIDUAL_STEPS = 254.0


def quantize_rows_two_digits_asym(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric activations at ~16 bits as two int8 digits, stacked for one GEMM:
    (digits (2m, k) int8 = [q; r], scale (m, 1) fp32, zero (m, 1) int32), where
    x ≈ scale · (q − zero + r / 254).

    q, scale and zero are `quantize_rows_int8_asym`'s; r is the rounding residual
    x / scale + zero − q (within ±½ step, as nothing clips) on a 254-step int8 grid, so the
    error is ≤ scale / 508 instead of scale / 2.  Stacking both digits as 2m rows lets one
    ``_int_mm`` read the weight once for both.
    """
    steps, scale, zero = _asym_row_grid(x)
    whole = torch.round(steps)
    q = (whole + zero).clamp_(-128, 127)
    r = torch.round((steps - whole) * RESIDUAL_STEPS).clamp_(-127, 127)
    return torch.cat([q, r]).to(torch.int8), scale, zero.to(torch.int32)


def _int8_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_rowsum: torch.Tensor | None,
    bias: torch.Tensor | None,
    asymmetric: bool,
    two_digits: bool = False,
) -> torch.Tensor:
    """(m, k) fp32 rows × int8 (n, k) weight on ``torch._int_mm`` with per-row int8
    activations: symmetric (`quantize_rows_int8`) or asymmetric (`quantize_rows_int8_asym`,
    whose zero point comes off the int32 accumulator as zero · Σ_k w, exactly in int32; the
    row sums are needed then only), or with `two_digits` asymmetric at ~16 bits
    (`quantize_rows_two_digits_asym`: both digits in one product on 2m rows).
    `Int8DynamicLinear`, `_FusedSiblings` and the fused block (`w8a8_bert_block`, compiled)
    all multiply through here."""
    if asymmetric and two_digits:
        assert weight_rowsum is not None
        digits, act_scale, zero = quantize_rows_two_digits_asym(x)
        both = torch._int_mm(digits, weight.t())
        m = x.shape[0]
        y = ((both[:m] - zero * weight_rowsum) + both[m:] * (1.0 / RESIDUAL_STEPS)) * act_scale
    elif asymmetric:
        assert weight_rowsum is not None
        q, act_scale, zero = quantize_rows_int8_asym(x)
        y = (torch._int_mm(q, weight.t()) - zero * weight_rowsum) * act_scale
    else:
        q, act_scale = quantize_rows_int8(x)
        y = torch._int_mm(q, weight.t()) * act_scale  # int32 × fp32 → fp32 in one pass
    return y.mul_(weight_scale) if bias is None else torch.addcmul(bias, y, weight_scale)


class _FusedSiblings:
    """Sibling W8A8 layers that read one input (Q, K and V read the same hidden state).

    The first sibling called with a new input quantizes it once and runs ONE ``_int_mm``
    against the siblings' concatenated weights (one rescale + bias pass for all); the others
    return their column slice.  The input tensor itself is held, so an identity (+ version)
    match can never be a stale hit on a recycled address.  Saves 2 quantizations, 2 GEMM
    launches and 2 rescale passes per attention block.
    """

    def __init__(self, layers: Sequence[Int8DynamicLinear]) -> None:
        if len({(layer.asymmetric_input, layer.two_digit_input) for layer in layers}) != 1:
            raise PlanError("fused sibling layers must quantize their shared input alike")
        self.asymmetric = layers[0].asymmetric_input
        self.two_digits = layers[0].two_digit_input
        self.weight = torch.cat([layer.weight_int8 for layer in layers]).contiguous()
        self.scale = torch.cat([layer.weight_scale for layer in layers]).contiguous()
        self.rowsum = torch.cat([layer.weight_rowsum for layer in layers]).contiguous()
        self.bias = torch.cat(
            [layer.bias if layer.bias is not None else torch.zeros(layer.out_features) for layer in layers]
        )
        self.slices: dict[int, slice] = {}
        start = 0
        for layer in layers:
            stop = start + layer.out_features
            self.slices[id(layer)] = slice(start, stop)
            # The layer's own weight becomes a view of the fused one: no second copy in memory.
            layer.weight_int8 = self.weight[start:stop]
            start = stop
        self.source: torch.Tensor | None = None
        self.version = -1
        self.value: torch.Tensor | None = None
        #: Siblings that have not yet taken their slice of `value`; when none is left the input
        #: and the fused output are let go (held, they kept ~25 MB per layer alive after a
        #: 32 × 128 batch until the next call).
        self._unread: set[int] = set()
        self.hits = 0

    @staticmethod
    def _version(x: torch.Tensor) -> int:
        # Inference tensors keep no version counter; they cannot be modified in place outside
        # inference mode either, and the model code never modifies a layer input in place.
        return -2 if x.is_inference() else int(x._version)

    def output(self, layer: Int8DynamicLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """`layer`'s (rows, out) output for input `x` (flattened `x2`), computed once for all."""
        if self.value is not None and self.source is x and self.version == self._version(x):
            self.hits += 1
            value = self.value
        else:
            value = _int8_product(
                x2, self.weight, self.scale, self.rowsum, self.bias, self.asymmetric, self.two_digits
            )
            self.value, self.source, self.version = value, x, self._version(x)
            self._unread = set(self.slices)
        self._unread.discard(id(layer))
        if not self._unread:
            self.value = self.source = None
        return value[:, self.slices[id(layer)]]


class Int8DynamicLinear(_QuantLinearBase):
    """W8A8 Linear: int8 per-channel weights × per-token dynamic int8 activations on ``torch._int_mm``.

    Forward steps: (1) flatten to (m, k) rows; (2) per row, scale = max|x|/127 and round to
    int8 (or, with `asymmetric_input`, the row's range onto all 256 codes with an integer zero
    point); (3) ``torch._int_mm`` (int8 × int8 → int32) against the stored (k, n) weight view
    (minus zero · Σ_k w when asymmetric); (4) y = int32 · act_scale (m, 1) · weight_scale (1, n)
    + bias.  `build_runtime_model` sets `asymmetric_input` on the Linears that read a LayerNorm
    output (BERT's Q/K/V and FFN input), and `two_digit_input` there when asked for 16-bit
    inputs: the row is quantized as two int8 digits stacked into 2m rows of ONE `_int_mm`
    (the weight is read once), y = ((acc_hi − zero · Σw) + acc_lo / 254) · act_scale · w_scale.
    When `int_mm_supported` says no (e.g. CUDA with ≤ 16 rows), the same int8 weight is
    dequantized per call and run through fp32 F.linear on the unquantized activations
    (`fallback_calls` counts those).
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qt, bias)
        if not qt.scheme.is_integer:
            raise PlanError(f"Int8DynamicLinear needs an integer scheme, got {qt.scheme}")
        w, scale, exact, how = _int8_weight(qt)
        self.weight_int8: torch.Tensor
        self.weight_scale: torch.Tensor
        self.weight_rowsum: torch.Tensor
        self.register_buffer("weight_int8", w)
        self.register_buffer("weight_scale", scale)
        # Σ_k w[n, k] in int32: what an asymmetric input's zero point adds to output n.
        self.register_buffer("weight_rowsum", w.sum(dim=1, dtype=torch.int32))
        self.asymmetric_input = False
        # With `asymmetric_input`: ~16-bit activations as two int8 digits
        # (`quantize_rows_two_digits_asym`) instead of one.
        self.two_digit_input = False
        self.exact = exact
        self.how = how
        self.fallback_calls = 0
        self.shared_input: _FusedSiblings | None = None

    def _dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flat(x)
        x2 = x2.float()
        if not int_mm_supported(x2.shape[0], self.in_features, self.out_features, x2.device):
            self.fallback_calls += 1
            return self._finish(onednn_linear(x2, self._dequantized_weight()), lead)
        self._count_call()
        if self.shared_input is not None:
            return self.shared_input.output(self, x, x2).reshape(*lead, self.out_features)
        out = _int8_product(
            x2,
            self.weight_int8,
            self.weight_scale,
            self.weight_rowsum,
            self.bias,
            self.asymmetric_input,
            self.two_digit_input,
        )
        return out.reshape(*lead, self.out_features)


# --------------------------------------------------------------------------- early exit


def _fused_bert_layers(adapter: ModelAdapter, n_blocks: int) -> list[_W8A8BertLayer] | None:
    """The layers of a BERT adapter whose run_block and pool are BertAdapter's own (the fused
    path stands in for both) if every layer is a fused W8A8 block, else None."""
    if not isinstance(adapter, BertAdapter) or any(
        getattr(type(adapter), name) is not getattr(base, name)
        for name, base in (("run_block", BertAdapter), ("pool", ModelAdapter))
    ):
        return None
    layers = list(adapter.bert.encoder.layer)
    if len(layers) != n_blocks or not all(isinstance(layer, _W8A8BertLayer) for layer in layers):
        return None
    return cast(list[_W8A8BertLayer], layers)


def _rebind(adapter: ModelAdapter, module: nn.Module) -> ModelAdapter:
    """A shallow copy of `adapter` whose every reference to its module points at `module`.

    Adapters keep their module under more than one name (BertAdapter: `module` and `bert`);
    rebinding them all makes embed/run_block/pool run the runtime copy, not the original.
    """
    clone = copy.copy(adapter)
    original = adapter.module
    for attr, value in vars(adapter).items():
        if value is original:
            setattr(clone, attr, module)
    return clone


@dataclass(frozen=True)
class ExitDecision:
    """Where one row stopped: the answer, the exit (0-based block) and that head's confidence."""

    prediction: int
    exit_index: int
    confidence: float


class EarlyExitRunner:
    """Run a (runtime) model block by block and stop at the first confident exit head.

    Steps of `run`: (1) embed; (2) after each block whose pooled state a live head reads (for
    dense heads, `ExitHeads.input_blocks`: every block up to the exit), pool the live rows;
    after block i (from the first exit point on), apply exit head i to the concatenated pooled
    states it reads (standardise-then-classify folded into one Linear); (3) rows whose max
    softmax probability ≥ `threshold` answer there and leave the batch — the next block runs
    only on the rows still alive (per-row exit, so a batch also saves work); (4) the last block
    always answers.  `threshold` None runs every block and answers with the last head.
    """

    def __init__(
        self, adapter: ModelAdapter, module: nn.Module, heads: ExitHeads, threshold: float | None
    ) -> None:
        if heads.n_exits != adapter.n_blocks:
            raise PlanError(f"{heads.n_exits} exit heads for a model with {adapter.n_blocks} blocks")
        self.adapter = _rebind(adapter, module)
        self.module = module
        self.threshold = threshold
        self.n_blocks = adapter.n_blocks
        exits = sorted(set(adapter.spec().exit_points) | {self.n_blocks - 1})
        self._is_exit = [
            i in exits and (threshold is not None or i == self.n_blocks - 1) for i in range(self.n_blocks)
        ]
        self._heads = [heads.folded(i) for i in range(heads.n_exits)]
        self._reads = [heads.input_blocks(i) for i in range(heads.n_exits)]
        needed = {j for i in range(self.n_blocks) if self._is_exit[i] for j in self._reads[i]}
        self._pool_after = [i in needed for i in range(self.n_blocks)]
        # A BERT whose every layer is a fused W8A8 block runs one text without padding as one
        # compiled call per block that also pools and classifies (`w8a8_bert_block_and_exit`).
        self._fused_layers = _fused_bert_layers(self.adapter, self.n_blocks)
        self._exit_tables = self._head_tables() if self._fused_layers is not None else []

    def run(self, batch: Batch) -> list[ExitDecision]:
        """Per-row decisions for `batch` (any size), in row order."""
        if len(batch) == 1:
            return [self._run_one(batch)]
        n = len(batch)
        out: list[ExitDecision | None] = [None] * n
        alive = torch.arange(n)
        hidden = self.adapter.embed(batch)
        current = batch
        last = self.n_blocks - 1
        pooled: dict[int, torch.Tensor] = {}
        for i in range(self.n_blocks):
            hidden = self.adapter.run_block(i, hidden, current)
            if self._pool_after[i]:
                pooled[i] = self.adapter.pool(hidden, current)
            if not self._is_exit[i]:
                continue
            conf, pred = self._head_answer(i, pooled)
            if i == last or self.threshold is None:  # the last block always answers
                done = torch.ones_like(conf, dtype=torch.bool)
            else:
                done = conf >= self.threshold
            for r in torch.nonzero(done).reshape(-1).tolist():
                out[int(alive[r])] = ExitDecision(int(pred[r]), i, float(conf[r]))
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = torch.nonzero(~done).reshape(-1)
                alive, hidden = alive[keep], hidden[keep]
                pooled = {j: p[keep] for j, p in pooled.items()}
                length = int(current.attention_mask[keep].sum(1).max())
                current = current.select(keep, length)
                hidden = hidden[:, :length]
        assert all(d is not None for d in out)
        return [d for d in out if d is not None]

    def _head_answer(self, i: int, pooled: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exit head i on the pooled states it reads: (max softmax probability, class) per row."""
        w, b = self._heads[i]
        reads = self._reads[i]
        features = pooled[i] if len(reads) == 1 else torch.cat([pooled[j] for j in reads], dim=-1)
        conf, pred = torch.softmax(F.linear(features, w, b), dim=-1).max(dim=-1)
        return conf, pred

    def _head_tables(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per block j, the (head weight, select, bias) `w8a8_bert_block_and_exit` takes: the
        columns every head has for block j's pooled state, laid side by side (hidden ×
        heads·classes), the selector of head j's logits and head j's bias."""
        n, classes = self.n_blocks, int(self._heads[0][0].shape[0])
        hidden = int(self._heads[0][0].shape[1]) // len(self._reads[0])
        tables = []
        with torch.no_grad():
            for j in range(n):
                weight = torch.zeros(hidden, n * classes)
                for i, ((w, _), reads) in enumerate(zip(self._heads, self._reads, strict=True)):
                    if j in reads:
                        k = list(reads).index(j)
                        weight[:, i * classes : (i + 1) * classes] = w[:, k * hidden : (k + 1) * hidden].t()
                select = torch.zeros(n * classes, classes)
                select[j * classes : (j + 1) * classes] = torch.eye(classes)
                tables.append((weight, select, self._heads[j][1].detach().clone()))
        return tables

    def _run_one(self, batch: Batch) -> ExitDecision:
        """`run` for one text: the same decisions without the per-row bookkeeping (which rows
        are alive, which answered) — at batch 1 each exit check is a handful of small ops, and
        every op saved is a few microseconds on every block of every request."""
        hidden = self.adapter.embed(batch)
        if (
            self._fused_layers is not None
            and hidden.dtype == torch.float32
            and hidden.device.type == "cpu"
            and bool(batch.attention_mask.all())
        ):
            return self._run_one_fused(hidden, batch)
        pooled: dict[int, torch.Tensor] = {}
        last = self.n_blocks - 1
        for i in range(self.n_blocks):
            hidden = self.adapter.run_block(i, hidden, batch)
            if self._pool_after[i]:
                pooled[i] = self.adapter.pool(hidden, batch)
            if not self._is_exit[i]:
                continue
            conf, pred = self._head_answer(i, pooled)
            confidence = float(conf)
            if i == last or self.threshold is None or confidence >= self.threshold:
                return ExitDecision(int(pred), i, confidence)
        raise AssertionError("the last block always answers")  # pragma: no cover

    def _run_one_fused(self, hidden: torch.Tensor, batch: Batch) -> ExitDecision:
        """`_run_one` on fused W8A8 blocks: each block pools and classifies inside its compiled
        call.  Measured on a 2-core Xeon, uniform int8, 128 test texts, interleaved: at
        threshold 0.62 3.77 → 3.44 ms per text, at full depth 5.33 → 5.12 ms; the same exit
        and class for every text (confidences equal to float rounding)."""
        assert self._fused_layers is not None
        mask_bias = attention_mask_bias(batch.attention_mask.bool()[:, None, None, :])
        logits = torch.zeros(1, self._exit_tables[0][0].shape[1])
        last = self.n_blocks - 1
        for i, layer in enumerate(self._fused_layers):
            hidden, logits, conf, pred = layer.forward_and_exit(
                hidden, mask_bias, logits, self._exit_tables[i]
            )
            if not self._is_exit[i]:
                continue
            confidence = float(conf)
            if i == last or self.threshold is None or confidence >= self.threshold:
                return ExitDecision(int(pred), i, confidence)
        raise AssertionError("the last block always answers")  # pragma: no cover

    def exit_logits(self, batch: Batch) -> torch.Tensor:
        """Every exit head's logits (rows, exits, classes) from one full-depth pass."""
        pooled = self.adapter.forward_exits(batch)
        return torch.stack(
            [
                F.linear(torch.cat([pooled[j] for j in reads], dim=-1), w, b)
                for reads, (w, b) in zip(self._reads, self._heads, strict=True)
            ],
            dim=1,
        )


@dataclass(frozen=True)
class RuntimeEval:
    """Accuracy of the runtime model itself (its kernels' numerics, not the evaluator's
    weight-only fake quantization) on a split; measured.  `agreement` is with `reference`."""

    n_examples: int
    accuracy: float
    agreement: float
    final_accuracy: float
    mean_layers: float
    exit_fraction: tuple[float, ...]
    threshold: float | None
    seconds: float
    predictions: tuple[int, ...]
    source: str = "measured (runtime kernels)"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, exit_fraction=list(self.exit_fraction), predictions=list(self.predictions))


def runtime_exit_logits(runner: EarlyExitRunner, tokens: TokenizedSplit, threads: int = 2) -> np.ndarray:
    """Every exit's logits (rows, exits, classes) from the runtime kernels over a tokenized
    split, one full-depth pass per length bucket, rows in the split's order."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return tokens.unsort([runner.exit_logits(b) for b in tokens]).numpy().astype(np.float64)
    finally:
        torch.set_num_threads(old)


def runtime_exit_curve(
    runner: EarlyExitRunner,
    tokens: TokenizedSplit,
    labels: Sequence[int] | np.ndarray,
    reference: Sequence[int] | np.ndarray,
    threads: int = 2,
) -> ThresholdCurve:
    """The whole threshold curve of the runtime model itself (its kernels' numerics) on a
    split: the runtime's counterpart of `Evaluator.curve`, for choosing thresholds on
    calibration by what the device will run."""
    return threshold_curve(runtime_exit_logits(runner, tokens, threads), labels, reference)


def evaluate_runtime(
    runner: EarlyExitRunner,
    tokens: TokenizedSplit,
    labels: Sequence[int] | np.ndarray,
    reference: Sequence[int] | np.ndarray | None = None,
    threads: int = 2,
) -> RuntimeEval:
    """Accuracy, agreement and exit statistics of `runner` on a tokenized split.

    Steps: (1) one full-depth pass per length bucket collecting every exit's logits from the
    runtime kernels (per-token activation quantization makes each row independent of its
    batch-mates, so batching does not change a row's numbers beyond float summation order);
    (2) the runner's threshold applied per row with `threshold_curve` — the same rule
    `EarlyExitRunner.run` applies at batch 1; (3) agreement against `reference` predictions
    (e.g. the FP32 model's), else against this model's own full-depth answers.
    """
    started = time.perf_counter()
    logits = runtime_exit_logits(runner, tokens, threads)
    y = np.asarray(labels)
    ref = np.asarray(reference) if reference is not None else logits[:, -1].argmax(-1)
    grid = [runner.threshold] if runner.threshold is not None else [1.1]
    curve = threshold_curve(logits, y, ref, thresholds=grid)
    stop_frac = tuple(float(x) for x in curve.exit_fraction[0])
    conf, pred = confidences(logits)
    hit = conf >= grid[0]
    hit[:, -1] = True
    chosen = pred[np.arange(len(y)), hit.argmax(-1)]
    return RuntimeEval(
        n_examples=len(y),
        accuracy=float(curve.accuracy[0]),
        agreement=float(curve.agreement[0]),
        final_accuracy=curve.full_accuracy,
        mean_layers=float(curve.mean_layers[0]),
        exit_fraction=stop_frac,
        threshold=runner.threshold,
        seconds=time.perf_counter() - started,
        predictions=tuple(int(p) for p in chosen),
    )


@dataclass(frozen=True)
class TextLatency:
    """Measured seconds per text at batch 1 for one model: per text the median over rounds.

    `mean_s` (mean over texts of the per-text medians) is the expected latency of a random
    text, the figure early exit lowers; `median_s` the median text.  `exits[i]` is the block
    text i stopped after.
    """

    per_text_s: tuple[float, ...]
    mean_s: float
    median_s: float
    exits: tuple[int, ...]
    rounds: int
    warmup: int
    threads: int
    predicted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, per_text_s=list(self.per_text_s), exits=list(self.exits))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextLatency:
        return cls(**dict(data, per_text_s=tuple(data["per_text_s"]), exits=tuple(data["exits"])))


def measure_text_latency(
    runners: Mapping[str, EarlyExitRunner],
    batches: Sequence[Batch],
    *,
    rounds: int = 5,
    warmup: int = 1,
    threads: int = 2,
    chunk: int = 16,
) -> dict[str, TextLatency]:
    """Batch-1 latency of several runners over the same texts, interleaved against noise.

    Steps: (1) fix torch's thread count and enter inference mode; (2) `warmup` untimed passes
    of every runner over every text; (3) `rounds` rounds; a round walks the texts in chunks of
    `chunk` and times every runner on each chunk before the next (runner order rotated per
    chunk and round), so a slow spell of a shared host lands on all runners alike while
    each still runs several texts in a row, as a deployed model does, with its weights warm in
    cache; (4) per text the median over rounds, then mean and median over texts.

    Interleaving whole passes over the texts instead (a pass of one runner over 497 texts is
    2–8 s) left identical-kernel plans of the engine bench 10–25 % apart in one run (measured
    2026-12-04), as spells of contention fell on some passes and not others.
    """
    if rounds < 1 or warmup < 0 or chunk < 1 or not batches or not runners:
        raise PlanError(
            "measure_text_latency needs rounds ≥ 1, warmup ≥ 0, chunk ≥ 1, at least one text and one runner"
        )
    names = list(runners)
    samples = {n: [[0.0] * rounds for _ in batches] for n in names}
    exits: dict[str, list[int]] = {n: [0] * len(batches) for n in names}
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for n in names:
                    for b in batches:
                        runners[n].run(b)
            starts = range(0, len(batches), chunk)
            for r in range(rounds):
                for c, first in enumerate(starts):
                    shift = (r + c) % len(names)
                    for n in names[shift:] + names[:shift]:
                        run = runners[n].run
                        for t in range(first, min(first + chunk, len(batches))):
                            start = time.perf_counter()
                            decision = run(batches[t])
                            samples[n][t][r] = time.perf_counter() - start
                            exits[n][t] = decision[0].exit_index
    finally:
        torch.set_num_threads(old)
    out = {}
    for n in names:
        per_text = [statistics.median(s) for s in samples[n]]
        out[n] = TextLatency(
            per_text_s=tuple(per_text),
            mean_s=statistics.fmean(per_text),
            median_s=statistics.median(per_text),
            exits=tuple(exits[n]),
            rounds=rounds,
            warmup=warmup,
            threads=threads,
        )
    return out


def measure_batch_latency(
    runner: EarlyExitRunner, batch: Batch, *, repeats: int = 7, warmup: int = 2, threads: int = 2
) -> LatencyStats:
    """Seconds per call of `runner.run(batch)` (per-row exit) — e.g. batch 32."""
    return measure_latency(runner.run, [batch], repeats=repeats, warmup=warmup, threads=threads)


# Hashed at import: `inspect.getsource` reads the file on disk, so a hash taken later (after a
# deploy replaced runtime.py under a running process) would file the old code's package under
# the new code's key, and every new process would load the stale package.
_aot_source_hash()
