"""One process profiles a model's sensitivity at a time; the others wait and read its profile."""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock

from registry import engine
from registry.models import BaseModel


def test_a_second_profiling_waits_for_the_first_and_reads_its_profile(
    tiny_model: BaseModel, engine_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A planning run started while the registration's own profiling is under way used to
    # measure the same profile again in parallel (minutes of both worker processes).
    [cache_file] = (Path(engine_settings.ENGINE_DATA_DIR) / "sensitivity").glob("*.json")
    stored = cache_file.read_bytes()
    expected = dict(tiny_model.sensitivity)
    BaseModel.objects.filter(pk=tiny_model.pk).update(sensitivity={})
    cache_file.unlink()  # as if the other process had not finished yet

    def must_not_profile(*args: object, **kwargs: object) -> None:
        raise AssertionError("profiled while another process held the model's profiling")

    monkeypatch.setattr(engine, "profile_sensitivity", must_not_profile)
    monkeypatch.setattr(engine, "SENSITIVITY_LOCK_POLL_S", 0.05)
    other = FileLock(cache_file.with_name(cache_file.name + ".lock"))
    other.acquire()
    waits: list[int] = []

    def the_other_finishes_after_three_polls() -> None:
        waits.append(1)
        if len(waits) == 3:
            cache_file.write_bytes(stored)
            other.release()

    try:
        profile = engine.compute_sensitivity(tiny_model, on_wait=the_other_finishes_after_three_polls)
    finally:
        if other.is_locked:
            other.release()
        cache_file.write_bytes(stored)
    assert len(waits) == 3
    tiny_model.refresh_from_db()
    assert tiny_model.sensitivity == expected
    assert profile.to_dict() == {k: v for k, v in expected.items() if k != "provenance"}


def _cache_file(engine_settings) -> Path:
    [cache_file] = (Path(engine_settings.ENGINE_DATA_DIR) / "sensitivity").glob("*.json")
    return cache_file


def test_a_stored_profile_is_read_without_the_lock(
    tiny_model: BaseModel, engine_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading needs no lock (the file is written by an atomic rename): a read-only data dir, or
    # one another user made the lock in, still serves its stored profile.
    cache_file = _cache_file(engine_settings)
    BaseModel.objects.filter(pk=tiny_model.pk).update(sensitivity={})
    monkeypatch.setattr(engine, "SENSITIVITY_LOCK_POLL_S", 0.01)
    waits: list[int] = []
    with FileLock(cache_file.with_name(cache_file.name + ".lock")):  # a profiler of another model version
        engine.compute_sensitivity(tiny_model, on_wait=lambda: waits.append(1))
    assert waits == []
    tiny_model.refresh_from_db()
    assert tiny_model.sensitivity


def test_a_data_dir_where_no_lock_can_be_made_profiles_unlocked(
    tiny_model: BaseModel, engine_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_file = _cache_file(engine_settings)
    stored = cache_file.read_bytes()
    profile = engine._read_profile(cache_file)
    assert profile is not None
    cache_file.unlink()

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self.lock_file))

    monkeypatch.setattr(FileLock, "acquire", refused)
    monkeypatch.setattr(engine, "profile_sensitivity", lambda *a, **k: profile[0])
    try:
        assert engine.compute_sensitivity(tiny_model).to_dict() == profile[0].to_dict()
        assert cache_file.is_file()
        # Nor can the profile be cached there (read-only): the model row gets it all the same.
        cache_file.unlink()
        BaseModel.objects.filter(pk=tiny_model.pk).update(sensitivity={})

        def read_only(*args, **kwargs):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(engine, "replacing", read_only)
        assert engine.compute_sensitivity(tiny_model).to_dict() == profile[0].to_dict()
        assert not cache_file.is_file()
        tiny_model.refresh_from_db()
        assert tiny_model.sensitivity
    finally:
        cache_file.write_bytes(stored)


def test_a_holder_that_never_finishes_is_given_up_on(
    tiny_model: BaseModel, engine_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_file = _cache_file(engine_settings)
    stored = cache_file.read_bytes()
    cache_file.unlink()
    monkeypatch.setattr(engine, "SENSITIVITY_LOCK_POLL_S", 0.01)
    monkeypatch.setattr(engine, "SENSITIVITY_LOCK_MAX_WAIT_S", 0.05)
    try:
        with (
            FileLock(cache_file.with_name(cache_file.name + ".lock")),
            pytest.raises(RuntimeError, match="for over"),
        ):
            engine.compute_sensitivity(tiny_model)
    finally:
        cache_file.write_bytes(stored)


def test_a_run_cancelled_while_it_waits_for_another_profiler_is_cancelled(
    tiny_model: BaseModel,
    engine_settings,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks,
) -> None:
    from registry import fleet
    from registry.models import PlanningRun
    from registry.planning import create_run
    from tests.registry.test_fleet import _profile

    cache_file = _cache_file(engine_settings)
    stored = cache_file.read_bytes()
    with django_capture_on_commit_callbacks(execute=False):
        run = create_run(
            base_model=tiny_model,
            device_profiles=[_profile("phone")],
            policy={"kind": "max_accuracy"},
            trials_per_device=10,
            real_eval_budget=1,
        )
    BaseModel.objects.filter(pk=tiny_model.pk).update(sensitivity={})
    cache_file.unlink()
    monkeypatch.setattr(engine, "SENSITIVITY_LOCK_POLL_S", 0.01)
    polls: list[int] = []
    real_cancel_requested = fleet.planning.cancel_requested

    def cancelled_on_the_third_look(run_id: int) -> bool:
        polls.append(run_id)
        if len(polls) == 3:
            PlanningRun.objects.filter(pk=run_id).update(cancel_requested=True)
        return real_cancel_requested(run_id)

    monkeypatch.setattr(fleet.planning, "cancel_requested", cancelled_on_the_third_look)
    try:
        with FileLock(cache_file.with_name(cache_file.name + ".lock")):
            assert fleet.start_run(run.pk) == ([], False)
    finally:
        cache_file.write_bytes(stored)
    run.refresh_from_db()
    assert run.status == "cancelled" and len(polls) == 3
