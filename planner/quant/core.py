"""Quantize and dequantize one weight matrix (round-to-nearest; GPTQ lives in `gptq.py`).

Layout shared by every integer precision (and by packing and the runtime kernels):

* a weight is a 2-D matrix (rows, cols): (out_features, in_features) for a Linear, (rows, dim)
  for an Embedding table; a "channel" is a row and groups run along the columns;
* codes are unsigned integers in [0, 2**bits - 1]; a weight is ``(code - zero) * scale``;
* ``scales`` has shape (rows, n_groups) with n_groups = cols / group_size, or 1 per channel;
  scales are rounded to fp16 *before* the codes are chosen, so the stored fp16 scale is exactly
  the one the codes were computed against;
* symmetric schemes use the fixed mid-point zero ``2**(bits-1)`` (not stored); asymmetric schemes
  store an integer zero point per group (kept as fp16, which represents 0..255 exactly);
* an embedding table with hot rows (`TensorScheme.hot_rows` = k) also holds those k rows at
  int8, symmetric, one fp16 scale per row: ``hot_index`` int32 (k,) ascending row ids,
  ``hot_codes`` uint8 (k, cols), ``hot_scales`` fp16 (k, 1); they replace the rows' low-bit
  values (which are still stored, so the packed grid stays one regular stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from planner.quant.sizes import n_groups, validate_scheme
from planner.specs import PlanError, TensorScheme

__all__ = [
    "QuantizedTensor",
    "codes_for",
    "dequantize",
    "dequantize_hot_rows",
    "hot_row_index",
    "n_groups",
    "qparams_for",
    "quantize_rtn",
    "validate_scheme",
]

#: The smallest positive fp16 (subnormal); an all-zero group still needs a non-zero scale.
_MIN_SCALE = 2.0**-24
_MAX_FP16 = 65504.0


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """One quantized (or fp16/fp32-stored) matrix.

    For integer precisions `codes` is a uint8 tensor of shape `shape` (one code per weight,
    unpacked), `scales` fp16 (rows, n_groups), `zeros` fp16 (rows, n_groups) for asymmetric
    schemes else None, and `values` None.  For fp16/fp32, `values` holds the stored tensor in
    that dtype and the other fields are None.  `method` records the rounding actually used
    (GPTQ on an embedding table falls back to RTN).  `hot_*` hold a table's hot rows (see the
    module docstring), else None.
    """

    shape: tuple[int, int]
    scheme: TensorScheme
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    values: torch.Tensor | None = None
    method: str = "rtn"
    hot_index: torch.Tensor | None = None
    hot_codes: torch.Tensor | None = None
    hot_scales: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        """The number of consecutive columns that share a scale (cols when per-channel)."""
        return self.scheme.group_size or self.shape[1]

    def zero_points(self) -> torch.Tensor:
        """The zero point per (row, group) as fp32, including the implicit symmetric one."""
        assert self.scales is not None
        if self.zeros is not None:
            return self.zeros.float()
        return torch.full(self.scales.shape, float(2 ** (self.scheme.bits - 1)))

    def describe(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "scheme": self.scheme.to_dict(), "method": self.method}


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    # Round up, never down: a scale rounded down would shrink the grid and clip the extremes.
    wanted = scale.float().clamp(_MIN_SCALE, _MAX_FP16)
    s16 = wanted.to(torch.float16)
    low = s16.float() < wanted
    if bool(low.any()):
        up = torch.nextafter(s16[low], torch.tensor(float("inf"), dtype=torch.float16))
        s16[low] = up
    return s16


def qparams_for(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (fp16) and zero point (fp16 integer, or None when symmetric) per row of `w`.

    Steps: (1) find each row's range; (2) symmetric: scale = 2·absmax / (2**bits - 1) with the
    mid-point zero, so the code grid is centred on 0; asymmetric: range stretched to include 0,
    scale = (max - min) / (2**bits - 1), zero = round(-min / scale); (3) round the scale to fp16
    and recompute the zero against the rounded scale.
    """
    maxq = 2**bits - 1
    w = w.float()
    if symmetric:
        # max(-min, max) is |w|'s max exactly, without abs()'s temporary (47 MB for the word
        # table: 14.7 → 2.2 ms of every evaluation that quantizes it).
        absmax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())
        return _fp16_scale(2.0 * absmax / maxq), None
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    scale16 = _fp16_scale((hi - lo) / maxq)
    zero = torch.round(-lo / scale16.float()).clamp(0, maxq)
    return scale16, zero.to(torch.float16)


