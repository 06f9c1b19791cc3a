"""The compare page's JavaScript (static/js/whatif.js) recommends exactly as the planner does:
the same fixture through `registry.dashboard.recommendation` (planner.recommend underneath) and
through the browser's `EdgeFitWhatIf.recommendation`, compared field by field."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from django.core.cache import cache
from django.http import QueryDict

from registry import dashboard as dash
from tests.browser.conftest import CHROMIUM_FLAGS
from tests.registry.factories import candidate, demo_fleet, finished_run, make_profile, make_variant

pytestmark = [pytest.mark.browser, pytest.mark.django_db]

WHATIF_JS = Path(__file__).resolve().parents[2] / "static" / "js" / "whatif.js"
QUERIES = [
    "",
    "slo=30",
    "slo=0.5",
    "slo=&loss=",
    "policy=min_latency&loss=5&slo=",
    "policy=min_latency&loss=0.3",
    "policy=min_memory&loss=3&slo=100",
    "policy=min_memory&loss=2&slo=12.5&budget=25",
    "budget=0.5",
    "loss=40&slo=3600000",
    "loss=0&slo=0.001",
]


def _comparable(rec: dict) -> dict:
    chosen = rec.get("chosen")
    return {
        "status": rec["status"],
        "chosen": chosen["key"] if chosen else None,
        "binding": rec.get("binding", ""),
        "reason": rec["reason"],
        "infeasible": rec.get("infeasible", {}),
        "neighbours": [n["key"] for n in rec.get("neighbours", [])],
        "front_keys": rec.get("front_keys", []),
        "feasible_keys": sorted(rec.get("feasible_keys", [])),
        "policy": rec.get("policy", ""),
    }


def test_python_and_javascript_recommend_alike(chromium_path):
    cache.clear()
    fleet = demo_fleet()
    # a busier device: 40 random variants, ties included
    rng = random.Random(7)
    busy = make_profile("Busy E", fleet_share=0.0)
    cands = []
    for i in range(40):
        v = make_variant(fleet["model"], accuracy=round(rng.uniform(0.6, 0.8), 3), name=f"random {i}")
        cands.append(
            candidate(v, latency_ms=round(rng.uniform(1, 60), 1), memory_mib=rng.choice([10, 20, 30, 40]))
        )
    finished_run(fleet["model"], {busy: cands})
    make_profile("Unplanned F", fleet_share=0.1)

    # Python first (Playwright's sync API runs in a greenlet the test database cannot be used from)
    cases = []
    for query in QUERIES:
        data = dash.compare_data(fleet["model"], dash.Params(QueryDict(query)))
        cases.append(
            {
                "query": query,
                "payload": data["payload"],
                "recs": {str(k): _comparable(v) for k, v in data["recs"].items()},
                "fraction": data["coverage"]["fraction"],
                "sentence": data["sentence"],
                "describe": data["policy"].describe(),
            }
        )

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_FLAGS, headless=True
        )
        try:
            page = browser.new_page()
            page.set_content("<html><body></body></html>")
            page.add_script_tag(path=str(WHATIF_JS))
            checked = 0
            for case in cases:
                payload = case["payload"]
                js = page.evaluate(
                    """(payload) => {
                        const W = window.EdgeFitWhatIf;
                        const notices = [];
                        const policy = W.policyFromState(payload.state, notices);
                        const recs = {};
                        payload.devices.forEach(d => {
                            recs[d.id] = W.recommendation(d, policy, payload.model.fp32_accuracy);
                        });
                        const cov = W.coverage(payload.devices, recs);
                        const sentence = W.coverageSentence(cov, policy);
                        return {recs, cov, sentence, describe: W.describe(policy)};
                    }""",
                    payload,
                )
                query = case["query"]
                for device_id, rec in case["recs"].items():
                    assert _comparable(js["recs"][device_id]) == rec, (query, device_id)
                    checked += 1
                assert js["cov"]["fraction"] == pytest.approx(case["fraction"]), query
                assert js["sentence"] == case["sentence"], query
                assert js["describe"] == case["describe"], query
            assert checked == len(QUERIES) * 5
        finally:
            browser.close()


def test_python_style_number_formatting_in_javascript(chromium_path):
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    values = [1.0, 50.0, 12.5, 0.001, 0.0001, 3600000.0, 123456.0, 1234567.0, 0.30000000000000004, 2.5e-05]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_FLAGS, headless=True
        )
        try:
            page = browser.new_page()
            page.set_content("<html><body></body></html>")
            page.add_script_tag(path=str(WHATIF_JS))
            got = page.evaluate("(vs) => vs.map(v => window.EdgeFitWhatIf.format.g(v))", values)
        finally:
            browser.close()
    assert got == [f"{v:g}" for v in values]
