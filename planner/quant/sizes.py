"""Byte sizes of packed tensors and plans, and the shape rules of a scheme — without torch.

Split from `core` / `packing` so that the cost model (and every web page that predicts) can
count bytes without importing torch: `planner.cost` is imported by Django views, and torch
costs ~2 s and ~200 MB per process.  `packing.pack` writes exactly what these functions count
(tests compare them with the bytes written).
"""

from __future__ import annotations

from planner.specs import ModelSpec, Plan, PlanError, TensorScheme

__all__ = [
    "HOT_ROW_EXTRA_BYTES",
    "codes_nbytes",
    "n_groups",
    "packed_nbytes",
    "plan_nbytes",
    "validate_scheme",
    "weights_nbytes",
]

#: Bytes a hot row costs besides its `cols` int8 codes: its int32 row index and fp16 scale.
HOT_ROW_EXTRA_BYTES = 4 + 2


def n_groups(cols: int, scheme: TensorScheme) -> int:
    return 1 if scheme.group_size is None else cols // scheme.group_size


def validate_scheme(shape: tuple[int, ...], scheme: TensorScheme, name: str = "weight") -> tuple[int, int]:
    """Check that `scheme` can store a tensor of `shape`; return the shape as (rows, cols).

    Raises PlanError naming the tensor and the rule it breaks.
    """
    if len(shape) != 2:
        raise PlanError(f"tensor {name!r}: quantizable tensors are 2-D matrices, got shape {tuple(shape)}")
    rows, cols = int(shape[0]), int(shape[1])
    if rows <= 0 or cols <= 0:
        raise PlanError(f"tensor {name!r}: shape {tuple(shape)} is empty")
    if scheme.is_integer and scheme.group_size is not None and cols % scheme.group_size:
        raise PlanError(
            f"tensor {name!r}: group_size {scheme.group_size} does not divide its input dimension {cols} "
            f"(rule: group size must divide the input dimension)"
        )
    if scheme.hot_rows >= rows:
        raise PlanError(f"tensor {name!r}: hot_rows {scheme.hot_rows} must be below its {rows} rows")
    return rows, cols


def codes_nbytes(n: int, bits: int) -> int:
    """Bytes of `n` codes of `bits` bits, bit-packed."""
    return -(-n * bits // 8)


def packed_nbytes(shape: tuple[int, int], scheme: TensorScheme, name: str = "weight") -> int:
    """Bytes `pack` produces for a tensor of `shape` under `scheme` (payload only, no header);
    `name` is the tensor an invalid scheme is reported for."""
    rows, cols = validate_scheme(shape, scheme, name)
    n = rows * cols
    if not scheme.is_integer:
        return n * (2 if scheme.precision == "fp16" else 4)
    side = rows * n_groups(cols, scheme) * 2
    hot = scheme.hot_rows * (cols + HOT_ROW_EXTRA_BYTES)
    return codes_nbytes(n, scheme.bits) + side * (1 if scheme.symmetric else 2) + hot


def weights_nbytes(spec: ModelSpec, plan: Plan) -> int:
    """Packed bytes of every quantizable tensor of `spec` under `plan`."""
    plan.validate(spec)
    return sum(packed_nbytes(t.shape, plan.scheme(t.name), t.name) for t in spec.tensors)


def plan_nbytes(spec: ModelSpec, plan: Plan) -> int:
    """Packed weight bytes of a whole plan: quantizable tensors plus `other_params` in fp32."""
    return weights_nbytes(spec, plan) + 4 * spec.other_params
