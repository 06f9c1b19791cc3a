"""Apply a Plan to a live torch module for accuracy evaluation (with a quantized-tensor cache)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from planner.quant.api import quantize
from planner.quant.core import QuantizedTensor, dequantize
from planner.specs import ModelSpec, Plan, PlanError, TensorScheme

__all__ = ["QuantCache", "apply_plan", "quantizable_parameter", "quantize_plan", "restore_weights"]


def quantizable_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The `.weight` parameter `name` of an nn.Linear / nn.Embedding submodule of `module`.

    Enforces the adapter contract: every TensorSpec names such a weight.
    """
    if not name.endswith(".weight"):
        raise PlanError(f"tensor {name!r}: quantizable tensors are '.weight' parameters")
    owner_name = name[: -len(".weight")]
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError as exc:
        raise PlanError(f"tensor {name!r}: no submodule {owner_name!r} in the model") from exc
    if not isinstance(owner, nn.Linear | nn.Embedding):
        raise PlanError(f"tensor {name!r}: owner is {type(owner).__name__}, not nn.Linear or nn.Embedding")
    return owner.weight


class QuantCache:
    """Original weights of one model plus quantized tensors keyed by (tensor name, scheme).

    The originals are snapshotted the first time a tensor is seen, so applying plan after plan
    to the same module always quantizes the full-precision weights, never a previous plan's
    output.  Calibration inputs are assumed fixed for the cache's lifetime (GPTQ results are
    keyed by name and scheme only).  Entries are stored packed-size-ish (uint8 codes + fp16
    scales), not as fp32 copies; `max_entries` bounds the cache LRU-style.
    """

    def __init__(self, max_entries: int | None = None) -> None:
        self.max_entries = max_entries
        self.originals: dict[str, torch.Tensor] = {}
        self._entries: OrderedDict[tuple[str, TensorScheme], QuantizedTensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def original(self, module: nn.Module, name: str) -> torch.Tensor:
        if name not in self.originals:
            self.originals[name] = quantizable_parameter(module, name).detach().float().clone()
        return self.originals[name]

    def get_or_quantize(
        self,
        module: nn.Module,
        name: str,
        kind: str,
        scheme: TensorScheme,
        calib_inputs: torch.Tensor | None,
    ) -> QuantizedTensor:
        key = (name, scheme)
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        qt = quantize(self.original(module, name), scheme, calib_inputs, name=name, kind=kind)
        self._entries[key] = qt
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return qt

    def __len__(self) -> int:
        return len(self._entries)


def quantize_plan(
    module: nn.Module,
    spec: ModelSpec,
    plan: Plan,
    calib_inputs_by_tensor: Mapping[str, torch.Tensor] | None = None,
    cache: QuantCache | None = None,
) -> dict[str, QuantizedTensor]:
    """Quantize every tensor of `spec` under `plan` (fp32 tensors included, as fp32 storage)."""
    plan.validate(spec)
    cache = cache if cache is not None else QuantCache()
    calib = calib_inputs_by_tensor or {}
    return {
        t.name: cache.get_or_quantize(module, t.name, t.kind, plan.scheme(t.name), calib.get(t.name))
        for t in spec.tensors
    }


def apply_plan(
    module: nn.Module,
    spec: ModelSpec,
    plan: Plan,
    calib_inputs_by_tensor: Mapping[str, torch.Tensor] | None = None,
    cache: QuantCache | None = None,
) -> nn.Module:
    """Replace, in place, every weight named in `spec` by its quantize-dequantized value.

    Steps: (1) validate the plan against the spec (group sizes, names) and every parameter's
    shape against the spec; (2) for each tensor, take the full-precision original from `cache`
    (snapshotting it on first sight); (3) fetch or compute the QuantizedTensor for (name,
    scheme); (4) only when every tensor has its new value, copy them into the parameters — a
    plan that fails on any tensor leaves the module as it was.  fp32 tensors get their original
    back, so one module serves many plans when the same `cache` is passed across calls (a new
    cache snapshots the module's weights as they are now, quantized or not); returns `module`.
    """
    plan.validate(spec)
    cache = cache if cache is not None else QuantCache()
    calib = calib_inputs_by_tensor or {}
    with torch.no_grad():
        updates: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in spec.tensors:
            param = quantizable_parameter(module, t.name)
            if tuple(param.shape) != t.shape:
                raise PlanError(
                    f"tensor {t.name!r}: module has shape {tuple(param.shape)}, spec says {t.shape}"
                )
            scheme = plan.scheme(t.name)
            if scheme == TensorScheme():
                updates.append((param, cache.original(module, t.name)))
                continue
            qt = cache.get_or_quantize(module, t.name, t.kind, scheme, calib.get(t.name))
            updates.append((param, dequantize(qt).to(param.dtype)))
        for param, value in updates:
            param.copy_(value)
    return module


def restore_weights(module: nn.Module, cache: QuantCache) -> nn.Module:
    """Put the full-precision originals held by `cache` back into `module`."""
    with torch.no_grad():
        for name, original in cache.originals.items():
            param = quantizable_parameter(module, name)
            param.copy_(original.to(param.dtype))
    return module
