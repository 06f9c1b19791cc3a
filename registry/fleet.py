"""Executing a planning run: device searches, real confirmations, fronts and recommendations.

Stages (each a Celery task in `workers`, each safe to run twice):
  1. `start_run`: claim the run, make sure the model's sensitivity profile exists, create one
     DeviceSearch per device and return the ids to fan out.
  2. `search_device`: lease one DeviceSearch (conditional update), run/resume its Optuna study in
     the project database, heartbeat while it runs.  The last device to finish moves the run to
     the confirm stage.
  3. `confirm_run`: real evaluations of the candidates on the devices' estimated fronts (each
     plan once per model, claimed through a unique row whose `claimed_at` its holder renews
     after every pass; a plan another run holds is waited for, and taken over once that claim
     goes stale or its run ends), exit thresholds from the engine's free threshold curve,
     per-device measured fronts priced with the profiles' parameters stored at that moment (a
     re-fit landing later is applied when the run is done), recommendations, Pareto variants
     stored.

A worker killed at any point leaves a stale heartbeat; `stale_work` finds it and the caller
re-enqueues the stage, which resumes from what the database and the Optuna study hold.  It also
finds queued runs whose `run_plan` message was lost, and finishes cancelled runs whose worker died.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from devices.models import DeviceProfile
from planner.cost import predict
from planner.quant import plan_nbytes
from planner.recommend import Candidate, Policy, pareto_front, recommend
from planner.search import (
    DeviceTarget,
    SearchSettings,
    TrialScore,
    closest_misses,
    ends_first,
    estimated_front,
    hypervolume,
    run_device_search,
    spread,
)
from planner.specs import ModelSpec, Plan
from registry import planning
from registry.calibration import reprice_profile
from registry.engine import (
    bundle_for,
    compute_sensitivity,
    measured_provenance,
    record_variant,
    sensitivity_of,
)
from registry.models import BaseModel, DeviceSearch, HypervolumePoint, PlanningRun, RealEvaluation
from registry.predictions import UNSUPPORTED_MEMORY, cost_params_digest, lock_profiles, record_run_predictions
from registry.studies import optuna_storage_url

__all__ = [
    "EXIT_LOSS_BOUNDS",
    "confirm_run",
    "device_target",
    "device_trials",
    "hypervolume_reference",
    "optuna_storage_url",
    "search_device",
    "search_settings",
    "stale_work",
    "start_run",
]

log = logging.getLogger(__name__)

#: Early-exit variants derived from each confirmed plan: thresholds losing ≤ this many points
#: on the calibration split (None = no early exit).
EXIT_LOSS_BOUNDS: tuple[float | None, ...] = (None, 0.5, 1.0)
HEARTBEAT_EVERY_TRIALS = 10
PROGRESS_EVERY_TRIALS = 50
#: How often a confirm stage looks again at evaluations another worker holds.
CONFIRM_WAIT_POLL_S = 2.0
_sleep = time.sleep  # the confirm stage's wait (tests replace it)


_STORAGES: dict[str, Any] = {}


def _storage() -> Any:
    """One RDBStorage (engine + connection pool) per URL and process."""
    import optuna

    url = optuna_storage_url()
    if url in _STORAGES:
        return _STORAGES[url]
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # The embedded default has one worker; wait for the web process's locks instead of failing.
        kwargs["connect_args"] = {"timeout": 30}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception:
        # Two workers creating Optuna's tables at once: one wins, the other finds them on retry.
        time.sleep(0.5)
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    if url.startswith("sqlite"):
        _relax_sqlite_sync(storage)
    _STORAGES[url] = storage
    return storage


def dispose_storages() -> None:
    """Close the pooled connections of every cached Optuna storage of this process."""
    for storage in _STORAGES.values():
        storage.engine.dispose()
    _STORAGES.clear()


def _relax_sqlite_sync(storage: Any) -> None:
    """WAL + synchronous=NORMAL on Optuna's SQLite connections (the embedded default).

    Optuna commits once per parameter; with SQLite's default synchronous=FULL every commit waits
    for an fsync.  In WAL mode NORMAL still survives a crashed process (only a power cut can lose
    the last commits), and Django's own connections to the file already use it.
    """
    from sqlalchemy import event

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened while creating the schema lack the pragmas


def _policy(run: PlanningRun) -> Policy:
    return Policy.from_dict(run.policy)


def _fp32_accuracy(model: BaseModel) -> float:
    return float(model.fp32_metrics["accuracy"])


def device_target(run: PlanningRun, profile: DeviceProfile) -> DeviceTarget:
    policy = _policy(run)
    floor = policy.floor(_fp32_accuracy(run.base_model))
    return DeviceTarget(
        key=str(profile.pk),
        device=profile.to_device_spec(),
        cost_params=profile.cost_params_or_default(),  # fitted to its devices once they report
        memory_budget_bytes=policy.memory_budget_bytes,
        latency_slo_s=policy.latency_slo_ms / 1000 if policy.latency_slo_ms else None,
        accuracy_floor=floor,
    )


def search_settings(run: PlanningRun) -> SearchSettings:
    """How the run searches (and at which sequence length its candidates are priced)."""
    return SearchSettings(trials=run.trials_per_device, sampler=run.sampler, seed=run.seed)


def _beat(run_id: int) -> None:
    PlanningRun.objects.filter(pk=run_id).update(heartbeat_at=timezone.now())


# --------------------------------------------------------------------------- stage 1


class _CancelledWhileWaiting(Exception):
    """The run was cancelled while it waited for another process's sensitivity profiling."""


