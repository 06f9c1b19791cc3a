"""Factories for dashboard tests: models, variants and finished planning runs without the engine.

`finished_run` writes a run result in the shape `registry.fleet` produces (candidates with
their plan, the Pareto front, the recommendation computed by `planner.recommend`), so pages read
it exactly as they read a real run's.
"""

from __future__ import annotations

import itertools
from typing import Any

from django.utils import timezone

from devices.models import DeviceProfile
from planner.recommend import Candidate, Policy, pareto_front, recommend
from registry.models import BaseModel, PlanningRun, Variant
from registry.predictions import UNSUPPORTED_MEMORY, record_run_predictions
from tests.devices.factories import profile_payload

MIB = 2**20
_counter = itertools.count(1)

TENSORS = [
    {
        "name": "embeddings.word_embeddings.weight",
        "kind": "embedding",
        "shape": [64, 16],
        "block": -1,
        "macs_per_token": 0,
    },
    {
        "name": "encoder.layer.0.attention.self.query.weight",
        "kind": "linear",
        "shape": [16, 16],
        "block": 0,
        "macs_per_token": 256,
    },
    {
        "name": "encoder.layer.0.intermediate.dense.weight",
        "kind": "linear",
        "shape": [32, 16],
        "block": 0,
        "macs_per_token": 512,
    },
    {
        "name": "encoder.layer.1.attention.self.query.weight",
        "kind": "linear",
        "shape": [16, 16],
        "block": 1,
        "macs_per_token": 256,
    },
    {
        "name": "encoder.layer.1.intermediate.dense.weight",
        "kind": "linear",
        "shape": [32, 16],
        "block": 1,
        "macs_per_token": 512,
    },
]


def make_profile(name: str, **overrides: Any) -> DeviceProfile:
    return DeviceProfile.objects.create(**profile_payload(name=name, **overrides))


def make_model(name: str = "Demo encoder", *, fp32: float = 0.80, sensitivity: bool = True) -> BaseModel:
    precisions = ["fp32", "fp16", "int8", "int4", "int2"]
    sens = None
    if sensitivity:
        losses = [
            [0.0, 1e-5 * (i + 1), 1e-4 * (i + 1), 1e-2 * (i + 1), 0.2 * (i + 1)] for i in range(len(TENSORS))
        ]
        sens = {
            "model": name,
            "evaluator_key": "k",
            "split": "calibration",
            "n_examples": 200,
            "group_size": 64,
            "method": "rtn",
            "symmetric": True,
            "tensors": [t["name"] for t in TENSORS],
            "precisions": precisions,
            "losses": {"kl": losses, "disagreement": losses, "cosine": losses},
            "seconds": 1.0,
            "corrections": {},
            "provenance": "profiled on host test",
        }
    return BaseModel.objects.create(
        name=name,
        adapter="tiny-topics",
        spec={
            "name": name,
            "tensors": TENSORS,
            "n_blocks": 2,
            "exit_points": [0, 1],
            "hidden_size": 16,
            "n_heads": 2,
            "intermediate_size": 32,
            "vocab_size": 64,
        },
        fp32_metrics={"accuracy": fp32, "n_examples": 100},
        sensitivity=sens,
    )


def plan_for(precisions: list[str], exit_threshold: float | None = None) -> dict[str, Any]:
    schemes = {
        t["name"]: {"precision": p, "group_size": None, "symmetric": True, "method": "rtn"}
        for t, p in zip(TENSORS, precisions, strict=False)
        if p != "fp32"
    }
    return {"schemes": schemes, "exit_threshold": exit_threshold}


def make_variant(
    model: BaseModel,
    *,
    accuracy: float,
    weight_bytes: int = 4 * MIB,
    precisions: list[str] | None = None,
    exit_threshold: float | None = None,
    name: str | None = None,
    source: str = "measured",
    provenance: str = "run 1, trial 3; measured on host test",
    exit_fraction: list[float] | None = None,
) -> Variant:
    n = next(_counter)
    metrics: dict[str, Any] = {
        "accuracy": accuracy,
        "agreement": 0.95,
        "mean_layers": 2.0,
        "exit_threshold": exit_threshold,
    }
    if exit_fraction is not None:
        metrics["exit_fraction"] = exit_fraction
    return Variant.objects.create(
        base_model=model,
        name=name or f"variant {n}",
        plan=plan_for(precisions or ["int8"] * len(TENSORS), exit_threshold),
        plan_hash=f"h{n:015d}",
        weight_bytes=weight_bytes,
        metrics=metrics,
        metrics_source=source,
        provenance=provenance,
    )


def candidate(
    variant: Variant, *, latency_ms: float, memory_mib: float, unsupported: bool = False
) -> dict[str, Any]:
    """A run-result candidate for `variant` on one device, as registry.fleet writes it."""
    return {
        "key": variant.plan_hash,
        "accuracy": variant.metrics["accuracy"],
        "latency_s": latency_ms / 1000,
        "memory_bytes": UNSUPPORTED_MEMORY if unsupported else int(memory_mib * MIB),
        "accuracy_source": "measured",
        "latency_source": "predicted",
        "label": variant.name,
        "extra": {
            "plan": variant.plan,
            "weight_bytes": variant.weight_bytes,
            "exit_threshold": variant.metrics.get("exit_threshold"),
            "unsupported_precisions": ["int4"] if unsupported else [],
            "provenance": variant.provenance,
        },
    }


