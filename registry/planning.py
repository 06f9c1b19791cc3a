"""Services for planning runs: create (validated), claim (exactly once), cancel, report progress.

Views and the API call these; the Celery task `workers.run_plan` calls `registry.fleet.start_run`,
which claims the run through `claim_run`.  Enqueueing happens on commit, by task name, so this
module never imports `workers`; a run whose message the broker lost stays queued until
`workers.requeue_stale` enqueues it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from devices.models import DeviceProfile
from planner.recommend import Policy
from planner.specs import PlanError
from registry.dispatch import enqueue
from registry.models import BaseModel, PlanningRun

__all__ = [
    "MAX_ID",
    "MAX_SEED",
    "MAX_TRIALS_PER_DEVICE",
    "RunInputError",
    "cancel_run",
    "claim_run",
    "create_run",
    "finish_run",
]

MAX_TRIALS_PER_DEVICE = 20_000
MAX_REAL_EVALS = 500
MAX_DEVICES = 100
#: Largest database id (BigAutoField): a bigger number cannot name a row, and SQLite refuses it.
MAX_ID = 2**63 - 1
#: planner.search.make_sampler seeds Optuna with `seed * 1_000_003 + sum(map(ord, str(profile id)))`
#: and Optuna takes seeds below 2**32; a profile id has at most 19 digits ('9' = 57), so the
#: largest seed that works for every device is (2**32 - 1 - 19 * 57) // 1_000_003.
MAX_SEED = (2**32 - 1 - 19 * ord("9")) // 1_000_003


class RunInputError(ValueError):
    """Bad input for a run: `errors` maps each field to the rule it breaks."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def create_run(
    *,
    base_model: BaseModel | int | None,
    device_profiles: Sequence[DeviceProfile | int],
    policy: dict[str, Any],
    trials_per_device: int,
    real_eval_budget: int,
    sampler: str = PlanningRun.Sampler.NSGA2,
    seed: int = 0,
    created_by: Any = None,
) -> PlanningRun:
    """Validate everything first (nothing is written on bad input), then create the run and
    enqueue `workers.run_plan` once the transaction commits."""
    errors: dict[str, str] = {}
    model = base_model
    if isinstance(base_model, int):
        model = BaseModel.objects.filter(pk=base_model).first()
    if model is None:
        errors["base_model"] = "unknown model"
    ids = [p.pk if isinstance(p, DeviceProfile) else p for p in device_profiles]
    # An id past the database's integer range raises OverflowError in the query: judge it first.
    out_of_range = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= MAX_ID]
    profiles = [] if out_of_range else list(DeviceProfile.objects.filter(pk__in=ids))
    if out_of_range:
        errors["device_profiles"] = f"ids are integers from 1 to {MAX_ID}"
    elif not ids:
        errors["device_profiles"] = "give at least one device profile"
    elif len(ids) > MAX_DEVICES:
        errors["device_profiles"] = f"at most {MAX_DEVICES} device profiles per run"
    elif len(profiles) != len(set(ids)):
        missing = sorted(set(ids) - {p.pk for p in profiles})
        errors["device_profiles"] = f"unknown device profile id(s): {', '.join(map(str, missing))}"
    if not isinstance(trials_per_device, int) or not (1 <= trials_per_device <= MAX_TRIALS_PER_DEVICE):
        errors["trials_per_device"] = f"must be an integer from 1 to {MAX_TRIALS_PER_DEVICE}"
    if not isinstance(real_eval_budget, int) or not (1 <= real_eval_budget <= MAX_REAL_EVALS):
        errors["real_eval_budget"] = f"must be an integer from 1 to {MAX_REAL_EVALS}"
    if sampler not in PlanningRun.Sampler.values:
        errors["sampler"] = f"must be one of {', '.join(PlanningRun.Sampler.values)}"
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed <= MAX_SEED):
        errors["seed"] = f"must be an integer from 0 to {MAX_SEED}"
    fp32_accuracy = (model.fp32_metrics or {}).get("accuracy") if isinstance(model, BaseModel) else None
    if isinstance(model, BaseModel) and model.kind != BaseModel.Kind.RUNNABLE:
        # fleet.start_run searches accuracy with the model's weights: refuse now, not in the worker.
        errors["base_model"] = "is spec-only (no weights): only runnable models can be planned"
    elif isinstance(model, BaseModel) and fp32_accuracy is None:
        errors["base_model"] = "has no measured FP32 accuracy yet (register it with its evaluation set first)"
    try:
        parsed = Policy.from_dict(policy) if isinstance(policy, dict) else None
        if parsed is None:
            errors["policy"] = "must be an object"
        else:
            errors.update({f"policy.{k}": v for k, v in parsed.errors(fp32_accuracy).items()})
    except (PlanError, TypeError) as exc:
        # Policy names the broken field as "policy.<field>: <rule>"; keep that as the key.
        field, _, rule = str(exc).partition(": ")
        if field.startswith("policy.") and rule:
            errors[field] = rule
        else:
            errors["policy"] = str(exc).removeprefix("policy: ")
    if errors:
        raise RunInputError(errors)
    assert isinstance(model, BaseModel)
    with transaction.atomic():
        run = PlanningRun.objects.create(
            base_model=model,
            policy=policy,
            trials_per_device=trials_per_device,
            real_eval_budget=real_eval_budget,
            sampler=sampler,
            seed=seed,
            trials_planned=trials_per_device * len(profiles),
            created_by=created_by if getattr(created_by, "is_authenticated", False) else None,
        )
        run.device_profiles.set(profiles)
        transaction.on_commit(lambda: enqueue("workers.run_plan", run.pk))
    return run


