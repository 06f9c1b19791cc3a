"""Headless Chromium (Debian's) driven by Playwright against pytest-django's live server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("EDGEFIT_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts"))
# Without the background-networking flags Chromium keeps trying to reach Google's hosts on a
# closed network and stalls; the sandbox cannot run as root in CI.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def screenshots_dir() -> Path:
    path = ARTIFACTS / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser_page(chromium_path: str, live_server: object) -> Iterator[object]:
    # Playwright's sync API runs an event loop in this thread; the ORM calls of fixtures and
    # the live server are still synchronous, which Django must be told is fine here.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_FLAGS, headless=True
        )
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.console_errors = []  # type: ignore[attr-defined]
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))  # type: ignore[attr-defined]
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))  # type: ignore[attr-defined]
        try:
            yield page
        finally:
            context.close()
            browser.close()
            # ORM calls the test made while Playwright's loop ran opened a connection of their
            # own context (Django's connections are context-local): left open, it kept the test
            # database from being dropped at the end of the session ("1 other session").
            from django.db import connections

            connections.close_all()
