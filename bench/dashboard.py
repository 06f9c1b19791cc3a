"""Dashboard benchmark: first chart paint of a device page with 10,000 trial points in headless
Chromium, and server time (p95) of every dashboard page at demo data size.

Seeds a private SQLite database (var/bench-dashboard) with the device catalog (13 profiles), a
model shaped like the demo model (39 tensors, a sensitivity profile), a finished planning run
over every profile (48 confirmed candidates per device, like 16 real evaluations × 3 exit
options; its Pareto variants stored with their per-device predictions) and Optuna studies of
130 trials per device — except one device whose study holds 10,000 trials. No engine runs: the
numbers are synthetic, the pages read them exactly as they read a real run. The 10,000 trials
are written straight into Optuna's tables (through Optuna's API that takes minutes).

Server time: Django's test client in this process (no network), each page requested
`--requests` times after warm-up; baseline: /health/ (a database and cache check, no template).
Chart paint: gunicorn on loopback,
Chromium navigates to the page and the chart reports the time from navigation start to the
painted frame; baseline: the roofline chart of a device page without trials.
JSON keys: chart_paint_s_10k, chart_paint_s_10k_cold, baseline_paint_s, server_p95_ms_max,
server_p95_ms (per page), baseline_server_p95_ms.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIG_TRIALS = 10_000
TRIALS_PER_DEVICE = 130
CANDIDATES_PER_DEVICE = 48
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench-dashboard")
    parser.add_argument("--requests", type=int, default=40, help="requests per page for the server p95")
    parser.add_argument("--loads", type=int, default=5, help="browser loads of the 10,000-point page")
    parser.add_argument("--trials", type=int, default=BIG_TRIALS, help="trial points on the big device page")
    parser.add_argument("--seed", type=int, default=0)


def _setup_django(workdir: Path) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    os.environ["EDGEFIT_VAR_DIR"] = str(workdir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ["CELERY_TASK_ALWAYS_EAGER"] = "false"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    call_command("load_catalog", verbosity=0, stdout=open(os.devnull, "w"))  # noqa: SIM115


def _spec() -> dict[str, Any]:
    tensors = [
        {
            "name": f"embeddings.{n}.weight",
            "kind": "embedding",
            "shape": shape,
            "block": -1,
            "macs_per_token": 0,
        }
        for n, shape in (
            ("word_embeddings", [30522, 384]),
            ("position_embeddings", [512, 384]),
            ("token_type_embeddings", [2, 384]),
        )
    ]
    for block in range(6):
        for name, shape in (
            ("attention.self.query", [384, 384]),
            ("attention.self.key", [384, 384]),
            ("attention.self.value", [384, 384]),
            ("attention.output.dense", [384, 384]),
            ("intermediate.dense", [1536, 384]),
            ("output.dense", [384, 1536]),
        ):
            tensors.append(
                {
                    "name": f"encoder.layer.{block}.{name}.weight",
                    "kind": "linear",
                    "shape": shape,
                    "block": block,
                    "macs_per_token": shape[0] * shape[1],
                }
            )
    return {
        "name": "bench-minilm",
        "tensors": tensors,
        "n_blocks": 6,
        "exit_points": [0, 1, 2, 3, 4, 5],
        "hidden_size": 384,
        "n_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
    }


def _seed(rng: random.Random, big_trials: int) -> dict[str, Any]:
    """Demo-size data (see the module docstring). Returns what the measurements need."""
    from django.contrib.auth.models import User
    from django.utils import timezone

    from devices.models import DeviceProfile
    from planner.recommend import Candidate, Policy, pareto_front, recommend
    from registry.models import BaseModel, DeviceSearch, PlanningRun, Variant
    from registry.predictions import record_run_predictions

    spec = _spec()
    names = [t["name"] for t in spec["tensors"]]
    precisions = ["fp32", "fp16", "int8", "int4", "int3", "int2"]
    losses = [[0.0, *sorted(rng.uniform(0, 0.3) * 10 ** -(5 - j) for j in range(5))] for _ in names]
    model = BaseModel.objects.create(
        name="Bench MiniLM",
        adapter="minilm-docstrings",
        spec=spec,
        fp32_metrics={"accuracy": 0.7324, "n_examples": 497},
        sensitivity={
            "model": "bench",
            "evaluator_key": "bench",
            "split": "calibration",
            "n_examples": 200,
            "group_size": 64,
            "method": "rtn",
            "symmetric": True,
            "tensors": names,
            "precisions": precisions,
            "losses": {"kl": losses, "disagreement": losses, "cosine": losses},
            "seconds": 1.0,
            "corrections": {},
            "provenance": "synthetic (bench)",
        },
    )
    profiles = list(DeviceProfile.objects.order_by("name"))
    # 16 weight plans × 3 exit options = 48 candidates, as a real run confirms
    plans: list[dict[str, Any]] = []
    for i in range(CANDIDATES_PER_DEVICE):
        mix = [rng.choice(["int8", "int4", "int8", "fp16"]) for _ in names]
        exit_threshold = None if i % 3 == 0 else round(rng.uniform(0.6, 0.95), 2)
        plans.append(
            {
                "plan": {
                    "schemes": {
                        n: {"precision": p, "group_size": None, "symmetric": True, "method": "rtn"}
                        for n, p in zip(names, mix, strict=True)
                        if p != "fp32"
                    },
                    "exit_threshold": exit_threshold,
                },
                "key": f"bench{i:011d}",
                "accuracy": round(0.7324 - rng.uniform(0, 0.05), 4),
                "weight_bytes": int(rng.uniform(12, 45) * MIB),
                "label": f"mix {i}" + (f", exit ≥ {exit_threshold:.2f}" if exit_threshold else ""),
                "speed": rng.uniform(0.5, 1.0),
            }
        )
    run = PlanningRun.objects.create(
        base_model=model,
        policy={"kind": "max_accuracy", "latency_slo_ms": 50},
        trials_per_device=TRIALS_PER_DEVICE,
        real_eval_budget=16,
        trials_planned=TRIALS_PER_DEVICE * len(profiles),
        trials_done=TRIALS_PER_DEVICE * len(profiles),
        real_evaluations=16,
        status=PlanningRun.Status.DONE,
        stage="done",
        finished_at=timezone.now(),
    )
    run.device_profiles.set(profiles)
    devices: dict[str, Any] = {}
    stored: dict[str, int] = {}
    policy = Policy.from_dict(run.policy)
    for profile in profiles:
        scale = 400 / max(profile.bandwidth_gbs, 1)
        candidates = [
            {
                "key": p["key"],
                "accuracy": p["accuracy"],
                "latency_s": scale * p["speed"] * p["weight_bytes"] / (40 * MIB) / 1000 * 8,
                "memory_bytes": p["weight_bytes"] + 30 * MIB,
                "accuracy_source": "measured",
                "latency_source": "predicted",
                "label": p["label"],
                "extra": {
                    "plan": p["plan"],
                    "weight_bytes": p["weight_bytes"],
                    "exit_threshold": p["plan"]["exit_threshold"],
                    "unsupported_precisions": [],
                    "provenance": f"run {run.pk}",
                },
            }
            for p in plans
        ]
        objs = [
            Candidate(c["key"], c["accuracy"], c["latency_s"], c["memory_bytes"], label=c["label"])
            for c in candidates
        ]
        rec = recommend(objs, policy, fp32_accuracy=0.7324, device_memory_budget=profile.ram_budget_bytes)
        front = pareto_front(objs)
        for c in front:
            if c.key not in stored:
                p = next(q for q in plans if q["key"] == c.key)
                stored[c.key] = Variant.objects.create(
                    base_model=model,
                    name=p["label"],
                    plan=p["plan"],
                    plan_hash=p["key"],
                    weight_bytes=p["weight_bytes"],
                    metrics={
                        "accuracy": p["accuracy"],
                        "exit_threshold": p["plan"]["exit_threshold"],
                        "mean_layers": 4.5,
                        "exit_fraction": [0.1, 0.1, 0.2, 0.1, 0.1, 0.4],
                    },
                    metrics_source="measured",
                    provenance=f"run {run.pk}; synthetic (bench)",
                ).pk
        front_keys = {c.key for c in front}
        devices[str(profile.pk)] = {
            "device_profile": profile.pk,
            "device": profile.name,
            "front": [
                dict(c, latency_ms=c["latency_s"] * 1000) for c in candidates if c["key"] in front_keys
            ],
            "candidates": candidates,
            "estimated_front": [],
            "recommendation": {
                **rec.to_dict(),
                "variant": stored.get(rec.chosen.key) if rec.chosen else None,
            },
            "hypervolume": 1.0,
        }
        DeviceSearch.objects.create(
            run=run, device_profile=profile, status="done", trials_done=TRIALS_PER_DEVICE
        )
    run.result = {"devices": devices}
    run.save(update_fields=["result"])
    record_run_predictions(run)
    for profile in profiles:
        _seed_study(rng, run.pk, profile.pk, TRIALS_PER_DEVICE)
    # A later run for one device with a 10,000-trial study: that device's page shows it, the
    # demo run's pages keep their demo size.
    big = profiles[0]
    big_run = PlanningRun.objects.create(
        base_model=model,
        policy=run.policy,
        trials_per_device=big_trials,
        real_eval_budget=16,
        trials_planned=big_trials,
        trials_done=big_trials,
        real_evaluations=16,
        status=PlanningRun.Status.DONE,
        stage="done",
        result={"devices": {str(big.pk): devices[str(big.pk)]}},
        finished_at=timezone.now(),
    )
    big_run.device_profiles.set([big])
    DeviceSearch.objects.create(run=big_run, device_profile=big, status="done", trials_done=big_trials)
    _seed_study(rng, big_run.pk, big.pk, big_trials)
    empty = DeviceProfile.objects.create(
        name="Bench empty device",
        vendor="Bench",
        kind="board",
        ram_total_bytes=4 * 2**30,
        ram_budget_bytes=2**30,
        bandwidth_gbs=10,
        fp32_tflops=0.1,
        weight_formats=["fp32"],
        activation_formats=["fp32"],
        sources={
            "ram_total_bytes": "derived: bench",
            "ram_budget_bytes": "derived: bench",
            "bandwidth_gbs": "derived: bench",
            "fp32_tflops": "derived: bench",
        },
    )
    User.objects.create_user("bench", password="bench-password", is_staff=True)
    variant_id = next(iter(stored.values()))
    return {
        "model": model,
        "big": big,
        "empty": empty,
        "variant": variant_id,
        "run": run,
        "big_run": big_run,
        "profiles": profiles,
    }


def _seed_study(rng: random.Random, run_id: int, device_id: int, n: int) -> None:
    """An Optuna study with `n` complete trials (accuracy, latency ms, memory MiB, constraints),
    created through Optuna, its trials bulk-inserted into Optuna's own tables."""
    import optuna
    from sqlalchemy import text

    from registry.fleet import _storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage()
    study = optuna.create_study(
        study_name=f"edgefit-run-{run_id}-device-{device_id}",
        storage=storage,
        directions=["maximize", "minimize", "minimize"],
    )
    study_id = study._study_id
    with storage.engine.begin() as conn:
        first = conn.execute(text("SELECT COALESCE(MAX(trial_id), 0) FROM trials")).scalar() or 0
        now = "2026-01-01 00:00:00.000000"
        trials, values, attrs = [], [], []
        for i in range(n):
            trial_id = first + 1 + i
            latency = rng.uniform(5, 120)
            memory = rng.uniform(40, 120)
            accuracy = 0.7324 - rng.uniform(0, 0.1) * (30 / latency) ** 0.3
            trials.append({"id": trial_id, "n": i, "s": study_id, "t": now})
            for objective, value in enumerate((accuracy, latency, memory)):
                values.append({"t": trial_id, "o": objective, "v": value})
            attrs.append({"t": trial_id, "k": "constraints:latency", "v": str(latency - 100)})
            attrs.append({"t": trial_id, "k": "constraints:memory", "v": "-1.0"})
        conn.execute(
            text(
                "INSERT INTO trials (trial_id, number, study_id, state, datetime_start, datetime_complete) "
                "VALUES (:id, :n, :s, 'COMPLETE', :t, :t)"
            ),
            trials,
        )
        conn.execute(
            text(
                "INSERT INTO trial_values (trial_id, objective, value, value_type) "
                "VALUES (:t, :o, :v, 'FINITE')"
            ),
            values,
        )
        conn.execute(
            text("INSERT INTO trial_system_attributes (trial_id, key, value_json) VALUES (:t, :k, :v)"), attrs
        )


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _server_times(pages: dict[str, str], requests: int) -> dict[str, float]:
    from django.test import Client

    client = Client()
    client.login(username="bench", password="bench-password")
    out: dict[str, float] = {}
    for name, url in pages.items():
        for _ in range(3):  # warm-up: first-use imports and the run caches
            assert client.get(url).status_code == 200, url
        samples = []
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get(url)
            samples.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, url
        out[name] = _p95(samples)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _paint_times(workdir: Path, big_url: str, empty_url: str, chart_id: str, loads: int) -> dict[str, Any]:
    port = _free_port()
    env = dict(os.environ)
    env["EDGEFIT_VAR_DIR"] = str(workdir)
    env["DJANGO_ALLOWED_HOSTS"] = "127.0.0.1,localhost"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "config.asgi",
            "--worker-class",
            "asgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("bench dashboard: gunicorn did not start") from None
                time.sleep(0.3)
        return _browser(base, big_url, empty_url, chart_id, loads)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def _browser(base: str, big_url: str, empty_url: str, chart_id: str, loads: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--enable-unsafe-swiftshader",  # software WebGL for scattergl without a GPU
    ]
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=flags, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()

        def on_console(message: Any) -> None:
            if message.type == "error":
                errors.append(message.text)

        page.on("console", on_console)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/login/")
        page.fill("input[name=username]", "bench")
        page.fill("input[name=password]", "bench-password")
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")

        def paint(url: str, chart: str) -> float:
            page.goto(f"{base}{url}")
            page.wait_for_selector(f"#chart-{chart}[data-painted-ms]", timeout=60_000)
            return float(page.get_attribute(f"#chart-{chart}", "data-painted-ms") or "nan") / 1000

        cold = paint(big_url, chart_id)
        warm = [paint(big_url, chart_id) for _ in range(loads)]
        points = page.evaluate(
            f"document.getElementById('chart-{chart_id}').data"
            ".reduce((n, t) => n + (t.x ? t.x.length : 0), 0)"
        )
        gl = page.evaluate(
            f"document.getElementById('chart-{chart_id}').data.filter(t => t.type === 'scattergl').length"
        )
        baseline = [paint(empty_url, "roofline") for _ in range(loads)]
        browser.close()
    return {
        "cold": cold,
        "warm": statistics.median(warm),
        "baseline": statistics.median(baseline),
        "points": points,
        "webgl_traces": gl,
        "errors": errors,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    _setup_django(args.workdir)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    seeded = _seed(rng, args.trials)
    print(
        f"seeded in {time.perf_counter() - started:.1f} s: 13 catalog devices × "
        f"{CANDIDATES_PER_DEVICE} candidates, "
        f"{TRIALS_PER_DEVICE} trials per device, {args.trials:,} on {seeded['big'].name}"
    )
    model, big, empty = seeded["model"], seeded["big"], seeded["empty"]
    pages = {
        "overview": "/overview/",
        "models": "/models/",
        "model": f"/models/{model.slug}/",
        "model_filtered": f"/models/{model.slug}/?device={big.slug}&sort=-accuracy",
        "variant": f"/variants/{seeded['variant']}/",
        "device": f"/devices/{seeded['profiles'][1].slug}/",
        "devices": "/devices/",
        "compare": f"/compare/?model={model.slug}&devices={big.slug},{seeded['profiles'][1].slug}",
        "plans": "/plans/",
        "plan": f"/plans/{seeded['run'].pk}/",
        "releases": "/releases/",
    }
    server = _server_times({"baseline_health": "/health/", **pages}, args.requests)
    baseline_ms = server.pop("baseline_health")
    big_pages = {"device_10k": f"/devices/{big.slug}/", "plan_10k": f"/plans/{seeded['big_run'].pk}/"}
    heavy = _server_times(big_pages, args.requests)
    print(
        f"\nserver time p95 over {args.requests} requests (Django test client, in process); "
        f"baseline: /health/ {baseline_ms:.1f} ms"
    )
    print(f"{'page':<18}{'p95 ms':>10}{'× baseline':>12}   target ≤ 200 ms")
    for name, value in server.items():
        print(f"{name:<18}{value:>10.1f}{value / baseline_ms:>12.1f}   {'ok' if value <= 200 else 'MISSED'}")
    print(f"beyond demo size ({args.trials:,} trials on one device):")
    for name, value in heavy.items():
        print(f"{name:<18}{value:>10.1f}{value / baseline_ms:>12.1f}")
    chart_id = f"front-{model.pk}"
    paint = _paint_times(
        args.workdir, big_pages["device_10k"], f"/devices/{empty.slug}/", chart_id, args.loads
    )
    print(
        f"\nfirst chart paint, headless Chromium, navigation start → painted frame "
        f"({paint['points']:,} points, {paint['webgl_traces']} WebGL traces)"
    )
    print(
        f"  device page, {args.trials:,} trials: {paint['warm']:.2f} s median of {args.loads} loads "
        f"(cold server cache: {paint['cold']:.2f} s); target ≤ 1.5 s"
    )
    print(
        f"  baseline (roofline of a device without trials): {paint['baseline']:.2f} s "
        f"→ ratio {paint['warm'] / paint['baseline']:.2f}×"
    )
    if paint["errors"]:
        print(f"  console errors: {paint['errors'][:3]}")
    return {
        "chart_paint_s_10k": round(paint["warm"], 3),
        "chart_paint_s_10k_cold": round(paint["cold"], 3),
        "baseline_paint_s": round(paint["baseline"], 3),
        "chart_paint_ratio": round(paint["warm"] / paint["baseline"], 2),
        "chart_points": paint["points"],
        "server_p95_ms_max": round(max(server.values()), 1),
        "server_p95_ms": {k: round(v, 1) for k, v in server.items()},
        "baseline_server_p95_ms": round(baseline_ms, 1),
        "server_p95_ms_10k": {k: round(v, 1) for k, v in heavy.items()},
        "console_errors": len(paint["errors"]),
    }
