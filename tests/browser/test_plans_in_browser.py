"""The run page follows a run live: progress and figures update without a page reload."""

from __future__ import annotations

import pytest
from django.utils import timezone

from devices.models import DeviceProfile
from registry.models import BaseModel, HypervolumePoint, PlanningRun
from tests.devices.factories import profile_payload

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_run_page_updates_in_place(
    browser_page, live_server, make_user, settings, tmp_path, screenshots_dir
):
    settings.OPTUNA_STORAGE_URL = f"sqlite:///{tmp_path / 'optuna.sqlite3'}"
    make_user("stella", role="staff")
    model = BaseModel.objects.create(
        name="demo",
        adapter="tiny-topics",
        fp32_metrics={"accuracy": 0.9},
        spec={
            "name": "demo",
            "tensors": [],
            "n_blocks": 1,
            "exit_points": [0],
            "hidden_size": 8,
            "n_heads": 1,
            "intermediate_size": 8,
            "vocab_size": 8,
        },
    )
    device = DeviceProfile.objects.create(**profile_payload())
    run = PlanningRun.objects.create(
        base_model=model,
        policy={"kind": "max_accuracy"},
        trials_per_device=100,
        real_eval_budget=5,
        trials_planned=100,
        status="running",
        trials_done=10,
    )
    run.device_profiles.set([device])

    page = browser_page
    page.goto(f"{live_server.url}/login/?next=/plans/{run.pk}/")
    page.fill("input[name=username]", "stella")
    page.fill("input[name=password]", "pw-stella")
    page.click("button[type=submit]")
    page.wait_for_selector("#run-progress")
    assert page.inner_text("#trial-count") == "10"
    page.evaluate("window.__sameDocument = true")

    PlanningRun.objects.filter(pk=run.pk).update(trials_done=60)
    HypervolumePoint.objects.create(
        run=run, device_profile=device, trials=50, hypervolume=0.3, at=timezone.now()
    )
    page.wait_for_function("document.getElementById('trial-count').textContent === '60'", timeout=15_000)
    assert page.evaluate("window.__sameDocument === true"), "the page was not reloaded"
    width = page.evaluate("document.querySelector('#run-progress .bar').style.width")
    assert width == "60%"
    page.screenshot(path=str(screenshots_dir / "plan-running.png"), full_page=True)
    assert page.console_errors == []
