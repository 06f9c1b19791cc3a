"""The dashboard in a real browser: every page opens without a console error (screenshots of
each), the what-if controls re-compute recommendations and coverage in place, the view's state
lives in the URL, CSV and package downloads work, and a plan started from the form shows its
progress move."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import quote

import pytest
from django.core.cache import cache

from registry.models import Package, PlanningRun, Release
from tests.registry.factories import demo_fleet

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _login(page, live_server, username: str, next_url: str = "/") -> None:
    page.goto(f"{live_server.url}/login/?next={quote(next_url)}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", f"pw-{username}")
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")


def _package(fleet, tmp_path: Path) -> Package:
    files = {
        "manifest.json": b'{"format": 1}',
        "manifest.sig": b"sig",
        "model.safetensors": b"\x00\x01" * 4096,
    }
    digest = hashlib.sha256(files["manifest.json"]).hexdigest()
    folder = tmp_path / digest
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    package = Package.objects.create(
        digest=digest,
        variant=fleet["full"],
        manifest={"format": 1},
        manifest_bytes=len(files["manifest.json"]),
        blob_bytes=len(files["model.safetensors"]),
        blob_sha256=hashlib.sha256(files["model.safetensors"]).hexdigest(),
        predicted_bytes=len(files["model.safetensors"]),
        signature="ab" * 64,
        key_id="0123456789abcdef",
        build_seconds=0.2,
        storage_path=str(folder),
    )
    Release.objects.create(
        profile=fleet["phone"],
        alias="stable",
        variant=fleet["full"],
        package=package,
        rollout_percent=100,
        seed="s",
        status="active",
    )
    return package


def test_every_dashboard_page_opens_without_console_errors(
    browser_page, live_server, make_user, screenshots_dir, tmp_path
):
    cache.clear()
    make_user("stella", role="staff")
    fleet = demo_fleet()
    _package(fleet, tmp_path)
    page = browser_page
    _login(page, live_server, "stella", "/overview/")
    pages = {
        "overview": ("/overview/", "#overview-matrix"),
        "model": (
            f"/models/{fleet['model'].slug}/?device={fleet['phone'].slug}",
            "#chart-heatmap[data-rendered='1']",
        ),
        "variant": (f"/variants/{fleet['full'].pk}/", "#chart-plan-heatmap[data-rendered='1']"),
        "device-with-front": (
            f"/devices/{fleet['phone'].slug}/",
            f"#chart-front-{fleet['model'].pk}[data-rendered='1']",
        ),
        "device-infeasible": (f"/devices/{fleet['watch'].slug}/", "#chart-roofline[data-rendered='1']"),
        "compare": (
            f"/compare/?devices={fleet['phone'].slug},{fleet['board'].slug}&variants={fleet['full'].pk},{fleet['exit'].pk}",
            "body[data-whatif-ready='1']",
        ),
        "models": ("/models/", "#model-table"),
        "devices": ("/devices/", "#device-table"),
        "plans": ("/plans/", "#new-run"),
        "releases": ("/releases/", "h1"),
        "not-found": ("/variants/999999/", "text=Back to the device list"),
    }
    for name, (url, ready) in pages.items():
        page.goto(f"{live_server.url}{url}")
        page.wait_for_selector(ready, timeout=15_000)
        page.screenshot(path=str(screenshots_dir / f"dashboard-{name}.png"), full_page=True)
        if name == "not-found":  # the browser logs the document's own 404 status, nothing else
            assert all("status of 404" in e for e in page.console_errors), page.console_errors
            page.console_errors.clear()
        assert page.console_errors == [], f"{name}: {page.console_errors}"
    # the model page's exit-rate and sensitivity charts render too
    page.goto(f"{live_server.url}/models/{fleet['model'].slug}/")
    for chart in ("heatmap", "sensitivity", "exits"):
        page.wait_for_selector(f"#chart-{chart}[data-rendered='1']", timeout=15_000)
    assert page.console_errors == []


def test_what_if_controls_recompute_recommendations_and_coverage_in_place(
    browser_page, live_server, make_user, screenshots_dir
):
    cache.clear()
    make_user("victor", role="viewer")
    fleet = demo_fleet()
    page = browser_page
    _login(page, live_server, "victor", "/compare/")
    page.wait_for_selector("body[data-whatif-ready='1']")
    page.evaluate("window.__sameDocument = true")
    coverage = page.locator("#whatif-coverage")
    assert (
        coverage.inner_text()
        == "80 % of the fleet gets a package within 1 point of full accuracy under 50 ms"
    )
    phone_row = page.locator(f"#fleet-table tr[data-device='{fleet['phone'].slug}']")
    assert phone_row.get_attribute("data-chosen") == fleet["full"].plan_hash

    page.fill("#slo", "30")
    page.wait_for_function(
        "document.getElementById('whatif-coverage').textContent.startsWith('50 %')", timeout=5_000
    )
    assert phone_row.get_attribute("data-chosen") == fleet["mid"].plan_hash, (
        "the phone now gets the faster variant"
    )
    board_row = page.locator(f"#fleet-table tr[data-device='{fleet['board'].slug}']")
    assert board_row.get_attribute("data-status") == "infeasible"
    assert "fastest variant takes 45.00 ms" in board_row.inner_text()
    assert page.evaluate("window.__sameDocument === true"), "no reload"
    assert "slo=30" in page.url

    page.select_option("#policy", "min_latency")
    page.fill("#loss", "5")
    page.wait_for_function(
        f"document.querySelector(\"#fleet-table tr[data-device='{fleet['phone'].slug}']\").dataset.chosen"
        f" === '{fleet['small'].plan_hash}'",
        timeout=5_000,
    )
    page.click("#whatif details summary")
    page.check(f"input[name=pick_device][value='{fleet['phone'].slug}']")
    page.check(f"input[name=pick_device][value='{fleet['board'].slug}']")
    page.check(f"input[name=pick_variant][value='{fleet['exit'].pk}']")
    page.wait_for_selector("#device-cards .card >> nth=1")
    page.wait_for_selector(f"#variant-cards .card[data-variant='{fleet['exit'].pk}']")
    shared = page.url
    assert "policy=min_latency" in shared and f"variants={fleet['exit'].pk}" in shared
    page.screenshot(path=str(screenshots_dir / "dashboard-compare-what-if.png"), full_page=True)

    # the shared URL opens on the same state, rendered by the server first
    page.goto(shared)
    page.wait_for_selector("body[data-whatif-ready='1']")
    assert page.locator("#policy").input_value() == "min_latency"
    assert (
        page.locator(f"#fleet-table tr[data-device='{fleet['phone'].slug}']").get_attribute("data-chosen")
        == fleet["small"].plan_hash
    )
    assert page.locator("#device-cards .card").count() == 2

    # the CSV follows the what-if
    with page.expect_download() as download_info:
        page.click("#compare-csv")
    body = Path(download_info.value.path()).read_text()
    assert "all int4" in body.splitlines()[1] or "all int4" in body
    assert page.console_errors == []


def test_bad_what_if_values_show_the_defaults_and_a_notice(browser_page, live_server, make_user):
    cache.clear()
    make_user("victor", role="viewer")
    demo_fleet()
    page = browser_page
    _login(page, live_server, "victor", "/compare/?slo=fast&policy=cheapest&loss=-4")
    page.wait_for_selector("body[data-whatif-ready='1']")
    assert page.locator(".notice").count() >= 3
    assert page.locator("#whatif-coverage").inner_text().startswith("80 %")
    page.fill("#loss", "500")
    page.wait_for_selector("#whatif-notices .notice")
    assert "Accuracy floor" in page.locator("#whatif-notices").inner_text()
    assert page.console_errors == []


def test_a_package_downloads_from_the_variant_page(browser_page, live_server, make_user, tmp_path):
    cache.clear()
    make_user("victor", role="viewer")
    fleet = demo_fleet()
    package = _package(fleet, tmp_path)
    page = browser_page
    _login(page, live_server, "victor", f"/variants/{fleet['full'].pk}/")
    page.wait_for_selector("#package-table")
    with page.expect_download() as download_info:
        page.click("#package-table a.download")
    data = Path(download_info.value.path()).read_bytes()
    assert hashlib.sha256(data).hexdigest() == package.blob_sha256
    assert page.console_errors == []


def test_a_plan_started_from_the_form_shows_its_progress_move(
    browser_page, live_server, make_user, screenshots_dir, monkeypatch
):
    from celery import current_app

    queued: list[int] = []

    class _Signature:
        def __init__(self, name: str, args: list[int]) -> None:
            self.args = args

        def delay(self) -> None:
            queued.append(self.args[0])  # the worker's part is played by the test below

    monkeypatch.setattr(current_app, "signature", lambda name, args: _Signature(name, args))
    cache.clear()
    make_user("stella", role="staff")
    fleet = demo_fleet()
    page = browser_page
    _login(page, live_server, "stella", "/plans/")
    page.select_option("select[name=base_model]", str(fleet["model"].pk))
    page.check(f"input[name=device_profiles][value='{fleet['phone'].pk}']")
    page.fill("input[name=trials_per_device]", "40")
    page.fill("input[name=real_eval_budget]", "2")
    page.click("#new-run button[type=submit]")
    page.wait_for_selector("#run-progress")
    run = PlanningRun.objects.order_by("-pk").first()
    assert run is not None and queued == [run.pk]
    assert page.inner_text("#run-status") == "queued"
    page.evaluate("window.__sameDocument = true")

    # what a worker records as it goes
    PlanningRun.objects.filter(pk=run.pk).update(status="running", trials_done=20)
    page.wait_for_function("document.getElementById('trial-count').textContent === '20'", timeout=15_000)
    assert page.inner_text("#run-status") == "running"
    assert page.evaluate("document.querySelector('#run-progress .bar').style.width") == "50%"
    assert page.evaluate("window.__sameDocument === true")
    page.screenshot(path=str(screenshots_dir / "dashboard-plan-progress.png"), full_page=True)
    assert page.console_errors == []
