"""The quantization entry points the rest of the engine calls."""

from __future__ import annotations

import torch

from planner.quant.core import QuantizedTensor, dequantize, quantize_rtn, validate_scheme
from planner.quant.gptq import quantize_gptq
from planner.quant.packing import pack, unpack
from planner.specs import PlanError, TensorScheme

__all__ = ["quantize", "quantize_dequantize"]


def quantize(
    weight: torch.Tensor,
    scheme: TensorScheme,
    calib_inputs: torch.Tensor | None = None,
    *,
    name: str = "weight",
    kind: str = "linear",
) -> QuantizedTensor:
    """Quantize a (rows, cols) weight under `scheme`.

    `kind` "embedding" marks a lookup table: its rows are the channels and GPTQ falls back to
    round-to-nearest (a lookup has no input correlation to compensate; the result records
    method "rtn").  `calib_inputs` are what the tensor sees on calibration data: for GPTQ on a
    linear weight its input rows (n, cols) or (…, cols); for a table with hot rows the row ids
    it looked up (1-D, one per lookup).
    """
    validate_scheme(tuple(weight.shape), scheme, name)
    if kind not in ("linear", "embedding"):
        raise PlanError(f"tensor {name!r}: kind {kind!r} is not 'linear' or 'embedding'")
    if scheme.hot_rows and kind != "embedding":
        raise PlanError(f"tensor {name!r}: hot_rows applies to embedding tables only")
    if scheme.is_integer and scheme.method == "gptq" and kind == "linear":
        if calib_inputs is None:
            raise PlanError(f"tensor {name!r}: method 'gptq' needs calibration inputs (none given)")
        return quantize_gptq(weight, scheme, calib_inputs, name=name)
    return quantize_rtn(weight, scheme, name, lookups=calib_inputs if kind == "embedding" else None)


def quantize_dequantize(
    weight: torch.Tensor,
    scheme: TensorScheme,
    calib_inputs: torch.Tensor | None = None,
    *,
    name: str = "weight",
    kind: str = "linear",
) -> torch.Tensor:
    """The fp32 weight a device would see: dequantize(unpack(pack(quantize(…)))).

    Going through the real packed bytes (rather than the in-memory codes) keeps accuracy
    evaluation honest about what is shipped; packing is lossless, so it only costs time.
    """
    qt = quantize(weight, scheme, calib_inputs, name=name, kind=kind)
    return dequantize(unpack(pack(qt), qt.shape, qt.scheme, qt.method)).to(weight.device)
