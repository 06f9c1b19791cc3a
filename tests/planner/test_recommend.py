"""Pareto fronts and policies: the chosen variant, what binds, neighbours, infeasibility."""

from __future__ import annotations

import pytest

from planner.recommend import Candidate, Policy, pareto_front, recommend
from planner.specs import PlanError

MIB = 2**20
FP32 = 0.90


def cand(key: str, acc: float, ms: float, mib: float) -> Candidate:
    return Candidate(key=key, accuracy=acc, latency_s=ms / 1000, memory_bytes=int(mib * MIB))


FRONT = [
    cand("fp32", 0.900, 40, 90),
    cand("int8", 0.899, 20, 25),
    cand("mixed", 0.893, 12, 14),
    cand("int4", 0.880, 9, 12),
    cand("int3", 0.820, 7, 9),
]
DOMINATED = [cand("bad", 0.85, 30, 60), cand("dup", 0.880, 9, 12)]


def test_the_front_drops_dominated_and_duplicate_points():
    front = pareto_front(FRONT + DOMINATED)
    assert [c.key for c in front] == ["int3", "int4", "mixed", "int8", "fp32"]


def test_max_accuracy_under_an_slo_names_the_slo_as_binding():
    rec = recommend(
        FRONT, Policy("max_accuracy", latency_slo_ms=15), fp32_accuracy=FP32, device_memory_budget=100 * MIB
    )
    assert rec.chosen is not None and rec.chosen.key == "mixed"
    assert rec.binding == "latency SLO 15 ms"
    assert {n.key for n in rec.neighbours} == {"int3", "int4", "int8", "fp32"}
    assert "predicted" in rec.reason


def test_max_accuracy_under_a_memory_budget_names_the_budget():
    rec = recommend(FRONT, Policy("max_accuracy"), fp32_accuracy=FP32, device_memory_budget=30 * MIB)
    assert rec.chosen.key == "int8"
    assert rec.binding.startswith("memory budget")


def test_min_latency_with_a_loss_bound():
    rec = recommend(
        FRONT, Policy("min_latency", max_loss_points=1.0), fp32_accuracy=FP32, device_memory_budget=10**9
    )
    assert rec.chosen.key == "mixed"
    assert rec.binding.startswith("accuracy floor")


def test_min_memory_with_loss_and_slo():
    policy = Policy("min_memory", max_loss_points=2.5, latency_slo_ms=10)
    rec = recommend(FRONT, policy, fp32_accuracy=FP32, device_memory_budget=10**9)
    assert rec.chosen.key == "int4"


def test_binding_is_what_stops_the_runner_up_on_the_objective_itself():
    # min_memory: the runner-up on memory (99 MiB) misses the SLO; a far smaller variant that
    # misses the accuracy floor is closer in accuracy + latency, but it is not the runner-up.
    chosen, runner_up, far = (
        cand("chosen", 0.890, 10, 100),
        cand("runner-up", 0.895, 40, 99),
        cand("far", 0.870, 5, 10),
    )
    policy = Policy("min_memory", max_loss_points=2.5, latency_slo_ms=20)
    rec = recommend([chosen, runner_up, far], policy, fp32_accuracy=FP32, device_memory_budget=10**9)
    assert rec.chosen is not None and rec.chosen.key == "chosen"
    assert rec.binding == "latency SLO 20 ms"


def test_an_infeasible_slo_says_whether_the_latency_was_measured_or_predicted():
    measured = Candidate("m", 0.9, 0.050, MIB, latency_source="measured")
    policy = Policy("max_accuracy", latency_slo_ms=10)
    rec = recommend([measured], policy, fp32_accuracy=FP32, device_memory_budget=10**9)
    assert "50.00 ms (measured)" in rec.infeasible["latency"]


def test_nothing_feasible_says_which_constraint_fails_and_by_how_much():
    rec = recommend(
        FRONT, Policy("max_accuracy", latency_slo_ms=5), fp32_accuracy=FP32, device_memory_budget=8 * MIB
    )
    assert rec.chosen is None and not rec.feasible
    assert "memory" in rec.infeasible and "1.0 MiB over" in rec.infeasible["memory"]
    assert "latency" in rec.infeasible and "2.00 ms over" in rec.infeasible["latency"]


def test_constraints_met_only_separately_are_explained_as_a_combination():
    rec = recommend(
        FRONT, Policy("min_latency", max_loss_points=0.05), fp32_accuracy=FP32, device_memory_budget=20 * MIB
    )
    assert rec.chosen is None
    assert set(rec.infeasible) == {"combination"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "fastest"}, "kind"),
        ({"latency_slo_ms": 0}, "latency_slo_ms"),
        ({"max_loss_points": -1}, "max_loss_points"),
        ({"accuracy_floor": 1.5}, "accuracy_floor"),
        ({"kind": "min_latency"}, "max_loss_points"),
        ({"kind": "min_memory", "max_loss_points": 1}, "latency_slo_ms"),
    ],
)
def test_a_bad_policy_names_the_field(kwargs, field):
    with pytest.raises(PlanError, match=f"policy.{field}"):
        Policy(**kwargs)


def test_a_floor_above_full_precision_and_contradictions_are_refused():
    assert "accuracy_floor" in Policy(accuracy_floor=0.95).errors(fp32_accuracy=FP32)
    assert "max_loss_points" in Policy(accuracy_floor=0.85, max_loss_points=1).errors(fp32_accuracy=FP32)
    assert Policy(accuracy_floor=0.89, max_loss_points=1).errors(fp32_accuracy=FP32) == {}


def test_policy_round_trips_and_rejects_unknown_fields():
    policy = Policy("min_latency", max_loss_points=1.0)
    assert Policy.from_dict(policy.to_dict()) == policy
    with pytest.raises(PlanError, match="unknown field"):
        Policy.from_dict({"kind": "max_accuracy", "slo": 3})