def codes_for(w: torch.Tensor, scale16: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes for `w` (..., n): one fp16 scale (and zero) per leading index, shared along the last dim."""
    maxq = 2**bits - 1
    z = (
        zero.float()
        if zero is not None
        else torch.full_like(scale16, float(2 ** (bits - 1)), dtype=torch.float32)
    )
    # In place after the first op: an embedding table is 11.7 M weights, and each extra
    # temporary is a 47 MB pass (this runs once per tensor and scheme of every evaluation).
    q = torch.div(w.float(), scale16.float().unsqueeze(-1))
    return q.round_().add_(z.unsqueeze(-1)).clamp_(0, maxq)


def hot_row_index(lookups: torch.Tensor, rows: int, k: int, name: str = "weight") -> torch.Tensor:
    """The `k` rows looked up most often in `lookups` (1-D row ids, one per lookup), ascending.

    Ties (and rows never looked up, when fewer than `k` were) go to the lower row id, so the
    choice is deterministic.
    """
    ids = lookups.detach().reshape(-1)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise PlanError(
            f"tensor {name!r}: hot rows need integer row ids as lookup statistics, got {ids.dtype}"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise PlanError(f"tensor {name!r}: lookup statistics name rows outside 0..{rows - 1}")
    counts = torch.bincount(ids.long(), minlength=rows)
    order = torch.argsort(-counts, stable=True)
    return torch.sort(order[:k]).values.to(torch.int32)


def quantize_rtn(
    weight: torch.Tensor, scheme: TensorScheme, name: str = "weight", lookups: torch.Tensor | None = None
) -> QuantizedTensor:
    """Round-to-nearest quantization of a (rows, cols) matrix under `scheme`.

    Steps: (1) validate the shape against the scheme; (2) fp16/fp32: store the cast tensor;
    (3) integer: view the matrix as (rows, n_groups, group) and compute one fp16 scale (and
    zero) per (row, group); (4) round each weight to the nearest code and clamp to the range;
    (5) with hot rows, pick them from `lookups` (`hot_row_index`) and quantize them again at
    int8 with one scale per row.
    """
    rows, cols = validate_scheme(tuple(weight.shape), scheme, name)
    w = weight.detach().float()
    if not scheme.is_integer:
        dtype = torch.float16 if scheme.precision == "fp16" else torch.float32
        return QuantizedTensor(shape=(rows, cols), scheme=scheme, values=w.to(dtype).contiguous())
    if scheme.hot_rows and lookups is None:
        raise PlanError(
            f"tensor {name!r}: hot_rows {scheme.hot_rows} needs the table's lookup statistics (none given)"
        )
    g = scheme.group_size or cols
    ng = cols // g
    grouped = w.reshape(rows * ng, g)
    scale16, zero = qparams_for(grouped, scheme.bits, scheme.symmetric)
    codes = codes_for(grouped, scale16, zero, scheme.bits)
    hot_index = hot_codes = hot_scales = None
    if scheme.hot_rows:
        assert lookups is not None
        hot_index = hot_row_index(lookups, rows, scheme.hot_rows, name)
        hot = w[hot_index.long()]
        hot_scales, _ = qparams_for(hot, 8, True)
        hot_codes = codes_for(hot, hot_scales, None, 8).to(torch.uint8).contiguous()
        hot_scales = hot_scales.reshape(-1, 1).contiguous()
    return QuantizedTensor(
        shape=(rows, cols),
        scheme=scheme,
        codes=codes.to(torch.uint8).reshape(rows, cols).contiguous(),
        scales=scale16.reshape(rows, ng).contiguous(),
        zeros=None if zero is None else zero.reshape(rows, ng).contiguous(),
        method="rtn",
        hot_index=hot_index,
        hot_codes=hot_codes,
        hot_scales=hot_scales,
    )


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """The fp32 matrix a QuantizedTensor stands for: (code - zero) * scale per group."""
    if qt.values is not None:
        return qt.values.float()
    assert qt.codes is not None and qt.scales is not None
    rows, cols = qt.shape
    g = qt.group_size
    ng = cols // g
    codes = qt.codes.float().reshape(rows, ng, g)  # a fresh tensor: safe to work in place
    zero = qt.zero_points().reshape(rows, ng, 1)
    scale = qt.scales.float().reshape(rows, ng, 1)
    out = codes.sub_(zero).mul_(scale).reshape(rows, cols)
    if qt.hot_index is not None:
        out[qt.hot_index.long()] = dequantize_hot_rows(qt)
    return out


def dequantize_hot_rows(qt: QuantizedTensor) -> torch.Tensor:
    """The fp32 values of a table's hot rows, (k, cols) in `hot_index` order."""
    assert qt.hot_codes is not None and qt.hot_scales is not None
    return (qt.hot_codes.float() - 128.0) * qt.hot_scales.float()
