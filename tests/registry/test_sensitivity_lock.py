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
