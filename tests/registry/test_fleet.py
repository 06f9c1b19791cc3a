"""A whole planning run on the tiny bundle, stage by stage, in this process."""

from __future__ import annotations

from datetime import timedelta

import optuna
import pytest
from django.utils import timezone

from devices.models import DeviceProfile
from planner.search import estimated_front
from planner.specs import ModelSpec
from registry import fleet
from registry.models import DeviceSearch, HypervolumePoint, PlanningRun, RealEvaluation, Variant
from registry.planning import create_run
from tests.devices.factories import profile_payload

pytestmark = pytest.mark.django_db(transaction=True)


def _profile(name: str, **overrides) -> DeviceProfile:
    data = profile_payload(name=name, **overrides)
    return DeviceProfile.objects.create(**{k: v for k, v in data.items()})


def _queued_run(model, devices, trials: int, budget: int, capture) -> PlanningRun:
    """A max-accuracy run, queued with its on-commit dispatch held back: each test runs the stages."""
    with capture(execute=False):
        return create_run(
            base_model=model,
            device_profiles=devices,
            policy={"kind": "max_accuracy"},
            trials_per_device=trials,
            real_eval_budget=budget,
        )


def _search_all_devices(run: PlanningRun) -> None:
    """Stages 1 and 2: the run is then at its confirm stage."""
    searches, _ = fleet.start_run(run.pk)
    for search_id in searches:
        fleet.search_device(search_id)


def _run_all_stages(run_id: int) -> None:
    searches, _ = fleet.start_run(run_id)
    finished = [fleet.search_device(s) for s in searches]
    assert sum(1 for f in finished if f is not None) == 1  # exactly one finisher moves on
    fleet.confirm_run(run_id)


def test_a_fleet_run_produces_fronts_recommendations_and_variants(
    tiny_model, django_capture_on_commit_callbacks
):
    phone = _profile("phone", weight_formats=["fp32", "fp16", "int8", "int4"])
    board = _profile("board", weight_formats=["fp32", "int8"], int4_tops=None)
    run = _queued_run(tiny_model, [phone, board], 24, 6, django_capture_on_commit_callbacks)
    assert run.status == "queued" and run.trials_planned == 48

    _run_all_stages(run.pk)

    run.refresh_from_db()
    assert run.status == "done", run.error
    assert run.trials_done == 48
    assert 1 <= run.real_evaluations <= 6
    for device in (phone, board):
        entry = run.result["devices"][str(device.pk)]
        assert entry["front"], "every device gets a measured front"
        assert all(c["accuracy_source"] == "measured" for c in entry["front"])
        assert all(c["latency_source"] == "predicted" for c in entry["front"])
        assert entry["recommendation"]["chosen"] is not None
        assert entry["hypervolume"] >= 0
    board_front = run.result["devices"][str(board.pk)]["front"]
    precisions = {s["precision"] for c in board_front for s in c["extra"]["plan"]["schemes"].values()}
    assert precisions <= {"fp32", "int8"}, "a board without int4 only gets precisions it runs"
    assert Variant.objects.filter(base_model=tiny_model, tags__icontains=f"run:{run.pk}").exists()
    assert not DeviceSearch.objects.exclude(status="done").exists()
    # The hypervolume history is appended as rows; the run's JSON keeps the best per device.
    points = HypervolumePoint.objects.filter(run=run)
    assert {p.device_profile_id for p in points} == {phone.pk, board.pk}
    assert "hypervolume" not in run.progress and set(run.progress["best"]) <= {str(phone.pk), str(board.pk)}


def test_evaluations_are_shared_and_never_repeated(tiny_model, django_capture_on_commit_callbacks):
    phone = _profile("phone")
    first = _queued_run(tiny_model, [phone], 30, 4, django_capture_on_commit_callbacks)
    second = _queued_run(tiny_model, [phone], 30, 4, django_capture_on_commit_callbacks)
    _run_all_stages(first.pk)
    keys_before = set(RealEvaluation.objects.values_list("weights_key", flat=True))
    _run_all_stages(second.pk)
    keys = list(RealEvaluation.objects.values_list("weights_key", flat=True))
    assert len(keys) == len(set(keys)), "one evaluation per plan and model"
    assert keys_before <= set(keys)


