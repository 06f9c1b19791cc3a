"""Measured exit fractions of early-exit plans: where the held-out examples left the model.

A variant stores its fractions in its metrics when it was recorded from a run; otherwise the
real evaluation that measured its plan holds them (one option per plan of the evaluated
weights).  `exit_fractions` reads the evaluations once and indexes every option by plan hash,
for the model page's exit chart and for the cost model's predictions (`registry.calibration`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from registry.models import RealEvaluation

__all__ = ["exit_fractions", "variant_exit_fraction"]


def exit_fractions(
    model_ids: Iterable[int], plan_hashes: Iterable[str], weights_keys: Iterable[str] | None = None
) -> dict[tuple[int, str], list[float]]:
    """(model id, plan hash) → the exit fractions a finished real evaluation measured for that
    plan, for the wanted hashes that have any. One query (narrowed to the evaluations of
    `weights_keys` when the caller knows them); each option's plan parsed once."""
    from planner.specs import Plan

    wanted = set(plan_hashes)
    out: dict[tuple[int, str], list[float]] = {}
    if not wanted:
        return out
    evaluations = RealEvaluation.objects.filter(
        base_model_id__in=list(model_ids), status=RealEvaluation.Status.DONE
    )
    if weights_keys is not None:
        evaluations = evaluations.filter(weights_key__in=set(weights_keys))
    for model_id, result in evaluations.values_list("base_model_id", "result"):
        for option in (result or {}).get("options", []):
            fraction = option.get("exit_fraction")
            if not fraction or not isinstance(option.get("plan"), dict):
                continue
            try:
                plan_hash = Plan.from_dict(option["plan"]).hash()
            except (TypeError, KeyError, ValueError):  # PlanError is a ValueError
                continue
            if plan_hash in wanted:
                out.setdefault((model_id, plan_hash), [float(x) for x in fraction])
    return out


def variant_exit_fraction(
    metrics: dict[str, Any] | None, model_id: int, plan_hash: str, index: dict[tuple[int, str], list[float]]
) -> list[float] | None:
    """A variant's exit fractions: its own metrics first, else the evaluations' (`index`)."""
    own = (metrics or {}).get("exit_fraction")
    if own:
        return [float(x) for x in own]
    return index.get((model_id, plan_hash))
