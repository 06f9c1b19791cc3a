"""A POST the server committed but whose answer was lost is retried under the same
Idempotency-Key, so it is stored once (the fake server keeps one row per key, as the real one)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devices.agent.client import Client
from planner import package as pkg
from tests.agent.conftest import DEVICE_ID, ENROLL_KEY, MEASUREMENT_FIELDS, TOKEN, Agent, FakeServer

MEASUREMENTS = "/api/v1/device/measurements"
ENROLL = "/api/v1/device/enroll"


def _a_bench_record(agent: Agent, **extra: Any) -> dict[str, Any]:
    """A `last_bench.json` as `bench` writes it (no key: as an agent before keys wrote it)."""
    measurement = {name: None for name in MEASUREMENT_FIELDS} | {"package_digest": "ab" * 32}
    record = {"measurement": measurement, "summary": {}, "reported": None, **extra}
    (agent.state_dir / "last_bench.json").write_text(json.dumps(record))
    return record


def _saved_key(agent: Agent) -> str | None:
    return json.loads((agent.state_dir / "last_bench.json").read_text()).get("idempotency_key")


@pytest.mark.parametrize("failure", ["503", "drop"])
def test_a_report_the_server_stored_before_failing_is_stored_once(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo], failure: str
) -> None:
    server.publish(packages["a"])
    assert enrolled.run("sync")[0] == 0
    code, benched, _ = enrolled.run("bench", "--rounds", "1", "--threads", "1")
    assert code == 0
    key = benched["idempotency_key"]
    assert key and _saved_key(enrolled) == key  # made when the record is written

    server.fail_after_commit = [failure]
    code, out, _ = enrolled.run("report")
    assert code == 0, out
    assert server.keys(MEASUREMENTS) == [key, key]  # the retry carried the first attempt's key
    assert server.measurements == [benched["measurement"]]  # one row
    assert (out["id"], out["replayed"], len(out["retries"])) == (1, True, 1)


def test_a_report_re_run_after_it_failed_sends_the_same_key(agent: Agent, server: FakeServer) -> None:
    agent.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "box")
    _a_bench_record(agent)  # written by an older agent: no key
    server.fail_posts = 2
    code, out, _ = agent.run("report", "--retries", "1")
    assert (code, out["error"], out["status"]) == (4, "server-error", 503)
    saved = _saved_key(agent)
    assert saved and server.keys(MEASUREMENTS) == [saved, saved]  # saved before it was sent

    code, out, _ = agent.run("report")  # the run after the outage (or a crash)
    assert (code, out["id"], out["replayed"]) == (0, 1, False)
    assert server.keys(MEASUREMENTS) == [saved] * 3 and len(server.measurements) == 1
    code, out, _ = agent.run("report", "--force")
    assert (code, out["id"], out["replayed"]) == (0, 1, True) and len(server.measurements) == 1


def test_reports_of_two_bench_records_are_two_measurements(agent: Agent, server: FakeServer) -> None:
    agent.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "box")
    _a_bench_record(agent, idempotency_key="first-bench")
    assert agent.run("report")[1]["id"] == 1
    _a_bench_record(agent, idempotency_key="second-bench")
    assert agent.run("report")[1]["id"] == 2
    assert server.keys(MEASUREMENTS) == ["first-bench", "second-bench"]


@pytest.mark.parametrize("failure", ["503", "drop"])
def test_an_enrollment_the_server_stored_before_failing_is_retried_under_its_key(
    agent: Agent, server: FakeServer, failure: str
) -> None:
    server.fail_after_commit = [failure]
    code, out, _ = agent.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "box")
    assert (code, out["device_id"]) == (0, DEVICE_ID)
    first, retry = server.keys(ENROLL)
    assert first and retry == first and len(server.enrollments) == 1
    # Another invocation is another enrollment: a new key.
    agent.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "box", "--force")
    assert server.keys(ENROLL)[2] not in (None, first)


def test_every_post_carries_one_key_for_all_its_attempts(server: FakeServer) -> None:
    client = Client(server.url, TOKEN, sleep=lambda _s: None)
    body = {name: 1 for name in MEASUREMENT_FIELDS}
    server.fail_after_commit = ["503"]
    assert client.request("POST", MEASUREMENTS, body=body, ok=(200, 201)).status == 200
    assert client.request("POST", MEASUREMENTS, body=body, ok=(200, 201)).status == 201
    first, retry, another = server.keys(MEASUREMENTS)
    assert first and retry == first and another not in (None, first)  # a new POST, a new key
    assert len(server.measurements) == 2
