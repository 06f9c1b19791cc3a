"""`enroll`: pins the server's signing key, stores the token privately, says why it fails."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from planner import package as pkg
from tests.agent.conftest import DEVICE_ID, ENROLL_KEY, KEY, TOKEN, Agent, FakeServer


def test_enroll_pins_the_signing_key_and_keeps_the_token_private(agent: Agent, server: FakeServer) -> None:
    code, out, _ = agent.run(
        "enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "bench-box", "--profile", "pixel-9"
    )
    assert code == 0
    info = pkg.signing_key_info(KEY)
    assert out == {
        "ok": True,
        "command": "enroll",
        "device_id": DEVICE_ID,
        "profile": "pixel-9",
        "channel": "stable",
        "server": server.url,
        "config_url": "/api/v1/device/config",
        "key_id": info["key_id"],
        "state_dir": str(agent.state_dir),
    }
    token = agent.state_dir / "token"
    assert token.read_text().strip() == TOKEN
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(agent.state_dir.stat().st_mode) == 0o700
    state = json.loads((agent.state_dir / "state.json").read_text())
    assert state["public_key"] == info["public_key"] and TOKEN not in json.dumps(state)
    # The key is fetched (and checked) before the enrollment key is spent.
    assert [p for _, p, _ in server.requests] == ["/api/v1/signing-key", "/api/v1/device/enroll"]


def test_a_wrong_enrollment_key_is_a_credentials_error(agent: Agent, server: FakeServer) -> None:
    code, out, err = agent.run("enroll", "--server", server.url, "--key", "efe_wrong", "--name", "x")
    assert code == 5
    assert out["ok"] is False and out["error"] == "forbidden" and out["status"] == 403
    assert "Unknown or revoked enrollment key" in out["detail"] and "HTTP 403" in err
    assert not (agent.state_dir / "token").exists()


def test_enrolling_twice_needs_force(enrolled: Agent, server: FakeServer) -> None:
    code, out, _ = enrolled.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "again")
    assert (code, out["error"]) == (3, "already-enrolled")
    code, _, _ = enrolled.run(
        "enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "again", "--force"
    )
    assert code == 0


def test_commands_before_enrollment_say_so(agent: Agent) -> None:
    for command in ("sync", "bench", "report"):
        code, out, err = agent.run(command)
        assert (code, out["error"]) == (3, "not-enrolled"), command
        assert "edgefit-agent enroll" in err


def test_an_unreachable_server_is_retried_then_reported(agent: Agent) -> None:
    code, out, _ = agent.run(
        "enroll", "--server", "http://127.0.0.1:9", "--key", ENROLL_KEY, "--name", "x", "--retries", "2"
    )
    assert (code, out["error"]) == (4, "network")
    assert len(agent.sleeps) == 2 and "after 3 attempts" in out["detail"]


def test_profile_measures_this_host(agent: Agent) -> None:
    code, out, _ = agent.run("profile", "--quick", "--repeats", "1")
    assert code == 0
    hw = out["hardware"]
    assert hw["ram_total_bytes"] > 0 and hw["bandwidth_gbs"] > 0 and hw["fp32_tflops"] > 0
    assert json.loads((agent.state_dir / "hardware.json").read_text()) == hw


def test_the_agent_runs_as_a_module_without_django() -> None:
    code = (
        "import sys, devices.agent.cli, devices.agent.commands; "
        "print(sorted(m for m in ('django', 'rest_framework', 'celery', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "devices.agent", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "enroll" in helped.stdout and "report" in helped.stdout


def test_the_console_script_is_declared() -> None:
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["edgefit-agent"] == "devices.agent.cli:main"
