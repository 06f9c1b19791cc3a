"""Pareto fronts, recommendation policies and their explanations (pure, no Django).

A `Candidate` is one variant as seen on one device: its accuracy (measured or estimated, and
which), its predicted latency and memory on that device.  `recommend` applies a `Policy` and
returns the chosen candidate, the constraint that binds, its neighbours on the front, and —
when nothing is feasible — which constraint fails and by how much.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from planner.specs import PlanError

__all__ = [
    "POLICY_KINDS",
    "Candidate",
    "Policy",
    "Recommendation",
    "pareto_front",
    "recommend",
]

POLICY_KINDS: dict[str, str] = {
    "max_accuracy": "max accuracy with latency ≤ SLO and memory ≤ budget",
    "min_latency": "min latency with accuracy loss ≤ X points (and memory ≤ budget)",
    "min_memory": "min memory with accuracy loss ≤ X points and latency ≤ SLO",
}


@dataclass(frozen=True)
class Policy:
    """What "best" means for a device. Accuracies are fractions (0–1); loss is in points (0–100).

    `memory_budget_bytes` overrides the device profile's RAM budget when set.
    """

    kind: str = "max_accuracy"
    latency_slo_ms: float | None = None
    max_loss_points: float | None = None
    accuracy_floor: float | None = None
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        errors = self.errors()
        if errors:
            field_name, message = next(iter(errors.items()))
            raise PlanError(f"policy.{field_name}: {message}")

    def errors(self, fp32_accuracy: float | None = None) -> dict[str, str]:
        """Field → rule broken; empty when the policy is usable (with `fp32_accuracy` if known).
        Types first: a policy read from JSON may hold `true` (which would pass as 1 ms) or "5"."""
        errors = self._type_errors()
        if errors:
            return errors  # the range rules below assume numbers
        if self.kind not in POLICY_KINDS:
            errors["kind"] = f"must be one of {', '.join(POLICY_KINDS)}"
        if self.latency_slo_ms is not None and not (0 < self.latency_slo_ms <= 3_600_000):
            errors["latency_slo_ms"] = "must be greater than 0 and at most one hour (3,600,000 ms)"
        if self.max_loss_points is not None and not (0 <= self.max_loss_points <= 100):
            errors["max_loss_points"] = "must be between 0 and 100 points"
        if self.accuracy_floor is not None and not (0 <= self.accuracy_floor <= 1):
            errors["accuracy_floor"] = "must be a fraction between 0 and 1"
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            errors["memory_budget_bytes"] = "must be greater than 0 bytes"
        if (
            self.kind in {"min_latency", "min_memory"}
            and self.max_loss_points is None
            and self.accuracy_floor is None
        ):
            errors["max_loss_points"] = (
                f"policy {self.kind} needs a loss bound (max_loss_points or accuracy_floor)"
            )
        if self.kind == "min_memory" and self.latency_slo_ms is None:
            errors["latency_slo_ms"] = "policy min_memory needs a latency SLO"
        if fp32_accuracy is not None:
            if self.accuracy_floor is not None and self.accuracy_floor > fp32_accuracy:
                errors["accuracy_floor"] = (
                    f"{self.accuracy_floor:.4f} is above the full-precision accuracy {fp32_accuracy:.4f}: "
                    "no variant can reach it"
                )
            if self.accuracy_floor is not None and self.max_loss_points is not None:
                implied = fp32_accuracy - self.max_loss_points / 100
                if abs(implied - self.accuracy_floor) > 1e-9:
                    errors["max_loss_points"] = (
                        f"contradicts accuracy_floor: {self.max_loss_points} points of loss means a floor "
                        f"of {implied:.4f}, not {self.accuracy_floor:.4f}; give one of the two"
                    )
        return errors

    def _type_errors(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if not isinstance(self.kind, str):
            errors["kind"] = f"must be one of {', '.join(POLICY_KINDS)}"
        for name, kind, rule in (
            ("latency_slo_ms", numbers.Real, "must be a number of milliseconds"),
            ("max_loss_points", numbers.Real, "must be a number of points"),
            ("accuracy_floor", numbers.Real, "must be a number (a fraction from 0 to 1)"),
            ("memory_budget_bytes", numbers.Integral, "must be an integer number of bytes"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            # bool is an int subclass: `true` must not pass as 1.
            if isinstance(value, bool) or not isinstance(value, kind):
                errors[name] = rule
            elif not math.isfinite(value):
                errors[name] = "must be a finite number"
        return errors

    def floor(self, fp32_accuracy: float) -> float | None:
        """The accuracy a candidate must reach, from the floor or the loss bound."""
        floors = []
        if self.accuracy_floor is not None:
            floors.append(self.accuracy_floor)
        if self.max_loss_points is not None:
            floors.append(fp32_accuracy - self.max_loss_points / 100)
        return max(floors) if floors else None

    def describe(self) -> str:
        parts = [POLICY_KINDS.get(self.kind, self.kind)]
        if self.latency_slo_ms is not None:
            parts.append(f"SLO {self.latency_slo_ms:g} ms")
        if self.max_loss_points is not None:
            parts.append(f"loss ≤ {self.max_loss_points:g} points")
        if self.accuracy_floor is not None:
            parts.append(f"accuracy ≥ {self.accuracy_floor:.3f}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        unknown = set(data) - {
            "kind",
            "latency_slo_ms",
            "max_loss_points",
            "accuracy_floor",
            "memory_budget_bytes",
        }
        if unknown:
            raise PlanError(f"policy: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class Candidate:
    """One variant on one device. Latency and memory are predictions for that device."""

    key: str
    accuracy: float
    latency_s: float
    memory_bytes: int
    accuracy_source: str = "measured"  # or "estimated"
    latency_source: str = "predicted"  # or "measured"
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dominates(a: Candidate, b: Candidate) -> bool:
    no_worse = a.accuracy >= b.accuracy and a.latency_s <= b.latency_s and a.memory_bytes <= b.memory_bytes
    better = a.accuracy > b.accuracy or a.latency_s < b.latency_s or a.memory_bytes < b.memory_bytes
    return no_worse and better


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Non-dominated candidates (accuracy up, latency down, memory down), by latency then accuracy."""
    front = [c for c in candidates if not any(_dominates(o, c) for o in candidates if o is not c)]
    unique: dict[tuple[float, float, int], Candidate] = {}
    for c in front:
        unique.setdefault((c.accuracy, c.latency_s, c.memory_bytes), c)
    return sorted(unique.values(), key=lambda c: (c.latency_s, -c.accuracy))