def finished_run(
    model: BaseModel,
    per_device: dict[DeviceProfile, list[dict[str, Any]]],
    *,
    policy: dict[str, Any] | None = None,
    infeasible_reason: str = "",
    finished_at: Any = None,
    record: bool = True,
) -> PlanningRun:
    """A DONE run whose result holds `per_device` candidates; devices with an empty list get
    the 'nothing fitted' explanation."""
    policy = policy or {"kind": "max_accuracy"}
    run = PlanningRun.objects.create(
        base_model=model,
        policy=policy,
        trials_per_device=10,
        real_eval_budget=2,
        trials_planned=10 * len(per_device),
        trials_done=10 * len(per_device),
        status=PlanningRun.Status.DONE,
        stage="done",
        finished_at=finished_at or timezone.now(),
    )
    run.device_profiles.set(list(per_device))
    fp32 = float(model.fp32_metrics["accuracy"])
    devices: dict[str, Any] = {}
    for profile, candidates in per_device.items():
        usable = [
            Candidate(c["key"], c["accuracy"], c["latency_s"], c["memory_bytes"], label=c["label"])
            for c in candidates
            if not c["extra"]["unsupported_precisions"]
        ]
        rec = recommend(
            usable,
            Policy.from_dict(policy),
            fp32_accuracy=fp32,
            device_memory_budget=profile.ram_budget_bytes,
        )
        front = {c.key for c in pareto_front(usable)}
        rec_dict = rec.to_dict()
        if not candidates:
            rec_dict["reason"] = (
                infeasible_reason or "no variant is feasible: memory: smallest variant needs 40.0 MiB"
            )
            rec_dict["infeasible"] = {
                "memory": "smallest variant needs 40.0 MiB, budget is 1.0 MiB (39.0 MiB over)"
            }
        devices[str(profile.pk)] = {
            "device_profile": profile.pk,
            "device": profile.name,
            "front": [dict(c, latency_ms=c["latency_s"] * 1000) for c in candidates if c["key"] in front],
            "candidates": candidates,
            "estimated_front": [],
            "recommendation": {**rec_dict, "variant": None},
            "hypervolume": 1.0,
        }
    run.result = {"devices": devices}
    run.save(update_fields=["result"])
    if record:
        record_run_predictions(run)
    return run


def demo_fleet() -> dict[str, Any]:
    """Three devices (phone 50 % of the fleet, board 30 %, watch 20 % where nothing fits), one
    model (FP32 80 %) with four variants, one finished run.

    Coverage within 1 point under 50 ms: phone (full, 40 ms) and board (exit, 45 ms) → 80 %;
    under 30 ms: phone only (mid, 20 ms) → 50 %."""
    phone = make_profile("Phone A", fleet_share=0.5)
    board = make_profile("Board B", fleet_share=0.3, weight_formats=["fp32", "int8"], int4_tops=None)
    watch = make_profile("Watch C", fleet_share=0.2, ram_total_bytes=8 * MIB, ram_budget_bytes=1 * MIB)
    model = make_model()
    full = make_variant(model, accuracy=0.80, weight_bytes=8 * MIB, precisions=["int8"] * 5, name="all int8")
    mid = make_variant(
        model,
        accuracy=0.795,
        weight_bytes=5 * MIB,
        precisions=["int8", "int4", "int8", "int4", "int8"],
        name="mixed 4/8",
    )
    small = make_variant(model, accuracy=0.76, weight_bytes=3 * MIB, precisions=["int4"] * 5, name="all int4")
    exit_v = make_variant(
        model,
        accuracy=0.792,
        weight_bytes=8 * MIB,
        precisions=["int8"] * 5,
        exit_threshold=0.9,
        name="all int8, exit ≥ 0.90",
        exit_fraction=[0.4, 0.6],
    )
    run = finished_run(
        model,
        {
            phone: [
                candidate(full, latency_ms=40, memory_mib=40),
                candidate(mid, latency_ms=20, memory_mib=30),
                candidate(small, latency_ms=10, memory_mib=20),
                candidate(exit_v, latency_ms=15, memory_mib=40),
            ],
            board: [
                candidate(full, latency_ms=120, memory_mib=40),
                candidate(mid, latency_ms=60, memory_mib=30, unsupported=True),
                candidate(small, latency_ms=30, memory_mib=20, unsupported=True),
                candidate(exit_v, latency_ms=45, memory_mib=40),
            ],
            watch: [],
        },
        policy={"kind": "max_accuracy"},
    )
    return {
        "phone": phone,
        "board": board,
        "watch": watch,
        "model": model,
        "full": full,
        "mid": mid,
        "small": small,
        "exit": exit_v,
        "run": run,
    }
