"""Fleet planning benchmark: a full planning run of the demo model for ≥ 8 catalog devices.

Prints the wall time of the run, its real evaluations and, per device, the hypervolume its
measured front reaches as a share of a dense reference front (20,000 plans scored by the
sensitivity proxy and the cost model, whose per-device fronts are confirmed by real
evaluation); then random search given the same real-evaluation budget, and how many real
evaluations random search needs to reach our hypervolume.

The timed run uses a fresh engine cache (only the trained exit heads and the stored sensitivity
profile are reused, and the output says so), so every real evaluation in it really runs.
JSON keys: fleet_plan_seconds, devices, real_evaluations, min_hypervolume_ratio,
random_min_hypervolume_ratio, evals_ratio_vs_random.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEVICES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--devices", type=int, default=DEFAULT_DEVICES, help="catalog devices to plan for (≥ 8)"
    )
    parser.add_argument("--trials", type=int, default=130, help="Optuna trials per device")
    parser.add_argument("--real-evals", type=int, default=16, help="real-evaluation budget of the run")
    parser.add_argument("--reference-plans", type=int, default=20_000)
    parser.add_argument(
        "--reference-confirm", type=int, default=5, help="reference front points confirmed per device"
    )
    parser.add_argument(
        "--random-max-factor", type=int, default=4, help="random search tries up to this × our evals"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench-search")


def _setup_django(workdir: Path) -> None:
    """A private SQLite database for the benchmark; engine caches shared with the product."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    os.environ.pop("DATABASE_URL", None)
    os.environ["EDGEFIT_VAR_DIR"] = str(workdir)
    os.environ.setdefault("EDGEFIT_DATA_DIR", str(ROOT / "var" / "engine"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ["CELERY_TASK_ALWAYS_EAGER"] = "false"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    call_command("load_catalog", verbosity=0, stdout=open(os.devnull, "w"))  # noqa: SIM115


def _fresh_engine_dir(shared: Path, fresh: Path) -> list[str]:
    """Copy what the timed run may reuse (trained heads, their features, stored sensitivity)."""
    reused = []
    for sub in ("heads", "features", "sensitivity"):
        if (shared / sub).is_dir():
            shutil.copytree(shared / sub, fresh / sub)
            reused.append(sub)
    return reused


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.devices < 8:
        raise SystemExit("--devices: the benchmark plans for at least 8 devices")
    _setup_django(args.workdir)
    from django.conf import settings
    from django.test.utils import override_settings

    from devices.models import DeviceProfile
    from registry import fleet
    from registry.engine import compute_sensitivity, register_bundle
    from registry.planning import create_run

    shared = Path(settings.ENGINE_DATA_DIR)
    print("preparing: registering the demo model, sensitivity profile (stored profile reused when present)")
    t0 = time.perf_counter()
    model = register_bundle("minilm-docstrings")
    profile_cached = (
        any((shared / "sensitivity").glob("*.json")) if (shared / "sensitivity").is_dir() else False
    )
    compute_sensitivity(model)
    model.refresh_from_db()
    print(
        f"  sensitivity profile: {'reused from the stored profile' if profile_cached else 'measured now'}"
        f" ({time.perf_counter() - t0:.0f} s)"
    )
    profiles = list(DeviceProfile.objects.order_by("-fleet_share", "name")[: args.devices])

    fresh = args.workdir / "engine-timed"
    fresh.mkdir()
    reused = _fresh_engine_dir(shared, fresh)
    with override_settings(ENGINE_DATA_DIR=fresh):
        run_obj = create_run(
            base_model=model,
            device_profiles=profiles,
            policy={"kind": "max_accuracy"},
            trials_per_device=args.trials,
            real_eval_budget=args.real_evals,
            seed=args.seed,
        )
        started = time.perf_counter()
        searches, _ = fleet.start_run(run_obj.pk)
        for search_id in searches:
            fleet.search_device(search_id)
        fleet.confirm_run(run_obj.pk)
        fleet_seconds = time.perf_counter() - started
    run_obj.refresh_from_db()
    if run_obj.status != "done":
        raise SystemExit(f"the planning run ended {run_obj.status}: {run_obj.error[-2000:]}")
    print(
        f"fleet plan: {len(profiles)} devices × {args.trials} trials, "
        f"{run_obj.real_evaluations} real evaluations, {fleet_seconds:.1f} s wall "
        f"(reused: {', '.join(reused) or 'nothing'}; evaluations ran afresh)"
    )
    return _compare(args, model, profiles, run_obj, fleet_seconds)


def _compare(
    args: argparse.Namespace, model: Any, profiles: list[Any], run_obj: Any, fleet_seconds: float
) -> dict[str, Any]:
    """Reference fronts and random search, scored with the same hypervolume per device."""
    from planner.cost import predict
    from planner.recommend import Candidate
    from planner.search import hypervolume, scheme_for, spread
    from planner.specs import ModelSpec, Plan
    from registry import fleet
    from registry.engine import bundle_for, sensitivity_of
    from registry.fleet import device_target, hypervolume_reference

    spec = ModelSpec.from_dict(model.spec)
    profile = sensitivity_of(model)
    assert profile is not None
    evaluator = bundle_for(model).evaluator
    rng = np.random.default_rng(args.seed + 1)
    names = spec.tensor_names
    precisions = ("fp32", "fp16", "int8", "int4", "int3", "int2")
    groups = (64, 128)

    # 20,000 plans: per-tensor precisions drawn from a Dirichlet mix per plan, spanning mild to severe.
    t0 = time.perf_counter()
    mix = rng.dirichlet(np.full(len(precisions), 0.5), size=args.reference_plans)
    idx = np.array([rng.choice(len(precisions), size=len(names), p=m) for m in mix])
    group_of = rng.integers(0, len(groups), size=args.reference_plans)
    col = [profile.precisions.index(p) for p in precisions]
    disagreement = profile.estimate_many(np.array(col)[idx], "disagreement")
    fp32_acc = float(model.fp32_metrics["accuracy"])
    est_acc = np.maximum(0.0, fp32_acc - disagreement)

    def plan_of(row: np.ndarray, group: int) -> Plan:
        return Plan.build(
            {n: scheme_for(precisions[c], group, "rtn", spec, n) for n, c in zip(names, row, strict=True)}
        )

    # Latency and memory are additive per tensor in the roofline at full depth: tabulate each
    # (tensor, precision, group) once per device, then score all plans with one gather.
    results: dict[str, Any] = {"devices": len(profiles)}
    ratios, random_ratios, evals_needed = [], [], []
    run_result = run_obj.result["devices"]
    # Random search draws from the precisions every planned device runs (so each of its plans
    # counts on every device) with the same group-size choice.
    common = [p for p in precisions if all(device_target(run_obj, d).supports(p) for d in profiles)]
    common_idx = np.array([precisions.index(p) for p in common])
    random_plans: list[Plan] = []
    max_random = args.random_max_factor * max(1, run_obj.real_evaluations)
    for _ in range(max_random):
        device_row = common_idx[rng.integers(0, len(common_idx), size=len(names))]
        random_plans.append(plan_of(device_row, groups[int(rng.integers(0, len(groups)))]))
    measured: dict[str, list[tuple[Plan, float, list[float] | None]]] = {}
    # Where each confirmed plan's figures came from: a plan an earlier run (of this bench or the
    # product) evaluated comes back from the output cache on disk, and the "scored in" time then
    # leaves its passes out; one the fleet run above evaluated is in memory.
    sources = {"run": 0, "disk": 0, "memory": 0}

    def options_of(plan: Plan) -> list[tuple[Plan, float, list[float] | None]]:
        """The plan and its early-exit variants, exactly as a planning run derives them
        (thresholds chosen on calibration, figures measured on test), so baselines and our
        run are compared on the same footing."""
        key = plan.weights_key()
        if key not in measured:
            passes, disk_hits = evaluator.stats.passes, evaluator.stats.output_disk_hits
            rows = []
            for bound in fleet.EXIT_LOSS_BOUNDS:
                chosen = plan if bound is None else evaluator.with_calibrated_exit(plan, bound)[0]
                if bound is not None and chosen.exit_threshold is None:
                    continue
                result = evaluator.evaluate(chosen, "test")
                rows.append(
                    (chosen, result.accuracy, list(result.exit_fraction) if bound is not None else None)
                )
            measured[key] = rows
            if evaluator.stats.passes > passes:
                sources["run"] += 1
            else:
                sources["disk" if evaluator.stats.output_disk_hits > disk_hits else "memory"] += 1
        return measured[key]

    print(
        f"\n{'device':48} {'ours HV':>9} {'ref HV':>9} {'ratio':>7} {'random HV':>10} {'ratio':>7} "
        f"{'random evals to match':>22}"
    )
    for device in profiles:
        target = device_target(run_obj, device)
        base = predict(spec, Plan(), target.device, seq_len=64)
        table = np.zeros((len(groups), len(names), len(precisions)))
        bytes_table = np.zeros((len(groups), len(names), len(precisions)))
        for g, group in enumerate(groups):
            for t, name in enumerate(names):
                for p, precision in enumerate(precisions):
                    single = Plan.build({name: scheme_for(precision, group, "rtn", spec, name)})
                    cost = predict(spec, single, target.device, seq_len=64)
                    table[g, t, p] = cost.latency_s - base.latency_s
                    bytes_table[g, t, p] = cost.memory_bytes - base.memory_bytes
        rows = np.arange(len(names))[None, :]
        latency = base.latency_s + table[group_of[:, None], rows, idx].sum(1)
        memory = base.memory_bytes + bytes_table[group_of[:, None], rows, idx].sum(1)
        supported = np.array([target.supports(p) for p in precisions])
        ok = supported[idx].all(1) & (memory <= target.budget)
        points = np.stack([-est_acc, latency, memory], 1)
        front_idx = [
            i
            for i in np.flatnonzero(ok)
            if not np.any(np.all(points[ok] <= points[i], 1) & np.any(points[ok] < points[i], 1))
        ]
        front_idx = sorted(front_idx, key=lambda i: latency[i])
        confirm = spread(front_idx, args.reference_confirm)
        floor, cap, memory_cap = hypervolume_reference(run_obj, device)

        def candidates_for(plans: list[Plan], target: Any = target) -> list[Candidate]:
            out = []
            for plan in plans:
                if not all(target.supports(s.precision) for _, s in plan.schemes):
                    continue
                for variant, accuracy, exits in options_of(plan):
                    cost = predict(spec, variant, target.device, seq_len=64, exit_probs=exits)
                    if cost.memory_bytes <= target.budget:
                        out.append(Candidate(variant.hash(), accuracy, cost.latency_s, cost.memory_bytes))
            return out

        ours_front = [
            Candidate(c["key"], c["accuracy"], c["latency_s"], c["memory_bytes"])
            for c in run_result[str(device.pk)]["front"]
        ]
        ours = hypervolume(ours_front, accuracy_floor=floor, latency_cap_s=cap, memory_cap_bytes=memory_cap)
        reference_plans = [plan_of(idx[i], groups[group_of[i]]) for i in confirm]
        reference_candidates = candidates_for(reference_plans)
        # The dense reference also includes uniform baselines, so no easy point is missing from it.
        uniform = [Plan.uniform(spec, scheme_for(p, 64, "rtn", spec, names[-1])) for p in precisions]
        reference_candidates += candidates_for(
            [u for u in uniform if all(target.supports(s.precision) for _, s in u.schemes)]
        )
        reference = hypervolume(
            reference_candidates, accuracy_floor=floor, latency_cap_s=cap, memory_cap_bytes=memory_cap
        )
        ratio = ours / reference if reference > 0 else float("inf")
        budget = max(1, run_obj.real_evaluations)
        random_hv = []
        needed = None
        pool: list[Candidate] = []
        for k, plan in enumerate(random_plans, start=1):
            pool += candidates_for([plan])
            hv = hypervolume(pool, accuracy_floor=floor, latency_cap_s=cap, memory_cap_bytes=memory_cap)
            random_hv.append(hv)
            if needed is None and hv >= ours:
                needed = k
        random_at_budget = random_hv[min(budget, len(random_hv)) - 1]
        random_ratio = random_at_budget / reference if reference > 0 else 0.0
        ratios.append(ratio)
        random_ratios.append(random_ratio)
        evals_needed.append(needed if needed is not None else len(random_plans) + 1)
        needed_text = f"{needed}" if needed is not None else f"> {len(random_plans)}"
        print(
            f"{device.name[:48]:48} {ours:9.4f} {reference:9.4f} {ratio:7.2f} {random_at_budget:10.4f} "
            f"{random_ratio:7.2f} {needed_text:>22}"
        )
    print(
        f"\nreference fronts: {args.reference_plans} plans scored in {time.perf_counter() - t0:.0f} s "
        f"(accuracy estimated by the proxy, latency/memory predicted); "
        f"{len(measured)} plans confirmed by real evaluation ({sources['run']} evaluated here, "
        f"{sources['disk']} read from an earlier run's output cache, {sources['memory']} already "
        "evaluated by the fleet run above)"
    )
    our_evals = max(1, run_obj.real_evaluations)
    ratio_vs_random = min(evals_needed) / our_evals
    results.update(
        fleet_plan_seconds=round(fleet_seconds, 1),
        real_evaluations=run_obj.real_evaluations,
        min_hypervolume_ratio=round(min(ratios), 4),
        random_min_hypervolume_ratio=round(min(random_ratios), 4),
        evals_ratio_vs_random=round(ratio_vs_random, 2),
    )
    print(
        f"\nfleet plan {fleet_seconds:.1f} s for {len(profiles)} devices (target ≤ 300 s); "
        f"min hypervolume ratio {min(ratios):.3f} (target ≥ 0.95); random search with the same "
        f"{our_evals} real evaluations: {min(random_ratios):.3f}; random needs ≥ {ratio_vs_random:.1f}× our "
        f"real evaluations to match (target ≥ 3×; capped at {args.random_max_factor}× tried)"
    )
    return results