@dataclass(frozen=True)
class Recommendation:
    policy: str
    chosen: Candidate | None
    binding: str  # the constraint or objective that decided, in words
    reason: str
    neighbours: tuple[Candidate, ...]
    infeasible: dict[str, str]  # constraint → by how much the closest candidate misses it
    front: tuple[Candidate, ...]

    @property
    def feasible(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "binding": self.binding,
            "reason": self.reason,
            "neighbours": [n.to_dict() for n in self.neighbours],
            "infeasible": dict(self.infeasible),
            "front": [c.to_dict() for c in self.front],
        }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _violations(c: Candidate, slo_s: float | None, budget: int, floor: float | None) -> dict[str, float]:
    """Constraint → relative shortfall (0 when met); used to rank near-misses."""
    out: dict[str, float] = {}
    if c.memory_bytes > budget:
        out["memory"] = c.memory_bytes / budget - 1
    if slo_s is not None and c.latency_s > slo_s:
        out["latency"] = c.latency_s / slo_s - 1
    if floor is not None and c.accuracy < floor:
        out["accuracy"] = (floor - c.accuracy) / max(floor, 1e-9)
    return out


def recommend(
    candidates: Sequence[Candidate],
    policy: Policy,
    *,
    fp32_accuracy: float,
    device_memory_budget: int,
    neighbours: int = 2,
) -> Recommendation:
    """Steps: build the Pareto front; keep the candidates meeting every constraint; pick the
    best by the policy's objective; name what binds (the constraint the runner-up on the
    objective breaks, or the objective itself); list the front neighbours either side.
    With nothing feasible, explain each failing constraint by the closest candidate's miss."""
    budget = policy.memory_budget_bytes or device_memory_budget
    slo_s = policy.latency_slo_ms / 1000 if policy.latency_slo_ms is not None else None
    floor = policy.floor(fp32_accuracy)
    front = pareto_front(candidates)
    feasible = [c for c in front if not _violations(c, slo_s, budget, floor)]
    described = policy.describe()
    if not candidates:
        return Recommendation(described, None, "no candidates", "the search produced no variant", (), {}, ())
    if not feasible:
        return _explain_infeasible(candidates, front, described, slo_s, budget, floor)

    if policy.kind == "max_accuracy":
        chosen = max(feasible, key=lambda c: (c.accuracy, -c.latency_s, -c.memory_bytes))
        better = [c for c in front if c.accuracy > chosen.accuracy]
        objective = "highest accuracy"
    elif policy.kind == "min_latency":
        chosen = min(feasible, key=lambda c: (c.latency_s, -c.accuracy, c.memory_bytes))
        better = [c for c in front if c.latency_s < chosen.latency_s]
        objective = "lowest latency"
    else:
        chosen = min(feasible, key=lambda c: (c.memory_bytes, c.latency_s, -c.accuracy))
        better = [c for c in front if c.memory_bytes < chosen.memory_bytes]
        objective = "lowest memory"

    binding = objective
    if better:
        # The variant just beyond the chosen one on the objective: what stops us taking it?
        nearest = min(better, key=lambda c: _objective_gap(policy.kind, chosen, c))
        misses = _violations(nearest, slo_s, budget, floor)
        if misses:
            worst = max(misses, key=lambda k: misses[k])
            if worst == "latency":
                binding = f"latency SLO {policy.latency_slo_ms:g} ms"
            elif worst == "memory":
                binding = f"memory budget {_mib(budget)}"
            else:
                binding = f"accuracy floor {floor:.4f}"
    loss_points = (fp32_accuracy - chosen.accuracy) * 100
    reason = (
        f"{objective} among {len(feasible)} feasible of {len(front)} front variants: accuracy "
        f"{chosen.accuracy:.4f} ({chosen.accuracy_source}; {loss_points:+.2f} points vs FP32 loss), latency "
        f"{_ms(chosen.latency_s)} ({chosen.latency_source}), memory {_mib(chosen.memory_bytes)} (predicted) "
        f"≤ budget {_mib(budget)}; binding: {binding}"
    )
    ordered = sorted(front, key=lambda c: c.latency_s)
    at = ordered.index(chosen)
    near = tuple(ordered[max(0, at - neighbours) : at] + ordered[at + 1 : at + 1 + neighbours])
    return Recommendation(described, chosen, binding, reason, near, {}, tuple(front))


