"""Weight quantization: RTN and GPTQ at int2/3/4/8 and fp16, real bit-packing, plan application.

Names load on first use: `planner.quant.sizes` (byte counts, scheme rules) needs no torch;
everything that touches tensors imports torch when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name → submodule.  Loaded on first use (PEP 562) so that importing
# `planner.quant.sizes` — the byte counting the cost model needs — does not import torch.
_WHERE = {
    "quantize": "api",
    "quantize_dequantize": "api",
    "QuantCache": "apply",
    "apply_plan": "apply",
    "quantizable_parameter": "apply",
    "quantize_plan": "apply",
    "restore_weights": "apply",
    "QuantizedTensor": "core",
    "dequantize": "core",
    "quantize_rtn": "core",
    "validate_scheme": "sizes",
    "GPTQ_VERSION": "gptq",
    "hessian": "gptq",
    "quantize_gptq": "gptq",
    "PACK_FORMAT_VERSION": "packing",
    "WriteReport": "packing",
    "pack": "packing",
    "pack_codes": "packing",
    "read_packed_safetensors": "packing",
    "unpack": "packing",
    "unpack_codes": "packing",
    "write_packed_safetensors": "packing",
    "packed_nbytes": "sizes",
    "plan_nbytes": "sizes",
    "weights_nbytes": "sizes",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'planner.quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"planner.quant.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "GPTQ_VERSION",
    "PACK_FORMAT_VERSION",
    "QuantCache",
    "QuantizedTensor",
    "WriteReport",
    "apply_plan",
    "dequantize",
    "hessian",
    "pack",
    "pack_codes",
    "packed_nbytes",
    "plan_nbytes",
    "quantizable_parameter",
    "quantize",
    "quantize_dequantize",
    "quantize_gptq",
    "quantize_plan",
    "quantize_rtn",
    "read_packed_safetensors",
    "restore_weights",
    "unpack",
    "unpack_codes",
    "validate_scheme",
    "weights_nbytes",
    "write_packed_safetensors",
]
