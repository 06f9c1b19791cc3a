"""`sync`: ETag polling, resumable downloads, retries, and refusing any tampered package while
the previous one stays current."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from planner import package as pkg
from tests.agent.conftest import ENROLL_KEY, OTHER_KEY, Agent, FakeServer, Served


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def test_sync_installs_the_package_then_polls_with_the_etag(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    a = server.publish(packages["a"])
    code, out, _ = enrolled.run("sync")
    assert code == 0
    assert out["status"] == "updated" and out["current"] == a and out["previous"] is None
    assert out["bytes_downloaded"] == packages["a"].blob_bytes and out["config"] == "fetched"
    installed = enrolled.state_dir / "packages" / a
    assert sorted(p.name for p in installed.iterdir()) == sorted(pkg.FILE_NAMES)
    assert os.readlink(enrolled.state_dir / "current") == os.path.join("packages", a)
    assert pkg.verify_package(installed, pkg.public_key_hex("11" * 32), a)

    code, out, _ = enrolled.run("sync")
    assert (code, out["status"], out["config"]) == (0, "unchanged", "not-modified")
    config_requests = [h for m, p, h in server.requests if p == "/api/v1/device/config"]
    assert config_requests[-1]["If-None-Match"] == out["etag"]
    assert len(server.paths("GET")) == len(set(server.paths("GET"))) + 1  # only the config twice


def test_without_json_messages_go_to_stderr_and_stdout_stays_empty(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    from devices.agent.cli import main

    a = server.publish(packages["a"])
    enrolled.capsys.readouterr()
    assert main(["sync", "--state-dir", str(enrolled.state_dir)]) == 0
    out, err = enrolled.capsys.readouterr()
    assert out == "" and f"package {a[:16]}… is now current" in err


def test_no_release_means_no_package(enrolled: Agent, server: FakeServer) -> None:
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"], out["digest"], out["current"]) == (0, "no-package", None, None)


def test_a_dropped_download_resumes_with_a_range_request(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    a = server.publish(packages["a"])
    server.drop_blob_after = 12_345
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"]) == (0, "updated")
    blob_requests = [h for _, p, h in server.requests if p.endswith("model.safetensors")]
    assert len(blob_requests) == 2
    assert blob_requests[1]["Range"] == "bytes=12345-"
    assert blob_requests[1]["If-Range"] == f'"{packages["a"].blob_sha256}"'
    assert out["bytes_downloaded"] == packages["a"].blob_bytes
    assert len(enrolled.sleeps) == 1
    assert (enrolled.state_dir / "packages" / a / "model.safetensors").read_bytes() == server.packages[a].blob


def test_a_part_file_from_an_earlier_run_is_resumed(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    a = server.publish(packages["a"])
    staged = enrolled.state_dir / "staging" / a
    staged.mkdir(parents=True)
    half = packages["a"].blob_bytes // 2
    (staged / "model.safetensors.part").write_bytes(server.packages[a].blob[:half])
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"], out["resumed_from"]) == (0, "updated", half)
    assert out["bytes_downloaded"] == packages["a"].blob_bytes - half
    assert not staged.exists()


def test_429_is_retried_after_the_time_the_server_asks(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    server.publish(packages["a"])
    server.throttle_config = ["3"]
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"]) == (0, "updated")
    assert len(enrolled.sleeps) == 1 and 3.0 <= enrolled.sleeps[0] <= 3.3
    assert out["retries"][0]["reason"].endswith("HTTP 429")


def test_5xx_is_retried_with_growing_backoff(enrolled: Agent, server: FakeServer) -> None:
    server.fail_config = 3
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"]) == (0, "no-package")
    first, second, third = enrolled.sleeps
    assert 0.25 <= first <= 0.5 and 0.5 <= second <= 1.0 and 1.0 <= third <= 2.0


def test_a_server_that_keeps_failing_is_reported(enrolled: Agent, server: FakeServer) -> None:
    server.fail_config = 10
    code, out, _ = enrolled.run("sync", "--retries", "2")
    assert (code, out["error"], out["status"]) == (4, "server-error", 503)
    assert len(enrolled.sleeps) == 2


def test_a_revoked_token_gets_a_credentials_error(enrolled: Agent, server: FakeServer) -> None:
    server.revoked = True
    code, out, _ = enrolled.run("sync")
    assert (code, out["error"], out["status"]) == (5, "unauthorized", 401)
    assert enrolled.sleeps == []  # 401 is final


def _tamper_blob(s: Served) -> Served:
    return replace(s, blob=_flip(s.blob, len(s.blob) // 2))


def _tamper_manifest(s: Served) -> Served:
    return replace(s, manifest=_flip(s.manifest, 30))


def _other_signature(s: Served) -> Served:
    return replace(s, signature=pkg._sign(s.manifest, OTHER_KEY))


def _longer_blob(s: Served) -> Served:
    return replace(s, blob=s.blob + b"\0" * 100)


def _shorter_blob(s: Served) -> Served:
    return replace(s, blob=s.blob[:-100])


CASES: list[tuple[str, Callable[[Served], Served], str, str]] = [
    # (id, tamper, what the config advertises, reason)
    ("flipped-blob-byte", _tamper_blob, "true", "blob-hash-mismatch"),
    ("flipped-manifest-byte", _tamper_manifest, "true", "digest-mismatch"),
    ("flipped-manifest-byte-under-its-own-digest", _tamper_manifest, "tampered", "bad-signature"),
    ("signature-by-another-key", _other_signature, "true", "bad-signature"),
    ("digest-names-another-package", lambda s: s, "other", "digest-mismatch"),
    ("blob-longer-than-signed", _longer_blob, "true", "blob-size-mismatch"),
    ("blob-shorter-than-signed", _shorter_blob, "true", "blob-size-mismatch"),
]


@pytest.mark.parametrize(
    ("tamper", "advertised", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_tampered_package_is_refused_and_the_previous_one_stays(
    enrolled: Agent,
    server: FakeServer,
    packages: dict[str, pkg.PackageInfo],
    tamper: Callable[[Served], Served],
    advertised: str,
    reason: str,
) -> None:
    a = server.publish(packages["a"])
    assert enrolled.run("sync")[0] == 0
    b_info = packages["b"]
    bad = tamper(Served.of(b_info))
    digest = {
        "true": b_info.digest,
        "tampered": hashlib.sha256(bad.manifest).hexdigest(),
        "other": "f" * 64,
    }[advertised]
    server.publish(b_info, bad, digest)

    code, out, err = enrolled.run("sync")
    assert code == 6
    assert out["ok"] is False and out["error"] == "package-refused"
    assert (out["reason"], out["digest"], out["current"]) == (reason, digest, a)
    assert "refused" in err and reason in err
    assert os.readlink(enrolled.state_dir / "current") == os.path.join("packages", a)
    assert sorted(p.name for p in (enrolled.state_dir / "packages").iterdir()) == [a]

    code, out, _ = enrolled.run("status")
    assert out["current"] == a


def test_after_a_refused_blob_the_next_sync_downloads_it_afresh(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    server.publish(packages["a"])
    enrolled.run("sync")
    b = server.publish(packages["b"], _tamper_blob(Served.of(packages["b"])))
    assert enrolled.run("sync")[1]["reason"] == "blob-hash-mismatch"
    server.publish(packages["b"])  # the server is fixed
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"], out["current"], out["resumed_from"]) == (0, "updated", b, 0)


def test_a_rollback_switches_to_the_kept_package_without_downloading(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    a = server.publish(packages["a"])
    enrolled.run("sync")
    b = server.publish(packages["b"])
    code, out, _ = enrolled.run("sync")
    assert (out["status"], out["current"], out["previous"]) == ("updated", b, a)
    server.config_digest = a
    blob_gets = len([p for p in server.paths("GET") if p.endswith("model.safetensors")])
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"], out["current"], out["previous"]) == (0, "switched", a, b)
    assert len([p for p in server.paths("GET") if p.endswith("model.safetensors")]) == blob_gets


@pytest.mark.parametrize(
    "url",
    [
        "https://elsewhere.example/api/v1/packages/x/manifest.json",
        "//elsewhere.example/steal",
        "http://127.0.0.1:1/other-port",
        "https://127.0.0.1/other-scheme",
    ],
)
def test_urls_off_the_enrolled_server_are_refused_before_the_token_is_sent(url: str) -> None:
    from devices.agent.client import Client
    from devices.agent.errors import AgentError

    client = Client("http://127.0.0.1:8000", token="efd_secret")
    assert client.url("/api/v1/device/config") == "http://127.0.0.1:8000/api/v1/device/config"
    assert client.url("http://127.0.0.1:8000/a") == "http://127.0.0.1:8000/a"
    with pytest.raises(AgentError) as refused:
        client.request("GET", url)
    assert refused.value.code == "bad-response" and "not on the enrolled server" in str(refused.value)


def _partial_download(agent: Agent, digest: str, data: bytes = b"x" * 1000) -> Path:
    staged = agent.state_dir / "staging" / digest
    staged.mkdir(parents=True, exist_ok=True)
    (staged / "model.safetensors.part").write_bytes(data)
    return staged


def test_a_partial_download_of_a_digest_no_longer_wanted_is_deleted(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    abandoned = _partial_download(enrolled, "f" * 64)  # the release was replaced mid-download
    b = server.publish(packages["b"])
    half = packages["b"].blob_bytes // 2
    wanted = _partial_download(enrolled, b, server.packages[b].blob[:half])
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"], out["resumed_from"]) == (0, "updated", half)  # its own: resumed
    assert out["pruned"] == [f"staging/{'f' * 64}"]
    assert not abandoned.exists() and not wanted.exists()  # (installed: moved to packages/)
    assert sorted(p.name for p in (enrolled.state_dir / "staging").iterdir()) == []


def test_an_unchanged_or_empty_config_drops_abandoned_partial_downloads(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo]
) -> None:
    abandoned = _partial_download(enrolled, "e" * 64)
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"], out["pruned"]) == (0, "no-package", [f"staging/{'e' * 64}"])
    a = server.publish(packages["a"])
    assert enrolled.run("sync")[1]["status"] == "updated"
    b = server.publish(packages["b"])
    _partial_download(enrolled, b)  # b's download began, then the release was rolled back to a
    server.config_digest = a
    code, out, _ = enrolled.run("sync")
    assert (code, out["status"], out["pruned"]) == (0, "unchanged", [f"staging/{b}"])
    assert not abandoned.exists() and not (enrolled.state_dir / "staging" / b).exists()


def test_prune_keeps_current_previous_and_the_download_in_progress(tmp_path: Path) -> None:
    from devices.agent.state import AgentState

    state = AgentState(tmp_path)
    state.ensure()
    for digest in ("cur", "prev", "old"):
        state.package_dir(digest).mkdir()
    for digest in ("downloading", "stale"):
        state.staging(digest).mkdir()
    assert state.prune({"cur", "prev"}, downloading="downloading") == ["old", "staging/stale"]
    assert sorted(p.name for p in state.packages_dir.iterdir()) == ["cur", "prev"]
    assert [p.name for p in state.staging_dir.iterdir()] == ["downloading"]


@pytest.mark.parametrize("command", ["sync", "bench", "report", "profile", "enroll"])
def test_a_second_state_changing_command_is_refused_while_one_runs(
    enrolled: Agent, server: FakeServer, packages: dict[str, pkg.PackageInfo], command: str
) -> None:
    # Two syncs at once each pruned the other's partial download and raced to switch `current`.
    from filelock import FileLock

    server.publish(packages["a"])

    def files() -> list[Path]:
        return sorted(
            p.relative_to(enrolled.state_dir) for p in enrolled.state_dir.rglob("*") if p.name != ".lock"
        )

    before = files()
    requests = len(server.requests)
    args = [command]
    if command == "enroll":
        args += ["--server", server.url, "--key", ENROLL_KEY, "--name", "again", "--force"]
    with FileLock(enrolled.state_dir / ".lock"):  # another agent process's command
        code, out, _ = enrolled.run(*args)
    assert code == 75  # EX_TEMPFAIL: not 3, which also means "not enrolled" / "no package"
    assert out["error"] == "busy" and str(enrolled.state_dir) in out["detail"]
    assert len(server.requests) == requests, "nothing sent"
    assert files() == before, "nothing changed"
    code, out, _ = enrolled.run("sync")  # once it has finished, the next one runs
    assert (code, out["status"]) == (0, "updated")


def test_two_first_enrollments_at_once_register_one_device(agent: Agent, server: FakeServer) -> None:
    # The state directory did not exist yet: the first enroll makes it (0700) and takes the lock.
    from filelock import FileLock

    assert not agent.state_dir.exists()
    agent.state_dir.mkdir(mode=0o700)
    with FileLock(agent.state_dir / ".lock"):
        code, out, _ = agent.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "b")
    assert (code, out["error"]) == (75, "busy") and server.enrollments == []
    code, _, _ = agent.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "b")
    assert code == 0 and len(server.enrollments) == 1


def test_a_missing_state_directory_is_made_private_before_it_is_locked(
    agent: Agent, server: FakeServer
) -> None:
    assert not agent.state_dir.exists()
    code, _, _ = agent.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "b")
    assert code == 0
    assert (agent.state_dir.stat().st_mode & 0o777) == 0o700
    assert ((agent.state_dir / ".lock").stat().st_mode & 0o777) == 0o600