def claim_run(run_id: int) -> PlanningRun | None:
    """Move a queued run to running, or take over a running one whose worker died
    (re-delivery after acks_late). Returns None when the run is finished or unknown."""
    now = timezone.now()
    claimed = PlanningRun.objects.filter(pk=run_id, status=PlanningRun.Status.QUEUED).update(
        status=PlanningRun.Status.RUNNING, started_at=now, attempts=F("attempts") + 1
    )
    if not claimed:
        # A re-delivered message for a run already marked running: its previous worker died
        # (the broker only re-delivers unacknowledged messages), so this one resumes it.
        claimed = PlanningRun.objects.filter(
            pk=run_id, status=PlanningRun.Status.RUNNING, cancel_requested=False
        ).update(attempts=F("attempts") + 1)
    if not claimed:
        return None
    return PlanningRun.objects.get(pk=run_id)


def cancel_run(run: PlanningRun) -> PlanningRun:
    """Ask a run to stop; a queued run is cancelled at once, a running one at its next trial."""
    with transaction.atomic():
        PlanningRun.objects.filter(pk=run.pk, status=PlanningRun.Status.QUEUED).update(
            status=PlanningRun.Status.CANCELLED, cancel_requested=True, finished_at=timezone.now()
        )
        PlanningRun.objects.filter(pk=run.pk, status=PlanningRun.Status.RUNNING).update(cancel_requested=True)
    run.refresh_from_db()
    return run


def cancel_requested(run_id: int) -> bool:
    return PlanningRun.objects.filter(pk=run_id, cancel_requested=True).exists()


def search_should_stop(run_id: int) -> bool:
    """Whether a device search of the run should stop: a cancel was asked, or the run is no
    longer running (another device's search failed it: the rest would search for a result
    nobody reads)."""
    return PlanningRun.objects.filter(
        Q(cancel_requested=True) | ~Q(status=PlanningRun.Status.RUNNING), pk=run_id
    ).exists()


def finish_run(run_id: int, status: str, *, error: str = "", result: dict[str, Any] | None = None) -> None:
    updates: dict[str, Any] = {"status": status, "finished_at": timezone.now(), "error": error[:20_000]}
    if result is not None:
        updates["result"] = result
    PlanningRun.objects.filter(pk=run_id, status=PlanningRun.Status.RUNNING).update(**updates)
