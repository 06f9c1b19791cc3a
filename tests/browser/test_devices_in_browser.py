"""A person logs in, browses the device list and opens a device: no console errors, screenshots."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_login_then_device_list_and_detail(browser_page, live_server, make_user, catalog, screenshots_dir):
    page = browser_page
    make_user("victor", role="viewer")

    page.goto(f"{live_server.url}/devices/")
    assert "/login/" in page.url
    page.fill("input[name=username]", "victor")
    page.fill("input[name=password]", "pw-victor")
    page.click("button[type=submit]")
    page.wait_for_selector("#device-table")
    rows = page.locator("#device-table tbody tr")
    assert rows.count() >= 12
    page.screenshot(path=str(screenshots_dir / "devices.png"), full_page=True)

    page.click("text=RAM (GiB)")
    page.wait_for_url("**sort=ram**")
    assert (
        page.locator("#device-table tbody tr")
        .first.locator("td")
        .first.inner_text()
        .startswith("Google Coral")
    )

    page.click("text=Raspberry Pi 5 (8 GB)")
    page.wait_for_selector("#chart-roofline[data-rendered='1']", timeout=15_000)
    assert page.locator("#profile-sources").inner_text().count("derived:") >= 3
    page.screenshot(path=str(screenshots_dir / "device-detail.png"), full_page=True)
    assert page.console_errors == []
