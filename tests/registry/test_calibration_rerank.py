"""Re-ranking a finished run after a calibration prices its candidates as the run did."""

from __future__ import annotations

import pytest

from planner.search import SearchSettings
from registry import calibration
from registry.models import PlanningRun
from tests.registry.factories import demo_fleet

pytestmark = pytest.mark.django_db


def test_reranking_prices_candidates_at_the_runs_sequence_length(monkeypatch):
    import planner.cost
    from registry import fleet as fleet_module

    fleet = demo_fleet()
    lengths: list[int] = []
    real_predict = planner.cost.predict

    def spy(*args, **kwargs):
        lengths.append(kwargs["seq_len"])
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(planner.cost, "predict", spy)
    monkeypatch.setattr(
        fleet_module,
        "search_settings",
        lambda run: SearchSettings(
            trials=run.trials_per_device, sampler=run.sampler, seed=run.seed, seq_len=37
        ),
    )
    assert calibration.rerank_profile(fleet["phone"]) == 1
    assert lengths and set(lengths) == {37}
    entry = PlanningRun.objects.get(pk=fleet["run"].pk).result["devices"][str(fleet["phone"].pk)]
    assert entry["calibration"]["calibrated"] is True
    assert len(entry["candidates"]) == 4
