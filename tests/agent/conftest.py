"""A fake EdgeFit server (stdlib ThreadingHTTPServer) speaking docs/delivery.md, and packages
built from the tiny model, for agent tests that need no Django and no network."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from devices.agent.cli import main
from planner import package as pkg
from planner.builtin import Bundle, load_bundle
from planner.specs import Plan, TensorScheme

KEY = "11" * 32
OTHER_KEY = "22" * 32
ENROLL_KEY = "efe_fleet-key"
TOKEN = "efd_device-token"
DEVICE_ID = "0b7c5d1e-1111-4222-8333-444455556666"
MEASUREMENT_FIELDS = {
    "package_digest",
    "batch_size",
    "latency_p50_ms",
    "latency_p90_ms",
    "peak_memory_bytes",
    "check_accuracy",
    "check_agreement",
    "check_examples",
    "samples",
    "runtime",
    "measured_at",
}


@dataclass
class Served:
    """The three files served for one digest (tests may tamper with the bytes)."""

    manifest: bytes
    signature: bytes
    blob: bytes

    @classmethod
    def of(cls, info: pkg.PackageInfo) -> Served:
        return cls(
            info.file(pkg.MANIFEST_NAME).read_bytes(),
            info.file(pkg.SIGNATURE_NAME).read_bytes(),
            info.file(pkg.BLOB_NAME).read_bytes(),
        )


@dataclass
class FakeServer:
    """State and knobs of the fake server; `requests` logs (method, path, headers)."""

    url: str = ""
    packages: dict[str, Served] = field(default_factory=dict)
    config_digest: str | None = None
    throttle_config: list[str] = field(default_factory=list)  # Retry-After values, one 429 each
    fail_config: int = 0  # this many 503s (no Retry-After) before answering
    drop_blob_after: int | None = None  # first blob answer stops after this many bytes
    revoked: bool = False
    # One entry per POST to come: store it, then answer "503" or "drop" the connection unanswered
    # (the server committed; the agent never hears of it).
    fail_after_commit: list[str] = field(default_factory=list)
    fail_posts: int = 0  # this many POSTs answered 503 before anything is stored
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    enrollments: list[dict[str, Any]] = field(default_factory=list)
    # Idempotency-Key → (index in measurements / enrollments, body): what the server stored.
    measurement_keys: dict[str, tuple[int, Any]] = field(default_factory=dict)
    enrollment_keys: dict[str, tuple[int, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, info: pkg.PackageInfo, served: Served | None = None, digest: str | None = None) -> str:
        digest = digest or info.digest
        self.packages[digest] = served or Served.of(info)
        self.config_digest = digest
        return digest

    def config(self) -> dict[str, Any]:
        package = None
        if self.config_digest is not None:
            d = self.config_digest
            served = self.packages[d]
            package = {
                "digest": d,
                "size": len(served.blob),
                "manifest_url": f"/api/v1/packages/{d}/manifest.json",
                "signature_url": f"/api/v1/packages/{d}/manifest.sig",
                "blob_url": f"/api/v1/packages/{d}/model.safetensors",
                "signature": served.signature.hex(),
                "key_id": pkg.signing_key_info(KEY)["key_id"],
                "model": "tiny-topics",
                "variant_id": 1,
                "release_id": 1,
                "precision_summary": {},
            }
        return {
            "device_id": DEVICE_ID,
            "profile": "host-test",
            "channel": "stable",
            "package": package,
            "poll_interval_s": 300,
            "poll_jitter_s": 60,
        }

    def paths(self, method: str) -> list[str]:
        return [p for m, p, _ in self.requests if m == method]

    def keys(self, path: str) -> list[str | None]:
        """The Idempotency-Key of every POST to `path`, in order (None: sent without one)."""
        return [h.get("Idempotency-Key") for m, p, h in self.requests if m == "POST" and p == path]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(
            status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _device(self) -> bool:
        fake = self.server.fake
        if fake.revoked or self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._json(401, {"detail": "Invalid or revoked device token."})
            return False
        return True

    def do_GET(self) -> None:
        fake = self.server.fake
        with fake.lock:
            fake.requests.append(("GET", self.path, dict(self.headers)))
        if self.path == "/api/v1/signing-key":
            return self._json(200, pkg.signing_key_info(KEY))
        if self.path == "/api/v1/device/config":
            if not self._device():
                return None
            if fake.throttle_config:
                return self._json(429, {"detail": "throttled"}, {"Retry-After": fake.throttle_config.pop(0)})
            if fake.fail_config:
                fake.fail_config -= 1
                return self._json(503, {"detail": "busy"})
            body = json.dumps(fake.config(), sort_keys=True).encode()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            if self.headers.get("If-None-Match") == etag:
                return self._send(304, b"", {"ETag": etag})
            return self._send(200, body, {"ETag": etag, "Content-Type": "application/json"})
        parts = self.path.strip("/").split("/")
        if len(parts) == 5 and parts[:3] == ["api", "v1", "packages"]:
            if not self._device():
                return None
            served = fake.packages.get(parts[3])
            name = parts[4]
            if served is None or name not in pkg.FILE_NAMES:
                return self._json(404, {"detail": "Not found."})
            data = {
                pkg.MANIFEST_NAME: served.manifest,
                pkg.SIGNATURE_NAME: served.signature,
                pkg.BLOB_NAME: served.blob,
            }[name]
            return self._file(data)
        return self._json(404, {"detail": "Not found."})

    def _file(self, data: bytes) -> None:
        fake = self.server.fake
        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "public, max-age=31536000, immutable",
        }
        start = 0
        rng = self.headers.get("Range")
        if rng and (self.headers.get("If-Range") in (None, etag)):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if fake.drop_blob_after is not None and len(data) > 10_000:
            cut, fake.drop_blob_after = fake.drop_blob_after, None
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return None
        return self._send(status, body, headers)

    def do_POST(self) -> None:
        """Enrollment and measurements, stored once per Idempotency-Key as the server does: a
        repeat with the same body answers 200 with what was stored, another body 422."""
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        key = self.headers.get("Idempotency-Key")
        with fake.lock:
            fake.requests.append(("POST", self.path, dict(self.headers)))
            failed, fake.fail_posts = fake.fail_posts > 0, max(0, fake.fail_posts - 1)
        if failed:
            return self._json(503, {"detail": "down for maintenance"})
        if self.path == "/api/v1/device/enroll":
            if body.get("enrollment_key") != ENROLL_KEY:
                return self._json(403, {"detail": "Unknown or revoked enrollment key."})
            answer = {
                "device_id": DEVICE_ID,
                "token": TOKEN,
                "profile": body.get("profile") or "host-test",
                "channel": "stable",
                "config_url": "/api/v1/device/config",
            }
            return self._store(fake.enrollments, fake.enrollment_keys, key, body, lambda _n: answer)
        if self.path == "/api/v1/device/measurements":
            if not self._device():
                return None
            unknown = set(body) - MEASUREMENT_FIELDS
            missing = MEASUREMENT_FIELDS - set(body)
            if unknown or missing:
                field_name = sorted(unknown or missing)[0]
                return self._json(
                    400, {"detail": "Invalid measurement.", "errors": {field_name: ["bad field"]}}
                )
            return self._store(
                fake.measurements,
                fake.measurement_keys,
                key,
                body,
                lambda n: {"id": n + 1, "recalibration": "queued"},
            )
        return self._json(404, {"detail": "Not found."})

    def _store(
        self,
        rows: list[Any],
        keys: dict[str, tuple[int, Any]],
        key: str | None,
        body: Any,
        answer: Callable[[int], dict[str, Any]],
    ) -> None:
        fake = self.server.fake
        with fake.lock:
            if key is not None and key in keys:
                index, stored = keys[key]
                if stored != body:
                    return self._json(422, {"detail": "Idempotency-Key used for another body."})
                return self._json(200, answer(index), {"Idempotent-Replayed": "true"})
            rows.append(body)
            index = len(rows) - 1
            if key is not None:
                keys[key] = (index, body)
            failure = fake.fail_after_commit.pop(0) if fake.fail_after_commit else None
        if failure == "503":
            return self._json(503, {"detail": "upstream timed out"})
        if failure == "drop":
            self.close_connection = True  # stored, and not a byte of an answer
            return None
        return self._json(201, answer(index))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeServer


@pytest.fixture()
def server() -> Iterator[FakeServer]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    fake = FakeServer(url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.fake = fake
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle("tiny-topics", data_dir=tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="session")
def packages(tiny: Bundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pkg.PackageInfo]:
    """Two packages of the tiny model: "a" uniform int8, "b" int4 g32 with early exit."""
    root = tmp_path_factory.mktemp("packages")
    spec = tiny.adapter.spec()
    return {
        "a": pkg.build_package(tiny, Plan.uniform(spec, TensorScheme("int8")), root, signing_key=KEY),
        "b": pkg.build_package(
            tiny, Plan.uniform(spec, TensorScheme("int4", 32), 0.6), root, signing_key=KEY
        ),
    }


@dataclass
class Agent:
    """Runs the agent's CLI in-process against one state dir; sleeps are recorded, not slept."""

    state_dir: Path
    capsys: pytest.CaptureFixture[str]
    sleeps: list[float] = field(default_factory=list)

    def run(self, *args: str) -> tuple[int, dict[str, Any], str]:
        self.capsys.readouterr()
        code = main([*args, "--json", "--state-dir", str(self.state_dir)], sleep=self.sleeps.append)
        out, err = self.capsys.readouterr()
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1, f"--json must print exactly one object, got {out!r}"
        return code, json.loads(lines[0]), err


@pytest.fixture()
def agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Agent:
    return Agent(tmp_path / "state", capsys)


@pytest.fixture()
def enrolled(agent: Agent, server: FakeServer) -> Agent:
    code, out, _ = agent.run("enroll", "--server", server.url, "--key", ENROLL_KEY, "--name", "bench-box")
    assert code == 0, out
    return agent


Tamper = Callable[[Served], Served]
