"""`bench` runs the shipped check set with real kernels; `report` posts it in the contract's body."""

from __future__ import annotations

import io

import pytest

from devices.agent.client import Client
from devices.agent.progress import Progress
from planner import package as pkg
from planner.runtime import KERNEL_W8A8_FUSED, KERNEL_W8A16_FUSED
from tests.agent.conftest import MEASUREMENT_FIELDS, Agent, FakeServer


def test_bench_then_report(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFIT_W8A8", "1")  # the kernels below, whatever this host's int8 speed
    b = server.publish(packages["b"])
    assert enrolled.run("sync")[0] == 0

    code, out, _ = enrolled.run("bench", "--rounds", "2", "--threads", "1")
    assert code == 0
    m = out["measurement"]
    assert set(m) == MEASUREMENT_FIELDS
    assert m["package_digest"] == b and m["batch_size"] == 1 and m["check_examples"] == 24
    assert 0 < m["latency_p50_ms"] <= m["latency_p90_ms"] < 600_000
    assert 0 <= m["check_accuracy"] <= 1 and 0 <= m["check_agreement"] <= 1
    assert m["peak_memory_bytes"] > out["summary"]["weights_bytes"] > 0
    assert len(m["samples"]) == 24
    n_blocks = out["summary"]["n_blocks"]
    for s in m["samples"]:
        assert set(s) == {"tokens", "exit_layer", "latency_ms"}
        assert 1 <= s["tokens"] <= 4096 and 0 <= s["exit_layer"] < n_blocks and s["latency_ms"] > 0
    assert m["runtime"]["threads"] == 1 and set(m["runtime"]) == {
        "torch",
        "threads",
        "kernels",
        "regimes",
        "host",
    }
    regimes = m["runtime"]["regimes"]
    assert len(regimes) == 15 and set(regimes.values()) == {"w8a8-fused", "w8a16-fused", "gather"}
    # int4 weights widened to int8 at load, every block's Linears run as one fused W8A8 block
    # (Q/K/V on two-digit inputs)
    kernels = m["runtime"]["kernels"]
    assert kernels[KERNEL_W8A8_FUSED] == 6
    assert kernels[KERNEL_W8A16_FUSED] == 6
    assert m["measured_at"].endswith("Z")

    code, out, _ = enrolled.run("report")
    assert (code, out["id"], out["recalibration"], out["package_digest"]) == (0, 1, "queued", b)
    assert server.measurements == [m] and out["replayed"] is False

    code, out, _ = enrolled.run("report")
    assert (code, out["error"]) == (3, "already-reported")
    # Sent again, under the key kept with the measurement: the server answers with the stored one.
    code, out, _ = enrolled.run("report", "--force")
    assert (code, out["id"], out["replayed"]) == (0, 1, True)
    assert server.measurements == [m]


def test_bench_needs_a_package(enrolled: Agent) -> None:
    code, out, _ = enrolled.run("bench")
    assert (code, out["error"]) == (3, "no-package")


def test_bench_on_a_host_without_fast_int8_runs_fp32_and_says_why(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    import planner.runtime

    slow = planner.runtime.Int8MatmulProbe(64, 384, 1536, int8_s=13e-3, fp32_s=0.55e-3, threads=1)
    asked: list[int | None] = []

    def probe(*args: object, threads: int | None = None, **kwargs: object) -> object:
        asked.append(threads)
        return slow

    monkeypatch.setattr(planner.runtime, "probe_int8_matmul", probe)
    server.publish(packages["b"])
    assert enrolled.run("sync")[0] == 0
    code, out, _ = enrolled.run("bench", "--rounds", "1", "--threads", "1")
    assert code == 0
    assert asked == [1]  # decided at the thread count the check set is measured at
    assert out["summary"]["w8a8"].startswith("fp32 on dequantized weights: int8 GEMMs are not faster")
    runtime = out["measurement"]["runtime"]
    assert runtime["kernels"]["dequantized-at-load fp32"] == 12  # every Linear of both blocks
    assert "w8a8-fused" not in runtime["regimes"].values()  # the server fits what really ran

    monkeypatch.setenv("EDGEFIT_W8A8", "sometimes")
    code, out, _ = enrolled.run("bench", "--rounds", "1")
    assert (code, out["error"]) == (3, "bad-argument") and "EDGEFIT_W8A8 must be 1, 0 or auto" in out[
        "detail"
    ]


def test_a_rejected_measurement_names_the_field(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    import json

    server.publish(packages["a"])
    enrolled.run("sync")
    enrolled.run("bench", "--rounds", "1", "--threads", "1")
    path = enrolled.state_dir / "last_bench.json"
    record = json.loads(path.read_text())
    record["measurement"]["surprise"] = 1
    path.write_text(json.dumps(record))
    code, out, _ = enrolled.run("report")
    assert (code, out["error"], out["status"]) == (4, "rejected", 400)
    assert "surprise" in out["detail"]


def test_retry_after_may_be_an_http_date() -> None:
    client = Client("http://example.invalid", rand=lambda: 0.0)
    assert client._delay(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: retry now
    assert client._delay(0, "7") == 7.0
    assert client._delay(3, None) == 2.0  # half of min(30, 0.5 · 2^3), no jitter


@pytest.mark.parametrize(
    "garbage",
    ["nan", "NaN", "inf", "-inf", "soon", "Wed, 99 Foo 2015 07:28:00 GMT", "Mon, 32 Jan 2024 99:99:99"],
)
def test_a_garbage_retry_after_falls_back_to_the_agents_own_backoff(garbage: str) -> None:
    client = Client("http://example.invalid", rand=lambda: 0.0)
    assert client._delay(3, garbage) == 2.0  # as without the header


def test_the_progress_bar_draws_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = Progress("download", 2_000_000, enabled=Progress.wanted(False, tty), stream=tty)
    bar.update(2_000_000)
    bar.close()
    assert "100%" in tty.getvalue() and "2.0 MB/2.0 MB" in tty.getvalue()
    assert not Progress.wanted(False, io.StringIO()) and not Progress.wanted(True, tty)