def test_a_budget_of_two_confirms_both_ends_of_the_front(tiny_model, django_capture_on_commit_callbacks):
    phone = _profile("phone")
    run = _queued_run(tiny_model, [phone], 30, 2, django_capture_on_commit_callbacks)
    _search_all_devices(run)
    search = DeviceSearch.objects.get(run=run)
    study = optuna.load_study(study_name=search.study_name, storage=fleet._storage())
    front = estimated_front(study, ModelSpec.from_dict(tiny_model.spec), fleet.search_settings(run).method)
    assert len(front) >= 3  # so that "both ends" differs from "the two fastest"
    fleet.confirm_run(run.pk)
    confirmed = set(
        RealEvaluation.objects.filter(base_model=tiny_model).values_list("weights_key", flat=True)
    )
    # The fastest and the most accurate estimated plan (the front is sorted by latency).
    assert confirmed == {front[0][1].weights_key(), front[-1][1].weights_key()}


def test_running_a_stage_twice_changes_nothing(tiny_model, django_capture_on_commit_callbacks):
    phone = _profile("phone")
    run = _queued_run(tiny_model, [phone], 25, 3, django_capture_on_commit_callbacks)
    _run_all_stages(run.pk)
    search = DeviceSearch.objects.get(run=run)
    assert fleet.search_device(search.pk) is None  # already done: the lease is refused
    assert fleet.start_run(run.pk) == ([], False)
    fleet.confirm_run(run.pk)  # finished run: no-op
    run.refresh_from_db()
    assert run.status == "done" and run.trials_done == 25


def test_a_device_nothing_fits_completes_with_an_explanation(tiny_model, django_capture_on_commit_callbacks):
    tiny_budget = _profile("watch", ram_total_bytes=4096, ram_budget_bytes=1024)
    run = _queued_run(tiny_model, [tiny_budget], 20, 2, django_capture_on_commit_callbacks)
    _run_all_stages(run.pk)
    run.refresh_from_db()
    assert run.status == "done"
    rec = run.result["devices"][str(tiny_budget.pk)]["recommendation"]
    assert rec["chosen"] is None
    assert "memory" in rec["infeasible"] and "over" in rec["infeasible"]["memory"]


def test_cancel_stops_a_running_search(tiny_model, django_capture_on_commit_callbacks):
    from registry.planning import cancel_run

    phone = _profile("phone")
    run = _queued_run(tiny_model, [phone], 5000, 2, django_capture_on_commit_callbacks)
    searches, _ = fleet.start_run(run.pk)
    cancel_run(PlanningRun.objects.get(pk=run.pk))
    assert fleet.search_device(searches[0]) is None
    run.refresh_from_db()
    assert run.status == "cancelled" and run.trials_done < 5000


def test_a_search_stops_once_another_devices_search_failed_the_run(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch
):
    from registry.planning import finish_run

    phone = _profile("phone")
    run = _queued_run(tiny_model, [phone], 5000, 2, django_capture_on_commit_callbacks)
    searches, _ = fleet.start_run(run.pk)
    real_search = fleet.run_device_search

    def sibling_fails_the_run_meanwhile(*args, **kwargs):
        finish_run(run.pk, PlanningRun.Status.FAILED, error="another device's search raised")
        return real_search(*args, **kwargs)

    monkeypatch.setattr(fleet, "run_device_search", sibling_fails_the_run_meanwhile)
    assert fleet.search_device(searches[0]) is None
    run.refresh_from_db()
    assert run.status == "failed" and run.trials_done < 5000  # it did not search on to the end
    assert DeviceSearch.objects.get(pk=searches[0]).status == DeviceSearch.Status.CANCELLED


def _at_confirm_beside_another_run(tiny_model, capture, budget: int = 2, other_status: str = "running"):
    """A run at its confirm stage (one phone) and another run of the model in `other_status`."""
    phone = _profile("phone")
    run = _queued_run(tiny_model, [phone], 30, budget, capture)
    other = _queued_run(tiny_model, [phone], 30, budget, capture)
    PlanningRun.objects.filter(pk=other.pk).update(status=other_status)
    _search_all_devices(run)
    return run, other, phone


