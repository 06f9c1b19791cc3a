"""The fp32 Linear on oneDNN: same numbers as F.linear, chosen by CPU vendor, safe under autograd."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from planner.models import TinyAdapter
from planner.models import linear as linear_mod
from planner.models.linear import (
    OneDNNLinear,
    cpu_vendor,
    linear_gelu,
    onednn_linear,
    onednn_linear_available,
    onednn_linear_supported,
    onednn_product,
)


def test_x86_torch_builds_have_the_onednn_op_and_take_it_unless_the_cpu_is_intel() -> None:
    # On an x86 host with this torch the op must be there; MKL is the faster fp32 path on Intel
    # CPUs only (its AVX-512 kernels are vendor-dispatched).
    if platform.machine().lower() in {"x86_64", "amd64"}:
        assert onednn_linear_supported()
        assert cpu_vendor() != ""
        assert onednn_linear_available() == (cpu_vendor() != "GenuineIntel")


@pytest.mark.parametrize(
    ("forced", "vendor", "want"),
    [
        ("", "AuthenticAMD", True),
        ("", "GenuineIntel", False),
        ("1", "GenuineIntel", True),
        ("0", "AuthenticAMD", False),
    ],
)
def test_the_path_follows_the_vendor_unless_forced(
    monkeypatch: pytest.MonkeyPatch, forced: str, vendor: str, want: bool
) -> None:
    monkeypatch.setenv("EDGEFIT_ONEDNN_LINEAR", forced)
    monkeypatch.setattr(linear_mod, "cpu_vendor", lambda: vendor)
    assert linear_mod._preferred() is want


@pytest.mark.parametrize(
    "shape",
    [(1, 384), (57, 384), (2, 9, 384), (0, 384)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_f_linear_to_fp32_rounding(shape: tuple[int, ...], with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(1536, 384, generator=gen) * 0.05
    b = torch.randn(1536, generator=gen) if with_bias else None
    with torch.inference_mode():
        want = F.linear(x, w, b)
        for got in (onednn_product(x, w, b), onednn_linear(x, w, b)):
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_operands_give_the_same_product() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(384, 20, generator=gen).t()  # a transposed view
    w = torch.randn(384, 96, generator=gen).t()
    with torch.inference_mode():
        torch.testing.assert_close(onednn_product(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_autograd_falls_back_and_gradients_flow() -> None:
    layer = OneDNNLinear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert torch.count_nonzero(layer.weight.grad) > 0


def test_other_dtypes_use_f_linear() -> None:
    layer = OneDNNLinear(8, 4).to(torch.bfloat16)
    with torch.inference_mode():
        out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_the_model_runs_its_linears_on_it(tiny_adapter: TinyAdapter) -> None:
    linears = [m for m in tiny_adapter.module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)


def test_linear_gelu_fuses_only_an_unobserved_onednn_linear() -> None:
    layer = OneDNNLinear(384, 1536)
    x = torch.randn(57, 384)
    with torch.inference_mode():
        want = F.gelu(F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(linear_gelu(layer, x), want, rtol=1e-5, atol=1e-5)
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.inference_mode():
        torch.testing.assert_close(linear_gelu(layer, x), want, rtol=1e-5, atol=1e-5)
    assert len(seen) == 1  # a hooked Linear is called, so its observer sees the input


def test_linear_gelu_calls_any_other_module() -> None:
    other = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(linear_gelu(other, x), F.gelu(other(x)))


@pytest.mark.parametrize("shape", [(57, 384), (2, 57, 384)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gelu_off_onednn_matches_the_two_torch_ops(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], with_bias: bool
) -> None:
    # The MKL path (Intel hosts) applies bias and GELU in place on the product's own output.
    # MKL's Intel kernels add a GEMM's C after the product, so there it is bit-identical to
    # F.linear's fused bias; its kernels on other vendors (where this path is only taken when
    # forced) sum the bias in another order, so there it agrees to fp32 rounding.
    monkeypatch.setattr(linear_mod, "_AVAILABLE", False)
    torch.manual_seed(0)
    layer = OneDNNLinear(384, 1536, bias=with_bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        got = linear_gelu(layer, x)
        want = F.gelu(F.linear(x, layer.weight, layer.bias))
    if cpu_vendor() == "GenuineIntel" or not with_bias:
        assert torch.equal(got, want)
    else:  # the tolerance of the other fp32-rounding comparisons here
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_gelu_off_onednn_keeps_the_autograd_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_mod, "_AVAILABLE", False)
    layer = OneDNNLinear(8, 16)
    x = torch.randn(3, 8, requires_grad=True)
    linear_gelu(layer, x).sum().backward()  # an in-place GELU on a graph would refuse this
    assert x.grad is not None and layer.weight.grad is not None