def _objective_gap(kind: str, chosen: Candidate, other: Candidate) -> float:
    """How far `other`, better than `chosen` on the policy's objective, lies beyond it — on
    the objective's own scale (accuracy, seconds or bytes), so the nearest is the runner-up."""
    if kind == "max_accuracy":
        return other.accuracy - chosen.accuracy
    if kind == "min_latency":
        return chosen.latency_s - other.latency_s
    return float(chosen.memory_bytes - other.memory_bytes)


def _explain_infeasible(
    candidates: Sequence[Candidate],
    front: Sequence[Candidate],
    described: str,
    slo_s: float | None,
    budget: int,
    floor: float | None,
) -> Recommendation:
    failing: dict[str, str] = {}
    best_memory = min(candidates, key=lambda c: c.memory_bytes)
    if best_memory.memory_bytes > budget:
        failing["memory"] = (
            f"smallest variant needs {_mib(best_memory.memory_bytes)}, budget is {_mib(budget)} "
            f"({_mib(best_memory.memory_bytes - budget)} over)"
        )
    if slo_s is not None:
        fastest = min(candidates, key=lambda c: c.latency_s)
        if fastest.latency_s > slo_s:
            failing["latency"] = (
                f"fastest variant takes {_ms(fastest.latency_s)} ({fastest.latency_source}), "
                f"SLO is {_ms(slo_s)} "
                f"({_ms(fastest.latency_s - slo_s)} over)"
            )
    if floor is not None:
        best = max(candidates, key=lambda c: c.accuracy)
        if best.accuracy < floor:
            failing["accuracy"] = (
                f"most accurate variant reaches {best.accuracy:.4f}, floor is {floor:.4f} "
                f"({(floor - best.accuracy) * 100:.2f} points short)"
            )
    if not failing:
        failing["combination"] = (
            "each constraint is met by some variant, but no single variant meets all of them at once"
        )
    reason = "no variant is feasible: " + "; ".join(f"{k}: {v}" for k, v in failing.items())
    return Recommendation(described, None, next(iter(failing)), reason, (), failing, tuple(front))