def start_run(run_id: int) -> tuple[list[int], bool]:
    """Claim the run and prepare its device searches. Returns the DeviceSearch ids still to
    run, and whether the run is ready for its confirm stage instead."""
    run = planning.claim_run(run_id)
    if run is None:
        return [], False
    _beat(run.pk)
    try:
        model = run.base_model
        if model.kind != BaseModel.Kind.RUNNABLE:
            raise ValueError("spec-only models are planned without accuracy search (not supported here)")
        if sensitivity_of(model) is None:
            log.info("run %s: profiling sensitivity of %s first", run.pk, model.name)

            def waiting_for_another_profiler() -> None:
                if planning.cancel_requested(run.pk):
                    raise _CancelledWhileWaiting
                _beat(run.pk)

            # Profiling takes minutes: keep beating so no one takes the run over meanwhile.
            compute_sensitivity(
                model, on_progress=lambda done, total: _beat(run.pk), on_wait=waiting_for_another_profiler
            )
        for profile in run.device_profiles.all():
            DeviceSearch.objects.get_or_create(run=run, device_profile=profile)
        _storage()  # create Optuna's tables here, before several workers race to
    except _CancelledWhileWaiting:
        planning.finish_run(run.pk, PlanningRun.Status.CANCELLED, error="cancelled on request")
        return [], False
    except Exception:
        planning.finish_run(run.pk, PlanningRun.Status.FAILED, error=traceback.format_exc())
        raise
    pending = list(
        DeviceSearch.objects.filter(run=run)
        .exclude(status__in=[DeviceSearch.Status.DONE, DeviceSearch.Status.CANCELLED])
        .values_list("pk", flat=True)
    )
    if not pending:
        # Every search finished but the move to the confirm stage was lost with its worker.
        PlanningRun.objects.filter(pk=run.pk, stage="search").update(stage="confirm")
        return [], True
    return pending, run.stage == "confirm"


# --------------------------------------------------------------------------- stage 2