def _confirm_with_a_plan_held_by_another_run(tiny_model, capture, other_status: str = "running"):
    """A run at its confirm stage, and the evaluation of the most accurate plan of its front
    (one of the two a budget of two confirms) claimed just now by another run."""
    run, other, phone = _at_confirm_beside_another_run(tiny_model, capture, other_status=other_status)
    search = DeviceSearch.objects.get(run=run)
    study = optuna.load_study(study_name=search.study_name, storage=fleet._storage())
    front = estimated_front(study, ModelSpec.from_dict(tiny_model.spec), fleet.search_settings(run).method)
    held_plan = front[-1][1]
    held = RealEvaluation.objects.create(
        base_model=tiny_model, weights_key=held_plan.weights_key(), plan=held_plan.to_dict(), run=other
    )
    return run, other, phone, held_plan, held


def _candidate_keys(run: PlanningRun, device: DeviceProfile) -> set[str]:
    return {c["extra"]["weights_key"] for c in run.result["devices"][str(device.pk)]["candidates"]}


def test_confirm_waits_for_a_plan_another_run_is_evaluating(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, engine_settings
):
    # It used to skip a plan whose evaluation row another run held and finish DONE without it.
    engine_settings.EDGEFIT_STALE_SECONDS = 3600  # the other run's claim stays live throughout
    run, other, phone, held_plan, held = _confirm_with_a_plan_held_by_another_run(
        tiny_model, django_capture_on_commit_callbacks
    )
    polls: list[float] = []

    def the_other_run_finishes(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 2:
            held.result = fleet._evaluate(tiny_model, held_plan)
            held.status = RealEvaluation.Status.DONE
            held.save(update_fields=["result", "status"])

    monkeypatch.setattr(fleet, "_sleep", the_other_run_finishes)
    fleet.confirm_run(run.pk)

    run.refresh_from_db()
    assert run.status == "done", run.error
    assert len(polls) == 2
    assert held_plan.weights_key() in _candidate_keys(run, phone)
    held.refresh_from_db()
    assert held.run_id == other.pk, "a live claim is waited for, not taken over"


def test_confirm_takes_over_an_evaluation_whose_claim_went_stale(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, engine_settings
):
    engine_settings.EDGEFIT_STALE_SECONDS = 3600
    run, _other, phone, held_plan, held = _confirm_with_a_plan_held_by_another_run(
        tiny_model, django_capture_on_commit_callbacks
    )
    polls: list[float] = []

    def the_claim_goes_stale(seconds: float) -> None:  # its worker died: no renewal since
        polls.append(seconds)
        RealEvaluation.objects.filter(pk=held.pk).update(claimed_at=timezone.now() - timedelta(hours=2))

    monkeypatch.setattr(fleet, "_sleep", the_claim_goes_stale)
    fleet.confirm_run(run.pk)

    run.refresh_from_db()
    held.refresh_from_db()
    assert run.status == "done", run.error
    assert len(polls) == 1
    assert held.status == RealEvaluation.Status.DONE and held.run_id == run.pk
    assert held_plan.weights_key() in _candidate_keys(run, phone)


@pytest.mark.parametrize("other_status", ["failed", "cancelled"])
def test_confirm_takes_over_at_once_an_evaluation_whose_run_ended(
    tiny_model,
    django_capture_on_commit_callbacks,
    monkeypatch: pytest.MonkeyPatch,
    engine_settings,
    other_status,
):
    # The holder's run failed or was cancelled mid-evaluation: nobody will finish that row.
    engine_settings.EDGEFIT_STALE_SECONDS = 3600
    run, _other, _phone, _held_plan, held = _confirm_with_a_plan_held_by_another_run(
        tiny_model, django_capture_on_commit_callbacks, other_status
    )
    polls: list[float] = []
    monkeypatch.setattr(fleet, "_sleep", polls.append)
    fleet.confirm_run(run.pk)

    run.refresh_from_db()
    held.refresh_from_db()
    assert run.status == "done", run.error
    assert polls == [], "no wait for a claim nobody holds"
    assert held.status == RealEvaluation.Status.DONE and held.run_id == run.pk


def test_a_slow_evaluation_renews_its_claim_and_the_runs_heartbeat_after_every_pass(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch
):
    phone = _profile("phone")
    run = _queued_run(tiny_model, [phone], 30, 1, django_capture_on_commit_callbacks)
    _search_all_devices(run)
    renewals: list[tuple[object, object]] = []
    evaluate = fleet._evaluate

    def observed(model, plan, on_pass=None):
        def renew_and_look() -> None:
            assert on_pass is not None
            PlanningRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
            before = RealEvaluation.objects.get().claimed_at
            on_pass()
            row = RealEvaluation.objects.get()
            renewals.append((before, row.claimed_at, PlanningRun.objects.get(pk=run.pk).heartbeat_at))

        return evaluate(model, plan, on_pass=renew_and_look)

    monkeypatch.setattr(fleet, "_evaluate", observed)
    fleet.confirm_run(run.pk)
    assert len(renewals) >= 2, "one renewal per pass (the plan, then its exit variants)"
    recent = timezone.now() - timedelta(minutes=1)
    assert all(after > before and beat > recent for before, after, beat in renewals)
    run.refresh_from_db()
    assert run.status == "done" and run.real_evaluations == 1


def test_a_failed_evaluations_row_is_free_for_another_run_at_once(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, engine_settings
):
    engine_settings.EDGEFIT_STALE_SECONDS = 3600
    run, other, _ = _at_confirm_beside_another_run(tiny_model, django_capture_on_commit_callbacks, 2)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fleet, "_evaluate", broken)
    with pytest.raises(RuntimeError):
        fleet.confirm_run(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and "out of memory" in run.error
    [row] = RealEvaluation.objects.all()
    # Its run failed: the claim is nobody's, whatever its age.
    assert fleet._take_over(tiny_model, row.weights_key, other) is not None


def test_a_worker_whose_evaluation_was_taken_over_writes_and_counts_nothing(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, engine_settings
):
    # Its claim is its fencing token: once another run took the row over (this one looked
    # gone), the first worker's renewal finds it changed and stops; the new holder finishes.
    engine_settings.EDGEFIT_STALE_SECONDS = 3600
    run, other, _ = _at_confirm_beside_another_run(tiny_model, django_capture_on_commit_callbacks, 1)
    evaluate = fleet._evaluate
    taken: list[int] = []

    def taken_over_after_the_first_pass(model, plan, on_pass=None):
        def then_renew() -> None:
            if not taken:
                row = RealEvaluation.objects.get()
                RealEvaluation.objects.filter(pk=row.pk).update(claimed_at=timezone.now(), run=other)
                taken.append(row.pk)
            assert on_pass is not None
            on_pass()

        return evaluate(model, plan, on_pass=then_renew)

    def the_new_holder_finishes(seconds: float) -> None:
        RealEvaluation.objects.filter(pk=taken[0]).update(
            status="done", result={"options": [], "by": "other"}
        )

    monkeypatch.setattr(fleet, "_evaluate", taken_over_after_the_first_pass)
    monkeypatch.setattr(fleet, "_sleep", the_new_holder_finishes)
    fleet.confirm_run(run.pk)

    run.refresh_from_db()
    row = RealEvaluation.objects.get(pk=taken[0])
    assert run.status == "done", run.error
    assert row.run_id == other.pk and row.result == {"options": [], "by": "other"}
    assert run.real_evaluations == 0


def test_a_waiter_claims_a_plan_whose_row_vanished(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, engine_settings
):
    engine_settings.EDGEFIT_STALE_SECONDS = 3600
    run, _other, phone, held_plan, held = _confirm_with_a_plan_held_by_another_run(
        tiny_model, django_capture_on_commit_callbacks
    )
    monkeypatch.setattr(fleet, "_sleep", lambda seconds: RealEvaluation.objects.filter(pk=held.pk).delete())
    fleet.confirm_run(run.pk)

    run.refresh_from_db()
    assert run.status == "done", run.error
    assert held_plan.weights_key() in _candidate_keys(run, phone)
    assert RealEvaluation.objects.get(weights_key=held_plan.weights_key()).run_id == run.pk


@pytest.mark.parametrize("ended", ["cancel_requested", "finished_by_another_copy"])
def test_a_confirm_waiting_for_another_run_stops_when_its_own_run_ends(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, engine_settings, ended
):
    engine_settings.EDGEFIT_STALE_SECONDS = 3600
    run, other, _phone, _held_plan, held = _confirm_with_a_plan_held_by_another_run(
        tiny_model, django_capture_on_commit_callbacks
    )
    polls: list[float] = []

    def the_run_ends(seconds: float) -> None:
        polls.append(seconds)
        if ended == "cancel_requested":
            PlanningRun.objects.filter(pk=run.pk).update(cancel_requested=True)
        else:
            PlanningRun.objects.filter(pk=run.pk).update(
                status="done", result={"devices": {"by": "other copy"}}
            )

    monkeypatch.setattr(fleet, "_sleep", the_run_ends)
    fleet.confirm_run(run.pk)

    run.refresh_from_db()
    assert len(polls) == 1
    if ended == "cancel_requested":
        assert run.status == "cancelled"
    else:
        assert run.status == "done" and run.result == {"devices": {"by": "other copy"}}
    held.refresh_from_db()
    assert held.status == RealEvaluation.Status.RUNNING and held.run_id == other.pk


@pytest.mark.parametrize("fit_lands", ["during_the_evaluations", "after_the_scoring"])
def test_a_refit_landing_while_the_run_confirms_prices_its_result_and_predictions(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, fit_lands: str
):
    # A re-fit re-ranks finished runs only: a run confirming meanwhile kept the figures of the
    # parameters read before its evaluations, and its own predictions replaced the re-fit's.
    from planner.cost import CostParams
    from registry.models import Prediction

    phone = _profile("phone")
    run = _queued_run(tiny_model, [phone], 30, 2, django_capture_on_commit_callbacks)
    _search_all_devices(run)
    fitted = CostParams(mem_efficiency=0.05, fixed_overhead_s=3e-3).to_dict()

    def land_the_fit() -> None:
        DeviceProfile.objects.filter(pk=phone.pk).update(cost_params=fitted)

    if fit_lands == "during_the_evaluations":
        evaluate = fleet._evaluate

        def evaluate_then_fit(*args, **kwargs):
            out = evaluate(*args, **kwargs)
            land_the_fit()
            return out

        monkeypatch.setattr(fleet, "_evaluate", evaluate_then_fit)
    else:  # after the scoring, before the finishing transaction locks the profiles
        lock = fleet.lock_profiles

        def fit_then_lock(*args, **kwargs):
            land_the_fit()
            return lock(*args, **kwargs)

        monkeypatch.setattr(fleet, "lock_profiles", fit_then_lock)
    fleet.confirm_run(run.pk)

    run.refresh_from_db()
    assert run.status == "done", run.error
    entry = run.result["devices"][str(phone.pk)]
    stored = {
        p.variant_id: p
        for p in Prediction.objects.filter(device_profile=phone, variant__tags__icontains=f"run:{run.pk}")
    }
    assert stored
    assert all(p.calibrated for p in stored.values())
    for candidate in entry["front"]:
        assert candidate["latency_ms"] == pytest.approx(stored[candidate["variant"]].latency_s * 1000)


def test_a_worker_dying_while_the_run_finishes_leaves_it_to_be_confirmed_again(
    tiny_model, django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch
):
    # Finishing is one transaction (status, re-pricing, predictions): a worker killed inside it
    # leaves the run at its confirm stage, which the sweep sends again; nothing half-written.
    from registry.models import Prediction

    phone = _profile("phone")
    run = _queued_run(tiny_model, [phone], 30, 2, django_capture_on_commit_callbacks)
    _search_all_devices(run)

    def killed(*args, **kwargs):
        raise SystemExit("worker killed")  # not an Exception: no FAILED is written either

    with monkeypatch.context() as patched:
        patched.setattr(fleet, "record_run_predictions", killed)
        with pytest.raises(SystemExit):
            fleet.confirm_run(run.pk)
    run.refresh_from_db()
    assert (run.status, run.stage, run.result) == ("running", "confirm", {})
    assert not Prediction.objects.filter(device_profile=phone).exists()

    fleet.confirm_run(run.pk)  # sent again: the evaluations are reused
    run.refresh_from_db()
    assert run.status == "done" and Prediction.objects.filter(device_profile=phone).exists()
