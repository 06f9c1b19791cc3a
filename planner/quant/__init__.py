"""Weight quantization: RTN and GPTQ at int2/3/4/8 and fp16, real bit-packing, plan application.

Heavy imports (torch, numpy, safetensors) happen when this package is imported; Django code
that only needs specs should import `planner.specs`, not this package.
"""

from planner.quant.api import quantize, quantize_dequantize
from planner.quant.apply import QuantCache, apply_plan, quantizable_parameter, quantize_plan, restore_weights
from planner.quant.core import QuantizedTensor, dequantize, quantize_rtn, validate_scheme
from planner.quant.gptq import hessian, quantize_gptq
from planner.quant.packing import (
    PACK_FORMAT_VERSION,
    WriteReport,
    pack,
    pack_codes,
    packed_nbytes,
    plan_nbytes,
    read_packed_safetensors,
    unpack,
    unpack_codes,
    weights_nbytes,
    write_packed_safetensors,
)

__all__ = [
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