def _lease(search_id: int) -> DeviceSearch | None:
    """Take a queued search, or one whose worker stopped beating."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.EDGEFIT_STALE_SECONDS)
    # Every condition on the search's own row (the run's status through a subquery, not a
    # join): PostgreSQL re-checks a plain UPDATE's conditions on a row another transaction
    # changed meanwhile, but a join filter becomes `id IN (subquery)` and is not re-checked —
    # two workers could lease one search.
    running = PlanningRun.objects.filter(status=PlanningRun.Status.RUNNING).values("pk")
    taken = DeviceSearch.objects.filter(
        Q(status=DeviceSearch.Status.QUEUED) | Q(status=DeviceSearch.Status.RUNNING, heartbeat_at__lt=stale),
        pk=search_id,
        run_id__in=running,
    ).update(status=DeviceSearch.Status.RUNNING, heartbeat_at=now, attempts=F("attempts") + 1)
    return (
        DeviceSearch.objects.select_related("run__base_model", "device_profile").get(pk=search_id)
        if taken
        else None
    )


def search_device(search_id: int) -> int | None:
    """Run or resume one device's study. Returns the run id when this call finished the last
    device (the caller then enqueues `confirm_run`), else None."""
    search = _lease(search_id)
    if search is None:
        return None
    run = search.run
    model = run.base_model
    spec = ModelSpec.from_dict(model.spec)
    profile = sensitivity_of(model)
    assert profile is not None, "start_run profiles the model before fanning out"
    counted = search.trials_done

    def on_trial(done: int) -> None:
        nonlocal counted
        if done % PROGRESS_EVERY_TRIALS == 0:
            _record_estimated_hypervolume(run, search, done)
        if done % HEARTBEAT_EVERY_TRIALS == 0 or done >= run.trials_per_device:
            now = timezone.now()
            DeviceSearch.objects.filter(pk=search.pk).update(trials_done=done, heartbeat_at=now)
            PlanningRun.objects.filter(pk=run.pk).update(
                trials_done=F("trials_done") + (done - counted), heartbeat_at=now
            )
            counted = done

    try:
        run_device_search(
            _storage(),
            search.study_name,
            spec,
            device_target(run, search.device_profile),
            profile,
            _fp32_accuracy(model),
            search_settings(run),
            lambda plan: plan_nbytes(spec, plan),
            on_trial=on_trial,
            should_stop=lambda: planning.search_should_stop(run.pk),
        )
    except Exception:
        planning.finish_run(run.pk, PlanningRun.Status.FAILED, error=traceback.format_exc())
        raise
    if planning.cancel_requested(run.pk):
        DeviceSearch.objects.filter(pk=search.pk).update(status=DeviceSearch.Status.CANCELLED)
        planning.finish_run(run.pk, PlanningRun.Status.CANCELLED, error="cancelled on request")
        return None
    if not PlanningRun.objects.filter(pk=run.pk, status=PlanningRun.Status.RUNNING).exists():
        # Another device's search failed the run while this one went on: stopped, not done.
        DeviceSearch.objects.filter(pk=search.pk).update(status=DeviceSearch.Status.CANCELLED)
        return None
    DeviceSearch.objects.filter(pk=search.pk).update(
        status=DeviceSearch.Status.DONE, heartbeat_at=timezone.now()
    )
    _record_estimated_hypervolume(run, search, run.trials_per_device)
    with transaction.atomic():
        remaining = DeviceSearch.objects.filter(run=run).exclude(status=DeviceSearch.Status.DONE).exists()
        if remaining:
            return None
        # Exactly one finisher moves the run on (conditional update).
        moved = PlanningRun.objects.filter(
            pk=run.pk, stage="search", status=PlanningRun.Status.RUNNING
        ).update(stage="confirm", heartbeat_at=timezone.now())
        return run.pk if moved else None


def _record_estimated_hypervolume(run: PlanningRun, search: DeviceSearch, trials: int) -> None:
    import optuna

    spec = ModelSpec.from_dict(run.base_model.spec)
    study = optuna.load_study(study_name=search.study_name, storage=_storage())
    front = estimated_front(study, spec, search_settings(run).method)
    floor, latency_cap, memory_cap = hypervolume_reference(run, search.device_profile)
    value = hypervolume(
        [Candidate(str(n), s.accuracy, s.latency_s, s.memory_bytes) for n, _, s in front],
        accuracy_floor=floor,
        latency_cap_s=latency_cap,
        memory_cap_bytes=memory_cap,
    )
    with transaction.atomic():
        locked = PlanningRun.objects.select_for_update().get(pk=run.pk)
        # Inserted under the run's row lock: the run's points commit in id order, so a reader
        # asking for the points after the N-th (`?after=N`) never skips one committed late.
        HypervolumePoint.objects.create(
            run_id=run.pk,
            device_profile_id=search.device_profile_id,
            trials=trials,
            hypervolume=value,
            source="estimated",
            at=timezone.now(),
        )
        if not front:
            return
        progress = dict(locked.progress or {})
        best = progress.setdefault("best", {})
        top = max(front, key=lambda row: row[2].accuracy)
        best[str(search.device_profile_id)] = {
            "accuracy": top[2].accuracy,
            "latency_ms": top[2].latency_s * 1000,
            "memory_bytes": top[2].memory_bytes,
            "source": "estimated",
        }
        locked.progress = progress
        locked.save(update_fields=["progress"])


def hypervolume_reference(run: PlanningRun, profile: DeviceProfile) -> tuple[float, float, float]:
    """Reference point of a device's hypervolume, relative to the FP32 model on that device:
    10 points below its accuracy, 1.5× its predicted latency and 1.5× its predicted memory.

    (Against the device's RAM budget — gigabytes — variants differing by megabytes would all
    score alike and compression would not count.)"""
    spec = ModelSpec.from_dict(run.base_model.spec)
    fp32 = predict(spec, Plan(), profile.to_device_spec(), seq_len=search_settings(run).seq_len)
    return _fp32_accuracy(run.base_model) - 0.10, fp32.latency_s * 1.5, fp32.memory_bytes * 1.5


# --------------------------------------------------------------------------- stage 3


def _claim_evaluation(model: BaseModel, plan: Plan, run: PlanningRun) -> RealEvaluation | None:
    """The row for this plan's weights if this worker must evaluate it; None if done/taken."""
    try:
        with transaction.atomic():
            return RealEvaluation.objects.create(
                base_model=model, weights_key=plan.weights_key(), plan=plan.to_dict(), run=run
            )
    except IntegrityError:
        return _take_over(model, plan.weights_key(), run)


