"""Value types shared by every part of the engine.

`ModelSpec` describes what a model exposes (its quantizable tensors and exit points),
`TensorScheme` how one tensor is stored, `Plan` a whole choice (one scheme per tensor plus
early-exit thresholds) and `DeviceSpec` what a device offers.  All are frozen dataclasses that
serialise to plain dicts so they cross process and database boundaries unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "GROUP_SIZES",
    "HOT_ROWS",
    "PRECISIONS",
    "PRECISION_BITS",
    "QUANT_METHODS",
    "DeviceSpec",
    "ModelSpec",
    "Plan",
    "PlanError",
    "TensorScheme",
    "TensorSpec",
]

Precision = Literal["fp32", "fp16", "int8", "int4", "int3", "int2"]
#: Every weight precision the engine can store, widest first.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "int3", "int2")
PRECISION_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2}
#: None means one scale per output channel; an int means one scale per that many input weights.
GROUP_SIZES: tuple[int | None, ...] = (None, 32, 64, 128)
QUANT_METHODS: tuple[str, ...] = ("rtn", "gptq")
#: Hot-row counts the planner tries for an embedding table (`TensorScheme.hot_rows`; any count
#: below the table's rows is valid).
HOT_ROWS: tuple[int, ...] = (256, 1024, 4096)


class PlanError(ValueError):
    """A plan, scheme or spec breaks a rule; the message names the tensor/field and the rule."""


@dataclass(frozen=True)
class TensorSpec:
    """One quantizable weight tensor.

    `kind` is "linear" (weight of shape (out_features, in_features), used in a matmul) or
    "embedding" (table of shape (rows, dim), used by lookup: only the rows touched are read).
    `block` is the transformer block the tensor belongs to (0-based), -1 for the embeddings
    before the first block.  `macs_per_token` counts multiply-adds per token (0 for lookups).
    """

    name: str
    kind: Literal["linear", "embedding"]
    shape: tuple[int, int]
    block: int
    macs_per_token: int

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "block": self.block,
            "macs_per_token": self.macs_per_token,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=data["name"],
            kind=data["kind"],
            shape=(int(data["shape"][0]), int(data["shape"][1])),
            block=int(data["block"]),
            macs_per_token=int(data["macs_per_token"]),
        )


@dataclass(frozen=True)
class ModelSpec:
    """The structure of a model as the planner sees it.

    `n_blocks` transformer blocks; `exit_points` lists the blocks after which the model may stop
    (the last block is always one).  `other_params` counts parameters that are never quantized
    (norms, biases, exit heads) and stay fp32.  `hidden_size`, `n_heads`, `intermediate_size`
    and `vocab_size` let the cost model size activations; spec-only models (an LLM described by
    its config) carry these and no weights.
    """

    name: str
    tensors: tuple[TensorSpec, ...]
    n_blocks: int
    exit_points: tuple[int, ...]
    hidden_size: int
    n_heads: int
    intermediate_size: int
    vocab_size: int
    other_params: int = 0
    max_seq_len: int = 512

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise PlanError(f"unknown tensor {name!r} for model {self.name!r}")

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensors": [t.to_dict() for t in self.tensors],
            "n_blocks": self.n_blocks,
            "exit_points": list(self.exit_points),
            "hidden_size": self.hidden_size,
            "n_heads": self.n_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "other_params": self.other_params,
            "max_seq_len": self.max_seq_len,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            name=data["name"],
            tensors=tuple(TensorSpec.from_dict(t) for t in data["tensors"]),
            n_blocks=int(data["n_blocks"]),
            exit_points=tuple(int(x) for x in data["exit_points"]),
            hidden_size=int(data["hidden_size"]),
            n_heads=int(data["n_heads"]),
            intermediate_size=int(data["intermediate_size"]),
            vocab_size=int(data["vocab_size"]),
            other_params=int(data.get("other_params", 0)),
            max_seq_len=int(data.get("max_seq_len", 512)),
        )


@dataclass(frozen=True)
class TensorScheme:
    """How one tensor is stored: precision, group size, symmetry and rounding method.

    `hot_rows` (embedding tables only) keeps that many rows — the ones looked up most often in
    the lookup statistics given to the quantizer — at int8 with one scale per row, the rest of
    the table at `precision`: a table's lookups are very uneven (in the built-in task the 1,024
    most frequent tokens are ~90 % of all lookups), so a few hundred kilobytes of int8 rows buy
    what a wider grid for the whole table would.
    fp32/fp16 ignore group size, symmetry, method and hot rows (they are normalised away so that
    equal storage gives equal hashes).
    """

    precision: str = "fp32"
    group_size: int | None = None
    symmetric: bool = True
    method: str = "rtn"
    hot_rows: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_BITS:
            raise PlanError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.group_size not in GROUP_SIZES:
            raise PlanError(f"group_size {self.group_size!r} is not one of per-channel (null), 32, 64, 128")
        if self.method not in QUANT_METHODS:
            raise PlanError(f"method {self.method!r} is not one of {', '.join(QUANT_METHODS)}")
        if type(self.hot_rows) is not int or self.hot_rows < 0:
            raise PlanError(f"hot_rows {self.hot_rows!r} must be a whole number ≥ 0")
        if not self.is_integer:
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "symmetric", True)
            object.__setattr__(self, "method", "rtn")
            object.__setattr__(self, "hot_rows", 0)

    @property
    def bits(self) -> int:
        return PRECISION_BITS[self.precision]

    @property
    def is_integer(self) -> bool:
        return self.precision.startswith("int")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "precision": self.precision,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "method": self.method,
        }
        # Only when set: every plan stored before hot rows existed keeps its dict and hash.
        if self.hot_rows:
            out["hot_rows"] = self.hot_rows
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorScheme:
        unknown = set(data) - {"precision", "group_size", "symmetric", "method", "hot_rows"}
        if unknown:
            raise PlanError(f"unknown scheme field(s): {', '.join(sorted(unknown))}")
        return cls(
            precision=data.get("precision", "fp32"),
            group_size=data.get("group_size"),
            symmetric=bool(data.get("symmetric", True)),
            method=data.get("method", "rtn"),
            hot_rows=data.get("hot_rows", 0),
        )


@dataclass(frozen=True)
class Plan:
    """A whole choice for one model: a scheme per tensor and early-exit thresholds.

    `schemes` maps tensor name → scheme; tensors not named are fp32.  `exit_threshold` is the
    confidence (max softmax probability) at or above which an exit head answers and the model
    stops; None disables early exit.  The hash identifies a plan across processes and devices.
    """

    schemes: tuple[tuple[str, TensorScheme], ...] = field(default_factory=tuple)
    exit_threshold: float | None = None

    @classmethod
    def build(cls, schemes: dict[str, TensorScheme], exit_threshold: float | None = None) -> Plan:
        if exit_threshold is not None and not (0.0 < exit_threshold <= 1.0):
            raise PlanError(f"exit_threshold {exit_threshold!r} must be in (0, 1]")
        items = tuple(sorted((n, s) for n, s in schemes.items() if s != TensorScheme()))
        return cls(schemes=items, exit_threshold=exit_threshold)

    @classmethod
    def uniform(cls, spec: ModelSpec, scheme: TensorScheme, exit_threshold: float | None = None) -> Plan:
        return cls.build({name: scheme for name in spec.tensor_names}, exit_threshold)

    def scheme(self, name: str) -> TensorScheme:
        for n, s in self.schemes:
            if n == name:
                return s
        return TensorScheme()

    def validate(self, spec: ModelSpec) -> None:
        """Raise PlanError naming the tensor and the rule if the plan does not fit `spec`."""
        known = set(spec.tensor_names)
        for name, scheme in self.schemes:
            if name not in known:
                raise PlanError(f"unknown tensor {name!r} for model {spec.name!r}")
            tensor = spec.tensor(name)
            if scheme.group_size is not None and tensor.shape[1] % scheme.group_size:
                raise PlanError(
                    f"tensor {name!r}: group_size {scheme.group_size} does not divide "
                    f"its input dimension {tensor.shape[1]}"
                )
            if scheme.hot_rows and tensor.kind != "embedding":
                raise PlanError(f"tensor {name!r}: hot_rows applies to embedding tables only")
            if scheme.hot_rows >= tensor.shape[0]:
                raise PlanError(
                    f"tensor {name!r}: hot_rows {scheme.hot_rows} must be below its {tensor.shape[0]} rows"
                )

    def with_threshold(self, exit_threshold: float | None) -> Plan:
        return Plan.build(dict(self.schemes), exit_threshold)

    def weights_key(self) -> str:
        """Hash of the weight schemes only: plans differing only in threshold share it."""
        body = json.dumps([[n, s.to_dict()] for n, s in self.schemes], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def hash(self) -> str:
        body = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schemes": {n: s.to_dict() for n, s in self.schemes},
            "exit_threshold": self.exit_threshold,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        unknown = set(data) - {"schemes", "exit_threshold"}
        if unknown:
            raise PlanError(f"unknown plan field(s): {', '.join(sorted(unknown))}")
        schemes = {n: TensorScheme.from_dict(s) for n, s in (data.get("schemes") or {}).items()}
        return cls.build(schemes, data.get("exit_threshold"))


@dataclass(frozen=True)
class DeviceSpec:
    """What a device offers, in explicit units.

    Memory in bytes, bandwidth in GB/s (1e9 bytes/s), compute in TOPS / TFLOPS (1e12 ops/s;
    one multiply-add = 2 ops).  A precision missing from `weight_formats` falls back (see
    planner.cost).  None for a peak means "not known / not supported".
    """

    name: str
    ram_total_bytes: int
    ram_budget_bytes: int
    bandwidth_gbs: float
    fp32_tflops: float | None = None
    fp16_tflops: float | None = None
    int8_tops: float | None = None
    int4_tops: float | None = None
    weight_formats: tuple[str, ...] = ("fp32",)
    activation_formats: tuple[str, ...] = ("fp32",)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ram_total_bytes": self.ram_total_bytes,
            "ram_budget_bytes": self.ram_budget_bytes,
            "bandwidth_gbs": self.bandwidth_gbs,
            "fp32_tflops": self.fp32_tflops,
            "fp16_tflops": self.fp16_tflops,
            "int8_tops": self.int8_tops,
            "int4_tops": self.int4_tops,
            "weight_formats": list(self.weight_formats),
            "activation_formats": list(self.activation_formats),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceSpec:
        return cls(
            name=data["name"],
            ram_total_bytes=int(data["ram_total_bytes"]),
            ram_budget_bytes=int(data["ram_budget_bytes"]),
            bandwidth_gbs=float(data["bandwidth_gbs"]),
            fp32_tflops=data.get("fp32_tflops"),
            fp16_tflops=data.get("fp16_tflops"),
            int8_tops=data.get("int8_tops"),
            int4_tops=data.get("int4_tops"),
            weight_formats=tuple(data.get("weight_formats") or ("fp32",)),
            activation_formats=tuple(data.get("activation_formats") or ("fp32",)),
        )
