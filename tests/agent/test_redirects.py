"""Redirects are refused with a clear error: the device token never leaves the enrolled server,
and a POST is never turned into a GET."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from devices.agent.client import Client
from devices.agent.errors import EXIT_SERVER, AgentError

TOKEN = "efd_secret-device-token"


class Recorder(ThreadingHTTPServer):
    """A local server that logs (method, path, Authorization, body) and answers `answer`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str, str | None, bytes]] = []
        self.answer: tuple[int, dict[str, str]] = (200, {})
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
        status, headers = self.server.answer
        payload = b'{"ok": true}'
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle


def _serve() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def enrolled_server() -> Iterator[Recorder]:
    yield from _serve()


@pytest.fixture
def elsewhere() -> Iterator[Recorder]:
    yield from _serve()


def _client(server: Recorder) -> Client:
    return Client(server.url, token=TOKEN, retries=0, sleep=lambda s: None)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_server_is_refused_and_the_token_never_reaches_it(
    enrolled_server: Recorder, elsewhere: Recorder, status: int
) -> None:
    enrolled_server.answer = (status, {"Location": f"{elsewhere.url}/collect"})
    with pytest.raises(AgentError) as refused:
        _client(enrolled_server).request("GET", "/api/v1/device/config")
    error = refused.value
    assert error.code == "redirect" and error.exit_code == EXIT_SERVER and error.extra["status"] == status
    assert f"HTTP {status}, redirecting to {elsewhere.url}/collect" in error.message
    assert elsewhere.seen == []
    assert [(m, p, a) for m, p, a, _ in enrolled_server.seen] == [
        ("GET", "/api/v1/device/config", f"Bearer {TOKEN}")
    ]


@pytest.mark.parametrize("status", [301, 302])
def test_a_redirected_post_is_refused_never_resent_as_a_get_without_its_body(
    enrolled_server: Recorder, elsewhere: Recorder, status: int
) -> None:
    enrolled_server.answer = (status, {"Location": f"{elsewhere.url}/api/v1/device/measurements"})
    with pytest.raises(AgentError) as refused:
        _client(enrolled_server).request("POST", "/api/v1/device/measurements", body={"latency_p50_ms": 3.0})
    assert refused.value.code == "redirect" and "POST " in refused.value.message
    assert elsewhere.seen == []
    assert [(m, b) for m, _, _, b in enrolled_server.seen] == [("POST", b'{"latency_p50_ms": 3.0}')]


def test_a_redirect_on_the_same_server_is_refused_too(enrolled_server: Recorder) -> None:
    enrolled_server.answer = (302, {"Location": "/api/v1/device/config/"})
    with pytest.raises(AgentError) as refused:
        _client(enrolled_server).request("GET", "/api/v1/device/config")
    assert refused.value.code == "redirect"
    assert len(enrolled_server.seen) == 1  # not followed


def test_a_redirected_download_is_refused(
    enrolled_server: Recorder, elsewhere: Recorder, tmp_path: Path
) -> None:
    enrolled_server.answer = (302, {"Location": f"{elsewhere.url}/blob"})
    with pytest.raises(AgentError) as refused:
        _client(enrolled_server).download(
            "/api/v1/packages/x/model.safetensors", tmp_path / "blob.part", size=10
        )
    assert refused.value.code == "redirect"
    assert elsewhere.seen == []