def _take_over(model: BaseModel, weights_key: str, run: PlanningRun) -> RealEvaluation | None:
    """Claim an unfinished evaluation whose holder is gone: its run is no longer running (it
    failed, was cancelled or deleted) or its claim went stale (a live holder renews the claim
    after every pass: `_run_claimed`).  None if it is done or held by a live worker."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.EDGEFIT_STALE_SECONDS)
    ended = PlanningRun.objects.exclude(status=PlanningRun.Status.RUNNING).values("pk")
    # No join in the filter (see `_lease`): two takers of one stale row, or a taker racing the
    # holder's finish, must not both win.
    taken = (
        RealEvaluation.objects.filter(
            base_model=model, weights_key=weights_key, status=RealEvaluation.Status.RUNNING
        )
        .filter(Q(claimed_at__lt=stale) | Q(run__isnull=True) | Q(run_id__in=ended))
        .update(claimed_at=now, run=run)
    )
    return RealEvaluation.objects.get(base_model=model, weights_key=weights_key) if taken else None


class _ClaimLost(Exception):
    """Another worker took this evaluation over (this one was found gone): it finishes it."""


def _run_claimed(model: BaseModel, plan: Plan, run: PlanningRun, row: RealEvaluation) -> None:
    """Evaluate the claimed `row`, renewing the claim and the run's heartbeat after every pass
    (an evaluation takes several: a slow one is not taken for abandoned).  The claim's
    `claimed_at` is its fencing token: a renewal or the finish that finds another value there
    (the row was taken over) stops without writing or counting anything.  A failure leaves the
    row to be taken over at once: its run is failed by then."""
    token = row.claimed_at

    def renew() -> None:
        nonlocal token
        now = timezone.now()
        if not RealEvaluation.objects.filter(pk=row.pk, claimed_at=token).update(claimed_at=now):
            raise _ClaimLost
        token = now
        PlanningRun.objects.filter(pk=run.pk).update(heartbeat_at=now)

    try:
        result = _evaluate(model, plan, on_pass=renew)
    except _ClaimLost:
        log.info("run %s: evaluation %s was taken over; its new holder finishes it", run.pk, row.pk)
        return
    finished = RealEvaluation.objects.filter(
        pk=row.pk, claimed_at=token, status=RealEvaluation.Status.RUNNING
    ).update(result=result, status=RealEvaluation.Status.DONE, finished_at=timezone.now())
    if finished:
        PlanningRun.objects.filter(pk=run.pk).update(
            real_evaluations=F("real_evaluations") + 1, heartbeat_at=timezone.now()
        )


def _not_done(model: BaseModel, weights_keys: list[str]) -> dict[str, RealEvaluation | None]:
    """The chosen plans without a finished evaluation: their row (held elsewhere), or None."""
    rows = {
        r.weights_key: r
        for r in RealEvaluation.objects.filter(base_model=model, weights_key__in=weights_keys)
    }
    return {
        key: rows.get(key)
        for key in weights_keys
        if key not in rows or rows[key].status != RealEvaluation.Status.DONE
    }


def _confirm_should_stop(run: PlanningRun) -> bool:
    """A cancel was asked (the run is finished as cancelled here), or the run is no longer
    running (an overlapping copy of this stage finished it, or something failed it)."""
    state = PlanningRun.objects.filter(pk=run.pk).values_list("status", "cancel_requested").first()
    if state is None:
        return True
    status, cancel = state
    if cancel:
        planning.finish_run(run.pk, PlanningRun.Status.CANCELLED, error="cancelled on request")
        return True
    return status != PlanningRun.Status.RUNNING


def _evaluate(model: BaseModel, plan: Plan, on_pass: Callable[[], None] | None = None) -> dict[str, Any]:
    """Measured figures of `plan` (test split) and of its early-exit variants, thresholds
    chosen on the calibration split.  `on_pass` is called after each variant's evaluation."""
    evaluator = bundle_for(model).evaluator
    options = []
    for bound in EXIT_LOSS_BOUNDS:
        chosen = plan if bound is None else evaluator.with_calibrated_exit(plan, bound)[0]
        if bound is not None and chosen.exit_threshold is None:
            continue
        result = evaluator.evaluate(chosen, "test")
        options.append(
            {
                "loss_bound_points": bound,
                "plan": chosen.to_dict(),
                "accuracy": result.accuracy,
                "agreement": result.agreement,
                "kl": result.kl,
                "cosine": result.cosine,
                "mean_layers": result.mean_layers,
                "exit_fraction": list(result.exit_fraction),
                "exit_threshold": result.exit_threshold,
                "seconds": result.seconds,
            }
        )
        if on_pass is not None:
            on_pass()
    return {"options": options, "provenance": measured_provenance()}


