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

from planner.quant.sizes import packed_nbytes, plan_nbytes
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
        return profile.family_scheme(tensor.shape, precision)

    return scheme_for


@dataclass(frozen=True)
class _Option:
    nbytes: int
    loss: float
    scheme: TensorScheme


def _hull(options: list[_Option]) -> list[_Option]:
    """The options worth moving through, widest first: drop every option another beats on both
    bytes and loss, then keep the lower convex hull of (bytes, loss), so that each further step
    costs more loss per byte saved than the one before (the greedy's marginal costs rise)."""
    efficient: list[_Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.loss)):  # narrowest first
        if not efficient or o.loss < efficient[-1].loss:
            efficient.append(o)
    efficient.reverse()  # widest (least loss) first
    hull: list[_Option] = []
    for o in efficient:
        hull.append(o)
        while len(hull) >= 3:
            a, b, c = hull[-3], hull[-2], hull[-1]
            if (c.loss - b.loss) / (b.nbytes - c.nbytes) < (b.loss - a.loss) / (a.nbytes - b.nbytes):
                hull.pop(-2)
            else:
                break
    return hull


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
    use_variants: bool = True,
) -> list[FrontierPoint]:
    """The greedy frontier of mixed plans, from the widest options down.

    Steps:
      1. per tensor, its options: each precision of its ladder (`embedding_ladder` for
         embedding tables, else `ladder`; tensors named in `frozen` keep that one precision)
         stored as `scheme_for(tensor, precision)`, with the profile's loss, the family losses
         replaced by their running maximum down the ladder (a narrower grid of the same family
         is never better: a lower measured loss is noise); plus, with `use_variants`, every
         variant the profile measured for the tensor whose precision is on its ladder;
      2. per tensor, the lower convex hull of its options in (bytes, loss) (`_hull`);
      3. start every tensor at its widest hull option; repeat up to `max_steps` times: for
         every tensor not at its last option, the cost of its next step = Δloss / Δbytes; take
         the cheapest (ties: most bytes saved, then model order), record the plan, its bytes
         and its proxy loss;
      4. proxy loss = Σ option losses, mapped through the profile's correction for `metric`
         (monotone) when it has one.
    Returns the points in order: bytes strictly decreasing, proxy loss non-decreasing.
    """
    scheme_for = scheme_for or profile_scheme_for(profile)
    frozen = dict(frozen or {})
    unknown = sorted(set(frozen) - set(spec.tensor_names))
    if unknown:
        raise PlanError(f"frozen names tensors {unknown} that model {spec.name!r} does not have")
    table = profile._table(metric)
    col = {p: i for i, p in enumerate(profile.precisions)}
    row = {n: i for i, n in enumerate(profile.tensors)}
    hulls: list[list[_Option]] = []
    for t in spec.tensors:
        if t.name not in row:
            raise PlanError(f"tensor {t.name!r} is not in the sensitivity profile of {profile.model!r}")
        if t.name in frozen:
            steps: Sequence[str] = (frozen[t.name],)
        elif t.kind == "embedding" and embedding_ladder is not None:
            steps = embedding_ladder
        else:
            steps = ladder
        for p in steps:
            if p not in col:
                raise PlanError(f"precision {p!r} was not profiled for {profile.model!r}")
        family = np.maximum.accumulate(np.maximum([float(table[row[t.name], col[p]]) for p in steps], 0.0))
        options = [
            _Option(packed_nbytes(t.shape, scheme_for(t, p), t.name), float(loss), scheme_for(t, p))
            for p, loss in zip(steps, family, strict=True)
        ]
        if use_variants and t.name not in frozen:
            options += [
                _Option(packed_nbytes(t.shape, v.scheme, t.name), max(v.losses[metric], 0.0), v.scheme)
                for v in profile.variants_of(t.name)
                if v.scheme.precision in steps
            ]
        hulls.append(_hull(options))
    names = spec.tensor_names
    n = len(names)
    level = [0] * n
    a, b = profile.corrections.get(metric, (1.0, 1.0))

    def corrected(s: float) -> float:
        return s if (a, b) == (1.0, 1.0) else float(a * max(s, 0.0) ** b)

    def point(step: int, changed: str | None) -> FrontierPoint:
        plan = Plan.build({names[i]: hulls[i][level[i]].scheme for i in range(n)})
        total = sum(hulls[i][level[i]].loss for i in range(n))
        return FrontierPoint(plan, plan_nbytes(spec, plan), corrected(total), step, changed)

    points = [point(0, None)]
    limit = max_steps if max_steps is not None else sum(len(h) - 1 for h in hulls)
    for step in range(1, limit + 1):
        best: tuple[float, int, int] | None = None  # (cost, -bytes saved, index)
        for i, h in enumerate(hulls):
            if level[i] + 1 < len(h):
                here, nxt = h[level[i]], h[level[i] + 1]
                saved = here.nbytes - nxt.nbytes
                key = ((nxt.loss - here.loss) / saved, -saved, i)
                if best is None or key < best:
                    best = key
        if best is None:
            break
        level[best[2]] += 1
        points.append(point(step, names[best[2]]))
    return points
