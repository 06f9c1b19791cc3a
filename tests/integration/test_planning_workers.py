"""Planning runs on real Celery worker processes, PostgreSQL (Django + Optuna) and Redis.

Each test plans the tiny bundle so a run takes seconds, then breaks something real: a worker
killed with SIGKILL, two workers sharing a run, Redis restarted mid-run.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from devices.models import DeviceProfile
from registry import fleet
from registry.models import DeviceSearch, PlanningRun, RealEvaluation
from registry.planning import create_run
from tests.devices.factories import profile_payload

pytestmark = pytest.mark.integration
STALE = "3"


@pytest.fixture
def tiny_model(transactional_db, settings, tmp_path: Path):
    from registry.engine import compute_sensitivity, register_bundle

    settings.ENGINE_DATA_DIR = tmp_path / "engine"
    settings.OPTUNA_STORAGE_URL = ""  # the project database (PostgreSQL here), as in production
    model = register_bundle("tiny-topics")
    compute_sensitivity(model)
    model.refresh_from_db()
    yield model
    # Optuna's engines hold pooled connections to the test database: close them so it can be dropped.
    fleet.dispose_storages()


def _devices(n: int) -> list[DeviceProfile]:
    return [DeviceProfile.objects.create(**profile_payload(name=f"device {i}")) for i in range(n)]


def _wait(predicate: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; worker logs:\n{logs()[-4000:]}")


def _run(pk: int) -> PlanningRun:
    return PlanningRun.objects.get(pk=pk)


def _complete_trials(run: PlanningRun) -> dict[int, int]:
    counts = {}
    for search in DeviceSearch.objects.filter(run=run):
        study = optuna.load_study(study_name=search.study_name, storage=fleet._storage())
        states = [t.state for t in study.get_trials(deepcopy=False)]
        counts[search.device_profile_id] = states.count(optuna.trial.TrialState.COMPLETE)
    return counts


def _assert_complete_and_unique(run: PlanningRun) -> None:
    assert run.status == "done", run.error
    assert set(_complete_trials(run).values()) == {run.trials_per_device}
    assert run.trials_done == run.trials_planned
    keys = list(
        RealEvaluation.objects.filter(base_model=run.base_model).values_list("weights_key", flat=True)
    )
    assert len(keys) == len(set(keys)), "no plan evaluated twice"
    assert run.real_evaluations <= run.real_eval_budget


def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_lost(tiny_model, start_worker):
    first = start_worker(EDGEFIT_STALE_SECONDS=STALE)
    run = create_run(
        base_model=tiny_model,
        device_profiles=_devices(1),
        policy={"kind": "max_accuracy"},
        trials_per_device=60,
        real_eval_budget=4,
    )
    _wait(lambda: _run(run.pk).trials_done >= 10, 120, "the first trials", first.output)
    first.kill()
    killed_at = _run(run.pk).trials_done
    assert killed_at < 60
    time.sleep(float(STALE) + 1)
    second = start_worker(EDGEFIT_STALE_SECONDS=STALE)  # on start it re-enqueues stale work
    _wait(lambda: _run(run.pk).finished, 240, "the run to finish", second.output)
    final = _run(run.pk)
    _assert_complete_and_unique(final)
    assert DeviceSearch.objects.get(run=final).attempts == 2, "the second worker resumed the same study"


def test_two_workers_share_a_run_without_storage_errors(tiny_model, start_worker):
    workers = [start_worker(EDGEFIT_STALE_SECONDS="30") for _ in range(2)]
    run = create_run(
        base_model=tiny_model,
        device_profiles=_devices(4),
        policy={"kind": "max_accuracy"},
        trials_per_device=20,
        real_eval_budget=6,
    )
    logs = lambda: "\n".join(w.output() for w in workers)  # noqa: E731
    _wait(lambda: _run(run.pk).finished, 300, "the run to finish", logs)
    _assert_complete_and_unique(_run(run.pk))
    assert set(DeviceSearch.objects.filter(run=run).values_list("attempts", flat=True)) == {1}
    busy = [w for w in workers if "workers.search_device" in w.output() and "succeeded" in w.output()]
    assert len(busy) == 2, "both workers took device searches"
    assert "Traceback" not in logs()


def test_a_redis_restart_mid_run_does_not_stop_it(tiny_model, start_worker, require_redis):
    worker = start_worker(beat=True, EDGEFIT_STALE_SECONDS=STALE, EDGEFIT_REQUEUE_SECONDS="2")
    run = create_run(
        base_model=tiny_model,
        device_profiles=_devices(2),
        policy={"kind": "max_accuracy"},
        trials_per_device=40,
        real_eval_budget=4,
    )
    _wait(lambda: _run(run.pk).trials_done >= 5, 120, "the first trials", worker.output)
    port = require_redis.rsplit(":", 1)[-1].split("/")[0]
    subprocess.run(["redis-cli", "-p", port, "shutdown", "nosave"], check=False, capture_output=True)
    time.sleep(2)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            port,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/tmp",
        ],
        check=True,
        capture_output=True,
    )
    _wait(lambda: _run(run.pk).finished, 300, "the run to finish after Redis came back", worker.output)
    _assert_complete_and_unique(_run(run.pk))