def _choose_confirmations(
    run: PlanningRun, fronts: dict[int, list[tuple[int, Plan, Any]]]
) -> list[tuple[int, int, Plan]]:
    """Round-robin over devices, each offering its front spread evenly, until the budget of
    NEW evaluations is spent; plans already evaluated for this model cost nothing.

    Each device offers its spread ends first (`ends_first`): its fastest and its most accurate
    plan, then the middle, and so on.  Offered in latency order, a budget of two per device
    (16 evaluations for 8 devices) confirmed only the two fastest plans of every front, never
    the accurate end the hypervolume weighs (`bench search`: min share 0.940 → 0.999, 2e4ea19)."""
    done = set(
        RealEvaluation.objects.filter(
            base_model=run.base_model, status=RealEvaluation.Status.DONE
        ).values_list("weights_key", flat=True)
    )
    queues = {d: ends_first(spread(front, max(3, run.real_eval_budget))) for d, front in fronts.items()}
    chosen: list[tuple[int, int, Plan]] = []
    picked: set[str] = set()
    new = 0
    while any(queues.values()) and new < run.real_eval_budget:
        for device_id, queue in queues.items():
            if not queue or new >= run.real_eval_budget:
                continue
            number, plan, _ = queue.pop(0)
            key = plan.weights_key()
            if key in picked:
                continue
            picked.add(key)
            chosen.append((device_id, number, plan))
            if key not in done:
                new += 1
    return chosen


