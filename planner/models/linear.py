"""An fp32 `nn.Linear` that multiplies on oneDNN when torch has it.

Why: torch's CPU `F.linear` in fp32 goes to MKL's sgemm, and MKL picks its AVX2 kernels on
non-Intel CPUs.  On the AMD EPYC (Zen 5, AVX-512) this project is measured on, oneDNN's fp32
inner product is 1.6–2.4× faster at the demo model's shapes (batch-1 texts of ~57 tokens and
4,096-token evaluation batches alike; `python -m bench engine` prints both paths' throughput in
every run).  It is the same IEEE fp32 arithmetic in another summation order (results agree to
fp32 rounding; tested at 1e-5), so the FP32 model, the evaluator's quantized-weight passes and
the host runtime's FP32 baseline all use it: a faster FP32 baseline makes the runtime's integer
speed-up harder to reach, not easier.

The fast path is taken only where it is exact and cheap to reach: fp32 tensors on the CPU, no
autograd graph to record (oneDNN's op has no backward), and `torch.ops.mkldnn._linear_pointwise`
present (it is the op torch's own compiler emits for fp32 Linears).  Everything else — a pass
that records gradients, bf16/fp16 inputs, a torch without oneDNN — is `F.linear`.
`EDGEFIT_ONEDNN_LINEAR=0` turns the fast path off (for an A/B measurement).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OneDNNLinear", "linear_gelu", "onednn_linear", "onednn_linear_available"]


def _probe() -> bool:
    if os.environ.get("EDGEFIT_ONEDNN_LINEAR", "1") == "0":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 4), torch.ones(3, 4)
        return bool(torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_AVAILABLE = _probe()


def onednn_linear_available() -> bool:
    """Whether fp32 Linears here run on oneDNN (the probe ran once, at import)."""
    return _AVAILABLE


def _fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        _AVAILABLE
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        )
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN when that is exact and possible (see module doc)."""
    if _fast(x, weight, bias):
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)


def linear_gelu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(layer(x))` (exact erf GELU); one oneDNN call with GELU as its post-op when
    `layer` is a plain `OneDNNLinear` nobody observes (no forward hooks: GPTQ's calibration
    hooks must see the call), saving a pass over the widest activation (~5 % of an evaluation).
    Any other module — a quantized replacement the runtime swapped in — is called as usual."""
    if (
        type(layer) is OneDNNLinear
        and not (layer._forward_hooks or layer._forward_pre_hooks)
        and _fast(x, layer.weight, layer.bias)
    ):
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, layer.weight, layer.bias, "gelu", [], "none"
        )
        return out
    return F.gelu(layer(x))


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and hooks) whose fp32 product runs on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)
