"""An fp32 `nn.Linear` that multiplies on oneDNN where that is the faster fp32 path.

Why: torch's CPU `F.linear` in fp32 goes to MKL's sgemm, and MKL picks its AVX2 kernels on
non-Intel CPUs.  On the AMD EPYC (Zen 5, AVX-512) hosts this project has been measured on,
oneDNN's fp32 inner product is 1.6–2.4× faster at the demo model's shapes (batch-1 texts of ~57
tokens and 4,096-token evaluation batches alike).  On Intel CPUs MKL runs its own AVX-512
kernels and is the faster one (oneDNN at 0.83–0.85× of it on a Xeon with AMX, 2026-12-03).  So
the path is chosen by CPU vendor: oneDNN unless the CPU is GenuineIntel.  `python -m bench
engine` prints both paths' throughput in every run, so the choice is checked where it is used.
It is the same IEEE fp32 arithmetic in another summation order (results agree to fp32 rounding;
tested at 1e-5), and the FP32 model, the evaluator's quantized-weight passes and the host
runtime's FP32 baseline all take the chosen path: the faster FP32 baseline makes the runtime's
integer speed-up harder to reach, not easier.

The oneDNN path is taken only where it is exact and cheap to reach: fp32 tensors on the CPU, no
autograd graph to record (oneDNN's op has no backward), and `torch.ops.mkldnn._linear_pointwise`
present (it is the op torch's own compiler emits for fp32 Linears).  Everything else — a pass
that records gradients, bf16/fp16 inputs, a torch without oneDNN — is `F.linear`.
`EDGEFIT_ONEDNN_LINEAR=1` / `=0` forces the oneDNN path on / off (for an A/B measurement).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OneDNNLinear",
    "linear_gelu",
    "onednn_linear",
    "onednn_linear_available",
    "onednn_linear_gelu",
    "onednn_linear_supported",
    "onednn_product",
]


def _probe() -> bool:
    """Whether oneDNN's fp32 inner product is here and gives F.linear's numbers."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 4), torch.ones(3, 4)
        return bool(torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``…) from /proc/cpuinfo, or ""."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _preferred() -> bool:
    forced = os.environ.get("EDGEFIT_ONEDNN_LINEAR", "")
    if forced in {"0", "1"}:
        return forced == "1"
    return cpu_vendor() != "GenuineIntel"


_SUPPORTED = _probe()
_AVAILABLE = _SUPPORTED and _preferred()


def onednn_linear_supported() -> bool:
    """Whether oneDNN's fp32 inner product works here (the probe ran once, at import)."""
    return _SUPPORTED


def onednn_linear_available() -> bool:
    """Whether the model's fp32 Linears run on oneDNN here (supported and the faster path for
    this CPU's vendor, or forced by `EDGEFIT_ONEDNN_LINEAR`)."""
    return _AVAILABLE


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        )
    )


def _fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return _AVAILABLE and _eligible(x, weight, bias)


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` on oneDNN whenever it is supported and exact, whatever the
    host prefers (for A/B measurements and tests of the op itself)."""
    if _SUPPORTED and _eligible(x, weight, bias):
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN where that is this host's fp32 path and exact
    (see module doc)."""
    if _fast(x, weight, bias):
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)


def onednn_linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.gelu(F.linear(x, weight, bias))` (exact erf GELU): one oneDNN call with GELU as its
    post-op where oneDNN is this host's fp32 path and exact, saving a pass over the widest
    activation (~5 % of an evaluation); else the product with bias and GELU applied in place
    on its fresh output (the two torch ops' numbers: bit-identical on MKL's Intel kernels, the
    hosts that take this path by default; to fp32 rounding elsewhere, where a GEMM's bias is
    summed in another order).

    Why in place: `F.linear` broadcasts the bias into a new output before the GEMM and
    `F.gelu` writes a second one; at an evaluation batch (2,048 × 1,536 fp32, 12.6 MB) each
    fresh buffer costs its page faults.  On the Intel AMX host (MKL path), 2026-12-05: an
    uncached evaluation pass 1.84 → 1.78 s (median of 8, alternating), bit-identical logits."""
    if _fast(x, weight, bias):
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return out
    if _eligible(x, weight, bias):
        # No autograd graph to keep (checked by _eligible): in-place ops are safe.
        inner = torch.matmul(x, weight.t())
        if bias is not None:
            inner.add_(bias)
        return torch.ops.aten.gelu_(inner)
    return F.gelu(F.linear(x, weight, bias))


def linear_gelu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(layer(x))`, with the GELU fused into the product where the layer allows it.

    A layer nobody observes (no forward hooks: GPTQ's calibration hooks must see the call)
    fuses when it is a plain `OneDNNLinear` or offers `forward_gelu(x)` (the runtime's Linears
    that multiply in fp32, e.g. on weights dequantized at load — without it they ran the GELU
    as a separate pass, 0.9 ms of a 31 ms text at batch 1 on an AVX2 host).  Any other module
    is called as usual."""
    if not (layer._forward_hooks or layer._forward_pre_hooks):
        if type(layer) is OneDNNLinear:
            return onednn_linear_gelu(x, layer.weight, layer.bias)
        fused = getattr(layer, "forward_gelu", None)
        if callable(fused):
            out: torch.Tensor = fused(x)
            return out
    return F.gelu(layer(x))


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and hooks) whose fp32 product runs on oneDNN
    where that is this host's fp32 path (`onednn_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)