def confirm_run(run_id: int) -> None:
    """Stage 3 (see the module docstring). Safe to re-run: finished evaluations are reused."""
    import optuna

    run = PlanningRun.objects.select_related("base_model").get(pk=run_id)
    if run.status != PlanningRun.Status.RUNNING or run.stage != "confirm":
        return
    _beat(run.pk)
    try:
        model = run.base_model
        spec = ModelSpec.from_dict(model.spec)
        searches = list(DeviceSearch.objects.filter(run=run).select_related("device_profile"))
        method = search_settings(run).method
        studies = {
            s.device_profile_id: optuna.load_study(study_name=s.study_name, storage=_storage())
            for s in searches
        }
        fronts = {device: estimated_front(study, spec, method) for device, study in studies.items()}
        provenance_of: dict[str, str] = {}
        chosen_plans: dict[str, Plan] = {}
        for device_id, number, plan in _choose_confirmations(run, fronts):
            chosen_plans.setdefault(plan.weights_key(), plan)
            provenance_of.setdefault(
                plan.weights_key(), f"run {run.pk}, trial {number} of device {device_id}"
            )
            if _confirm_should_stop(run):
                return
            row = _claim_evaluation(model, plan, run)
            if row is not None:
                _run_claimed(model, plan, run, row)
        # A plan another run (or an overlapping copy of this stage) is evaluating would be
        # missing from this run's result: wait for it, or take it over once its holder is gone.
        waiting = _not_done(model, list(chosen_plans))
        while waiting:
            if _confirm_should_stop(run):
                return
            _beat(run.pk)
            _sleep(CONFIRM_WAIT_POLL_S)
            for key, row in waiting.items():
                # A row that vanished is claimed anew; a running one taken over if its holder is gone.
                taken = (
                    _claim_evaluation(model, chosen_plans[key], run)
                    if row is None
                    else _take_over(model, key, run)
                )
                if taken is not None:
                    _run_claimed(model, chosen_plans[key], run, taken)
            waiting = _not_done(model, list(chosen_plans))
        evaluations = list(
            RealEvaluation.objects.filter(
                base_model=model, weights_key__in=list(provenance_of), status=RealEvaluation.Status.DONE
            )
        )
        result: dict[str, Any] = {"devices": {}}
        # Price with the parameters stored now, not those read before the evaluations (minutes
        # ago: a re-fit may have landed meanwhile); a fit landing after this is applied below.
        for search in searches:
            search.device_profile.refresh_from_db(fields=["cost_params"])
        scored_with = {s.device_profile_id: s.device_profile.cost_params for s in searches}
        for search in searches:
            device = search.device_profile_id
            misses = closest_misses(studies[device], spec, method) if not fronts[device] else []
            result["devices"][str(device)] = _device_result(
                run, search.device_profile, spec, evaluations, fronts[device], provenance_of, misses
            )
        # All or nothing, the profiles locked first as a re-fit locks them (then the run): a
        # re-fit that landed since the scoring above (its parameters differ from those scored
        # with) is applied to this run here; one landing later waits for this commit and
        # re-ranks the run itself.  A worker dying before the commit leaves the run at its
        # confirm stage, which `stale_work` sends again (the evaluations are reused).
        with transaction.atomic():
            profiles = lock_profiles(list(scored_with))
            planning.finish_run(run.pk, PlanningRun.Status.DONE, result=result)
            for profile in profiles.values():
                if (profile.cost_params or None) != (scored_with[profile.pk] or None):
                    reprice_profile(profile)
            # The dashboard filters and sorts variants by per-device latency in SQL.
            record_run_predictions(PlanningRun.objects.get(pk=run.pk))
    except Exception:
        planning.finish_run(run.pk, PlanningRun.Status.FAILED, error=traceback.format_exc())
        raise


