"""Reading the Optuna studies of device searches without importing optuna (or torch).

`registry.fleet` runs the searches through Optuna's RDB storage; pages only read them.  Importing
`registry.fleet` pulls in torch and optuna (seconds of start-up), so what a page needs lives here:
the storage URL (the same one the searches write to) and the finished trials of one device's
study, read straight from Optuna's tables.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.cache import cache

from registry.models import DeviceSearch, PlanningRun

__all__ = ["dispose_engines", "optuna_storage_url", "trial_points", "trial_points_many"]

log = logging.getLogger(__name__)

_MIB = 2**20
_ENGINES: dict[str, Any] = {}


def optuna_storage_url() -> str:
    """Optuna's RDB storage lives in the project database (SQLAlchemy URL of the same DB)."""
    if settings.OPTUNA_STORAGE_URL:
        return str(settings.OPTUNA_STORAGE_URL)
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("postgresql"):
        auth = db.get("USER") or ""
        if db.get("PASSWORD"):
            auth += f":{db['PASSWORD']}"
        host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
        return f"postgresql+psycopg://{auth}@{host}/{db['NAME']}"
    name = str(db["NAME"])
    if name.startswith("file:"):
        # Django's in-memory test database ("file:memorydb_default?mode=memory&cache=shared"):
        # without uri=true SQLAlchemy would create a file of that name in the working directory.
        return f"sqlite:///{name}{'&' if '?' in name else '?'}uri=true"
    return f"sqlite:///{name}"


def trial_points(run_id: int, device_id: int) -> list[dict[str, Any]]:
    """Every finished search trial of a device in a run: see `trial_points_many`."""
    return trial_points_many([(run_id, device_id)])[(run_id, device_id)]


def trial_points_many(pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """(run id, device id) → every finished search trial of that device in that run (accuracy
    estimated, latency and memory predicted, feasibility). Cached (an hour for finished runs).

    Two queries for any number of pairs not cached (their runs, their device searches); the
    trials are read straight from Optuna's tables, or through Optuna's API when that read fails
    (Optuna's schema is not what `_trial_points_sql` expects)."""
    keys = {pair: f"edgefit:dash:trials:{pair[0]}:{pair[1]}" for pair in pairs}
    hits = cache.get_many(list(keys.values()))
    out = {pair: list(hits[key]) for pair, key in keys.items() if key in hits}
    missing = [pair for pair in keys if pair not in out]
    if not missing:
        return out
    runs = {r.pk: r for r in PlanningRun.objects.filter(pk__in={r for r, _ in missing}).only("pk", "status")}
    searches = {
        (s.run_id, s.device_profile_id): s
        for s in DeviceSearch.objects.filter(
            run_id__in={r for r, _ in missing}, device_profile_id__in={d for _, d in missing}
        )
    }
    finished: dict[str, Any] = {}
    unfinished: dict[str, Any] = {}
    for pair in missing:
        run, search = runs.get(pair[0]), searches.get(pair)
        # no search, no study: it is created with the device's search
        points = _read_study(run, search) if run is not None and search is not None else []
        out[pair] = points
        if run is not None:
            (finished if run.finished else unfinished)[keys[pair]] = points
    cache.set_many(finished, 3600)
    cache.set_many(unfinished, 10)
    return out


def _read_study(run: PlanningRun, search: DeviceSearch) -> list[dict[str, Any]]:
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _trial_points_sql(search.study_name)
    except SQLAlchemyError:
        log.warning("reading study %s directly failed; using Optuna", search.study_name, exc_info=True)
        from registry import fleet  # pulls in optuna and torch: only when the fast path fails

        return fleet.device_trials(run, search.device_profile_id)


def dispose_engines() -> None:
    """Close every pooled connection this process holds on Optuna's storage (this module's
    read-only engines and, when loaded, registry.fleet's storages): a test session must before
    it drops its database, which refuses while another session is connected."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()
    fleet = sys.modules.get("registry.fleet")
    if fleet is not None:
        fleet.dispose_storages()


def _optuna_engine() -> Any:
    """A read-only SQLAlchemy engine on Optuna's storage (one per URL and process)."""
    url = optuna_storage_url()
    if url not in _ENGINES:
        from sqlalchemy import create_engine

        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        _ENGINES[url] = create_engine(url, **kwargs)
    return _ENGINES[url]


def _trial_points_sql(study_name: str) -> list[dict[str, Any]]:
    """Optuna's schema (studies, trials, trial_values, trial_system_attributes), read directly:
    `study.get_trials` builds a FrozenTrial with ~40 parameters per trial, which for 10,000
    trials takes seconds; the chart needs three numbers and a flag.  A study not created yet
    (the search has not started) has no trials: []."""
    from sqlalchemy import text

    with _optuna_engine().connect() as conn:
        study = conn.execute(
            text("SELECT study_id FROM studies WHERE study_name = :n"), {"n": study_name}
        ).first()
        if study is None:
            return []
        values = conn.execute(
            text(
                "SELECT t.trial_id, t.number, v.objective, v.value FROM trials t "
                "JOIN trial_values v ON v.trial_id = t.trial_id "
                "WHERE t.study_id = :s AND t.state = 'COMPLETE' ORDER BY t.number"
            ),
            {"s": study[0]},
        ).all()
        attrs = conn.execute(
            text(
                "SELECT a.trial_id, a.value_json FROM trial_system_attributes a "
                "JOIN trials t ON t.trial_id = a.trial_id "
                "WHERE t.study_id = :s AND a.key LIKE 'constraints:%'"
            ),
            {"s": study[0]},
        ).all()
    infeasible = {trial_id for trial_id, value in attrs if float(json.loads(value)) > 0}
    trials: dict[int, dict[str, Any]] = {}
    for trial_id, number, objective, value in values:
        row = trials.setdefault(trial_id, {"trial": number, "values": [None, None, None]})
        if value is not None and 0 <= objective < 3:
            row["values"][objective] = float(value)
    points = []
    for trial_id, row in trials.items():
        acc, lat, mem = row["values"]
        if acc is None or lat is None or mem is None:
            continue
        points.append(
            {
                "trial": row["trial"],
                "accuracy": acc,
                "latency_ms": lat,
                "memory_bytes": int(mem * _MIB),
                "feasible": trial_id not in infeasible,
            }
        )
    return points
