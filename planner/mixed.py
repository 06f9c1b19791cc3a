"""Mixed-precision plans from a sensitivity profile: a greedy size/fidelity frontier.

Start from a high-precision plan (every tensor on the first rung of its precision ladder) and
repeatedly move ONE tensor one rung down the ladder: the move with the smallest increase of
the profile's additive proxy loss per byte saved.  Every step yields a plan that is smaller
than the previous one and predicted no better, so the sequence is a frontier from "nearly
lossless" to "as small as the ladder allows".  It is cheap (numpy over the profile's
matrices; no model run) and is meant both for the engine benchmark and as a warm start for
the Optuna search.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from planner.quant.packing import packed_nbytes, plan_nbytes
from planner.sensitivity import SensitivityProfile
from planner.specs import ModelSpec, Plan, PlanError, TensorScheme, TensorSpec

__all__ = [
    "EMBEDDING_LADDER",
    "LINEAR_LADDER",
    "FrontierPoint",
    "SchemeFor",
    "greedy_frontier",
    "profile_scheme_for",
]

#: Rungs for Linear weights, widest first.
LINEAR_LADDER: tuple[str, ...] = ("int8", "int4", "int3", "int2")
#: Rungs for embedding tables (lookups: fp16 storage costs nothing at run time).
EMBEDDING_LADDER: tuple[str, ...] = ("fp16", "int8", "int4", "int3", "int2")

#: (tensor, precision) → how that tensor is stored at that precision.
SchemeFor = Callable[[TensorSpec, str], TensorScheme]


@dataclass(frozen=True)
class FrontierPoint:
    """One plan of the frontier.

    `weight_bytes` is `plan_nbytes` (packed bytes of every tensor plus fp32 other parameters:
    what a package's weights file holds); `proxy_loss` the profile's predicted loss (additive
    over tensors, on each tensor's monotone envelope, see `greedy_frontier`) — a prediction,
    never a measurement.  `changed` names the tensor moved down at this step (None at step 0).
    """

    plan: Plan
    weight_bytes: int
    proxy_loss: float
    step: int
    changed: str | None = None
    predicted: bool = True


def profile_scheme_for(profile: SensitivityProfile) -> SchemeFor:
    """The schemes the profile was measured with: its group size where it divides the input
    dimension (else per channel), its symmetry and method; fp16/fp32 as plain storage."""

    def scheme_for(tensor: TensorSpec, precision: str) -> TensorScheme:
        if not precision.startswith("int"):
            return TensorScheme(precision)
        gs = profile.group_size
        if gs is not None and tensor.shape[1] % gs:
            gs = None
        return TensorScheme(precision, gs, profile.symmetric, profile.method)

    return scheme_for


def greedy_frontier(
    spec: ModelSpec,
    profile: SensitivityProfile,
    *,
    ladder: Sequence[str] = LINEAR_LADDER,
    embedding_ladder: Sequence[str] | None = EMBEDDING_LADDER,
    scheme_for: SchemeFor | None = None,
    metric: str = "cosine",
    max_steps: int | None = None,
    frozen: Mapping[str, str] | None = None,
) -> list[FrontierPoint]:
    """The greedy frontier of mixed plans, from the ladders' top rungs down.

    Steps:
      1. per tensor, its ladder (`embedding_ladder` for embedding tables, else `ladder`;
         tensors named in `frozen` keep that one precision), the packed bytes of each rung
         (`packed_nbytes` of `scheme_for(tensor, precision)`) and the profile's loss of each
         rung; rungs that save no bytes are dropped;
      2. the loss along each ladder is replaced by its running maximum (a narrower grid is
         never better: a lower measured loss is noise, and this keeps the frontier monotone);
      3. repeat up to `max_steps` times: for every tensor not at its bottom rung, the cost of
         its next move = Δloss / Δbytes; move the cheapest (ties: most bytes saved, then model
         order), record the plan, its bytes and its proxy loss;
      4. proxy loss = Σ envelope losses, mapped through the profile's correction for `metric`
         (monotone) when it has one.
    Returns the points in order: bytes strictly decreasing, proxy loss non-decreasing.
    """
    scheme_for = scheme_for or profile_scheme_for(profile)
    frozen = dict(frozen or {})
    table = profile._table(metric)
    col = {p: i for i, p in enumerate(profile.precisions)}
    row = {n: i for i, n in enumerate(profile.tensors)}
    names = spec.tensor_names
    rungs: list[list[str]] = []
    for t in spec.tensors:
        if t.name not in row:
            raise PlanError(f"tensor {t.name!r} is not in the sensitivity profile of {profile.model!r}")
        if t.name in frozen:
            steps: Sequence[str] = (frozen[t.name],)
        elif t.kind == "embedding" and embedding_ladder is not None:
            steps = embedding_ladder
        else:
            steps = ladder
        kept: list[str] = []
        last_bytes = None
        for p in steps:
            if p not in col:
                raise PlanError(f"precision {p!r} was not profiled for {profile.model!r}")
            size = packed_nbytes(t.shape, scheme_for(t, p))
            if last_bytes is None or size < last_bytes:
                kept.append(p)
                last_bytes = size
        rungs.append(kept)
    depth = max(len(r) for r in rungs)
    n = len(names)
    loss = np.full((n, depth), np.inf)
    nbytes = np.full((n, depth), -1.0)
    for i, (t, r) in enumerate(zip(spec.tensors, rungs, strict=True)):
        losses = [float(table[row[t.name], col[p]]) for p in r]
        loss[i, : len(r)] = np.maximum.accumulate(np.maximum(losses, 0.0))
        nbytes[i, : len(r)] = [packed_nbytes(t.shape, scheme_for(t, p)) for p in r]
    bottom = np.array([len(r) - 1 for r in rungs])
    level = np.zeros(n, dtype=np.int64)
    a, b = profile.corrections.get(metric, (1.0, 1.0))

    def corrected(s: float) -> float:
        return s if (a, b) == (1.0, 1.0) else float(a * max(s, 0.0) ** b)

    def point(step: int, changed: str | None) -> FrontierPoint:
        plan = Plan.build({names[i]: scheme_for(spec.tensors[i], rungs[i][level[i]]) for i in range(n)})
        total = float(loss[np.arange(n), level].sum())
        return FrontierPoint(plan, plan_nbytes(spec, plan), corrected(total), step, changed)

    points = [point(0, None)]
    limit = max_steps if max_steps is not None else int(bottom.sum())
    idx = np.arange(n)
    for step in range(1, limit + 1):
        movable = level < bottom
        if not movable.any():
            break
        nxt = np.minimum(level + 1, bottom)
        d_loss = loss[idx, nxt] - loss[idx, level]
        d_bytes = nbytes[idx, level] - nbytes[idx, nxt]
        cost = np.where(movable, d_loss / np.where(movable, d_bytes, 1.0), np.inf)
        best = cost.min()
        # Ties (often several zero-loss moves): save the most bytes first, then model order.
        tied = np.flatnonzero(movable & (cost <= best + 1e-15))
        pick = int(tied[np.argmax(d_bytes[tied])])
        level[pick] += 1
        points.append(point(step, names[pick]))
    return points