def _device_result(
    run: PlanningRun,
    profile: DeviceProfile,
    spec: ModelSpec,
    evaluations: list[RealEvaluation],
    estimated: list[tuple[int, Plan, Any]],
    provenance_of: dict[str, str],
    misses: list[TrialScore],
) -> dict[str, Any]:
    target = device_target(run, profile)
    policy = _policy(run)
    fp32_accuracy = _fp32_accuracy(run.base_model)
    seq_len = search_settings(run).seq_len
    candidates: list[Candidate] = []
    for evaluation in evaluations:
        for option in evaluation.result.get("options", []):
            plan = Plan.from_dict(option["plan"])
            exit_probs = option["exit_fraction"] if plan.exit_threshold is not None else None
            cost = predict(
                spec, plan, target.device, seq_len=seq_len, exit_probs=exit_probs, params=target.cost_params
            )
            unsupported = [s.precision for _, s in plan.schemes if not target.supports(s.precision)]
            candidates.append(
                Candidate(
                    key=plan.hash(),
                    accuracy=option["accuracy"],
                    latency_s=cost.latency_s,
                    memory_bytes=cost.memory_bytes if not unsupported else UNSUPPORTED_MEMORY,
                    accuracy_source="measured",
                    latency_source="predicted",
                    label=_label(plan),
                    extra={
                        "plan": plan.to_dict(),
                        "weights_key": evaluation.weights_key,
                        "agreement": option["agreement"],
                        "mean_layers": option["mean_layers"],
                        "exit_threshold": option["exit_threshold"],
                        "weight_bytes": cost.weight_bytes,
                        "unsupported_precisions": sorted(set(unsupported)),
                        "provenance": provenance_of.get(evaluation.weights_key, ""),
                    },
                )
            )
    usable = [c for c in candidates if not c.extra["unsupported_precisions"]]
    budget = profile.ram_budget_bytes
    if not estimated:
        # No plan fitted in the search: explain with the closest misses (estimated figures),
        # not with measured plans confirmed for other devices.
        misses_as_candidates = [
            Candidate(
                s.plan.hash(),
                s.accuracy,
                s.latency_s,
                s.memory_bytes,
                "estimated",
                "predicted",
                _label(s.plan),
            )
            for s in misses
        ]
        rec = recommend(
            misses_as_candidates, policy, fp32_accuracy=fp32_accuracy, device_memory_budget=budget
        )
        return {
            "device_profile": profile.pk,
            "device": profile.name,
            "front": [],
            "candidates": [],
            "estimated_front": [],
            "recommendation": {**rec.to_dict(), "variant": None},
            "hypervolume": 0.0,
        }
    rec = recommend(usable, policy, fp32_accuracy=fp32_accuracy, device_memory_budget=budget)
    accuracy_floor, latency_cap, memory_cap = hypervolume_reference(run, profile)
    front = pareto_front(usable)
    variants = _store_front(run, front)
    return {
        "device_profile": profile.pk,
        "device": profile.name,
        # Latencies were priced with the profile's fitted cost model (vs. the defaults), and
        # which parameters those were (`record_run_predictions` skips a device re-fitted since).
        "cost_params_fitted": profile.calibrated,
        "cost_params_digest": cost_params_digest(profile.cost_params),
        "front": [_candidate_json(c, variants) for c in front],
        "candidates": [_candidate_json(c, variants) for c in candidates],
        "estimated_front": [
            {
                "trial": n,
                "accuracy": s.accuracy,
                "latency_ms": s.latency_s * 1000,
                "memory_bytes": s.memory_bytes,
                "accuracy_source": "estimated",
                "latency_source": "predicted",
            }
            for n, _, s in estimated
        ],
        "recommendation": {
            **rec.to_dict(),
            "variant": variants.get(rec.chosen.key) if rec.chosen else None,
        },
        "hypervolume": hypervolume(
            front, accuracy_floor=accuracy_floor, latency_cap_s=latency_cap, memory_cap_bytes=memory_cap
        ),
    }


def _candidate_json(candidate: Candidate, variants: dict[str, int]) -> dict[str, Any]:
    data = candidate.to_dict()
    data["variant"] = variants.get(candidate.key)
    data["latency_ms"] = candidate.latency_s * 1000
    return data


def _label(plan: Plan) -> str:
    counts: dict[str, int] = {}
    for _, scheme in plan.schemes:
        counts[scheme.precision] = counts.get(scheme.precision, 0) + 1
    mix = ", ".join(f"{n}×{p}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "fp32"
    exit_part = f", exit ≥ {plan.exit_threshold:.2f}" if plan.exit_threshold is not None else ""
    return f"{mix}{exit_part}"


def _store_front(run: PlanningRun, front: list[Candidate]) -> dict[str, int]:
    """Pareto variants into the registry, measured, with the run and trial they came from."""
    stored: dict[str, int] = {}
    for candidate in front:
        plan = Plan.from_dict(candidate.extra["plan"])
        variant = record_variant(
            run.base_model,
            plan,
            name=candidate.label,
            metrics={
                "accuracy": candidate.accuracy,
                "agreement": candidate.extra["agreement"],
                "mean_layers": candidate.extra["mean_layers"],
                "exit_threshold": candidate.extra["exit_threshold"],
                "split": "test",
            },
            source="measured",
            provenance=f"{candidate.extra['provenance']}; {measured_provenance()}",
            tags=[f"run:{run.pk}"],
        )
        stored[candidate.key] = variant.pk
    return stored


# --------------------------------------------------------------------------- reading


def device_trials(run: PlanningRun, device_id: int) -> list[dict[str, Any]]:
    """Every finished trial of a device's study: estimated accuracy, predicted latency/memory,
    feasibility (for the Pareto chart; infeasible ones are shown greyed)."""
    import optuna

    search = DeviceSearch.objects.filter(run=run, device_profile_id=device_id).first()
    if search is None:
        return []
    try:
        study = optuna.load_study(study_name=search.study_name, storage=_storage())
    except KeyError:  # the study is created when the device's search starts
        return []
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if not trial.values:
            continue
        constraints = {k: v for k, v in trial.system_attrs.items() if k.startswith("constraints:")}
        rows.append(
            {
                "trial": trial.number,
                "accuracy": trial.values[0],
                "latency_ms": trial.values[1],
                "memory_bytes": int(trial.values[2] * 2**20),
                "feasible": all(float(v) <= 0 for v in constraints.values()),
            }
        )
    return rows


# --------------------------------------------------------------------------- recovery


def stale_work() -> dict[str, list[int]]:
    """Work whose worker stopped beating, or whose message the broker lost: device searches to
    re-lease, runs to re-confirm, runs whose start never completed, and queued runs no worker
    took up.  The caller re-enqueues the matching tasks.

    A run whose cancel was asked and whose worker died is finished as cancelled here (no worker
    would ever come back to it); those ids are returned under "cancelled"."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.EDGEFIT_STALE_SECONDS)
    cancelled = _finish_abandoned_cancels(stale)
    running = PlanningRun.objects.filter(status=PlanningRun.Status.RUNNING, cancel_requested=False)
    searches = list(
        DeviceSearch.objects.filter(
            run__in=running, status=DeviceSearch.Status.RUNNING, heartbeat_at__lt=stale
        ).values_list("pk", flat=True)
    )
    confirms = list(running.filter(stage="confirm", heartbeat_at__lt=stale).values_list("pk", flat=True))
    starts = list(
        running.filter(stage="search", heartbeat_at__lt=stale)
        .exclude(device_searches__status=DeviceSearch.Status.RUNNING)
        .values_list("pk", flat=True)
        .distinct()
    )
    return {
        "searches": searches,
        "confirms": confirms,
        "starts": starts,
        "queued": _stale_queued(now, stale),
        "cancelled": cancelled,
    }


def _stale_queued(now: datetime, stale: datetime) -> list[int]:
    """Queued runs older than the stale period: their `run_plan` message was lost (broker down
    at commit, Redis restarted) or is still waiting behind busy workers.  Re-enqueueing is safe
    either way (`claim_run` takes a run once; a second start resumes it).  `heartbeat_at` of a
    queued run records when it was last enqueued, so a run that merely waits is enqueued again
    once per stale period, not at every sweep."""
    queued = PlanningRun.objects.filter(status=PlanningRun.Status.QUEUED, cancel_requested=False)
    ids = list(
        queued.annotate(last_sent=Coalesce("heartbeat_at", "created_at"))
        .filter(last_sent__lt=stale)
        .values_list("pk", flat=True)
    )
    if ids:
        queued.filter(pk__in=ids).update(heartbeat_at=now)
    return ids


def _finish_abandoned_cancels(stale: datetime) -> list[int]:
    """Finish as cancelled the running runs asked to cancel whose worker stopped beating: the
    worker would have finished them at its next trial, but a dead one never does, and a
    re-enqueued stage refuses a run being cancelled (`claim_run`), so nothing else would."""
    ids = list(
        PlanningRun.objects.filter(status=PlanningRun.Status.RUNNING, cancel_requested=True)
        .annotate(last_beat=Coalesce("heartbeat_at", "started_at", "created_at"))
        .filter(last_beat__lt=stale)
        .values_list("pk", flat=True)
    )
    for run_id in ids:
        DeviceSearch.objects.filter(run_id=run_id).exclude(status=DeviceSearch.Status.DONE).update(
            status=DeviceSearch.Status.CANCELLED
        )
        planning.finish_run(
            run_id, PlanningRun.Status.CANCELLED, error="cancelled on request (its worker had stopped)"
        )
    return ids
