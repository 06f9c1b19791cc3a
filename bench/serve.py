"""Delivery benchmark: the device config endpoint under load, package build and download.

`python -m bench serve [--json PATH]` starts gunicorn on loopback against PostgreSQL and Redis
(the real stack: `DATABASE_URL`/`REDIS_URL`, defaults 127.0.0.1), seeds a private database with
one device profile, `--devices` enrolled devices and a release of the demo model's package, then
drives `wrk` (Debian package) at `--connections` connections for `--duration` seconds on:

* `GET /api/v1/device/config` with `If-None-Match` of each device's current ETag (the 304 path),
* the same without it (the 200 path, full JSON body),
* `GET /api/v1/ping`, a constant-JSON endpoint of the same server: the ceiling this server,
  middleware and machine reach at all; the config paths are reported as a share of it.

Every request carries a different device's token (round-robin over the devices), so the token
cache and the per-device answer are exercised, not one hot key.  Also measured: the package
build time of the demo model's variant (after the model is loaded), its bytes against the
engine's prediction, and download throughput of the blob over HTTP (Range requests included).

JSON keys: rps_304, rps_200, p99_ms_304, p99_ms_200, ceiling_rps, ceiling_ratio_304,
package_build_seconds, package_bytes, predicted_bytes (plus a few more, stable names).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_DB_NAME = "edgefit_bench_serve"

# wrk's Lua: round-robin over (token, etag) pairs; `done` prints one JSON line wrk's own
# summary format would make us parse.  `REQUESTS_FILE` lines: "<token> <etag or ->".
_WRK_LUA = r"""
local pairs_ = {}
local i = 0
local use_etag = os.getenv("EDGEFIT_WRK_ETAG") == "1"
for line in io.lines(os.getenv("EDGEFIT_WRK_TOKENS")) do
  local tok, etag = line:match("^(%S+)%s+(.+)$")
  table.insert(pairs_, {tok, etag})
end
function setup(thread)
  thread:set("offset", math.random(1, #pairs_))
end
function init(args)
  i = offset or 1
end
function request()
  i = (i % #pairs_) + 1
  local p = pairs_[i]
  local headers = {["Authorization"] = "Bearer " .. p[1]}
  if use_etag then headers["If-None-Match"] = p[2] end
  return wrk.format("GET", nil, headers, nil)
end
function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors_status": %d, "errors_connect": %d, ' ..
    '"errors_read": %d, "errors_timeout": %d, "p50_us": %d, "p99_us": %d, "mean_us": %f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.timeout, latency:percentile(50), latency:percentile(99),
    latency.mean))
end
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run (≥ 20)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (it shares the 2 cores)")
    parser.add_argument("--devices", type=int, default=256, help="enrolled devices the load rotates over")
    parser.add_argument("--workers", type=int, default=3, help="gunicorn worker processes (-k asgi)")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
        help="server to create the private benchmark database on",
    )
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench-serve")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bench_database(server_url: str) -> str:
    """A fresh private database on the PostgreSQL server of `server_url`; its URL."""
    import psycopg

    base = server_url.rsplit("/", 1)[0]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{_DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{_DB_NAME}"')
    return f"{base}/{_DB_NAME}"


def _redis_db(redis_url: str) -> str:
    """Database 14 of the same Redis server, flushed: no keys shared with the product."""
    import redis

    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    url = f"{base}/14"
    redis.Redis.from_url(url).flushdb()
    return url


def _environment(args: argparse.Namespace, db_url: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": db_url,
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "EDGEFIT_VAR_DIR": str(args.workdir),
            "EDGEFIT_DATA_DIR": os.environ.get("EDGEFIT_DATA_DIR", str(ROOT / "var" / "engine")),
            "DJANGO_SETTINGS_MODULE": "config.settings",
            # Load from one client address: the per-device throttle is what is exercised, at a
            # rate no real device would reach (every request here is a different device anyway).
            "EDGEFIT_DEVICE_RATE_LIMIT": "1000000",
            "DJANGO_DEBUG": "false",
        }
    )
    return env


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"bench serve: server did not answer {url} within {timeout:.0f} s")
        time.sleep(0.2)


def _wrk(args: argparse.Namespace, url: str, script: Path, env_extra: dict[str, str]) -> dict[str, Any]:
    cmd = [
        "wrk",
        f"-t{args.wrk_threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, env={**os.environ, **env_extra}, capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    raw = json.loads(line)
    seconds = raw["duration_us"] / 1e6
    errors = raw["errors_status"] + raw["errors_connect"] + raw["errors_read"] + raw["errors_timeout"]
    return {
        "rps": raw["requests"] / seconds,
        "p50_ms": raw["p50_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
        "requests": raw["requests"],
        "errors": errors,
        "errors_status": raw["errors_status"],
        "seconds": seconds,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("bench serve: wrk is not installed (Debian: apt-get install wrk)")
    if args.duration < 20:
        raise SystemExit("bench serve: --duration must be at least 20 seconds")
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    db_url = _bench_database(args.database_url)
    redis_url = _redis_db(args.redis_url)
    env = _environment(args, db_url, redis_url)
    os.environ.update(env)
    _log(
        f"command: python -m bench serve  (gunicorn -k asgi config.asgi, {args.workers} workers, "
        f"wrk {args.wrk_threads} threads × {args.connections} connections × {args.duration} s)"
    )
    _log(f"database {db_url}, cache {redis_url}")

    from bench._serve_seed import seed

    seeded = seed(args.devices)
    _log(
        f"seeded: profile {seeded['profile']}, {len(seeded['devices'])} devices, package "
        f"{seeded['digest'][:12]}… ({seeded['package_bytes'] / 1e6:.2f} MB, predicted "
        f"{seeded['predicted_bytes'] / 1e6:.2f} MB), built in {seeded['package_build_seconds']:.2f} s"
    )

    port = args.port or _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "config.asgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(args.workers),
            "--worker-class",
            "asgi",
            "--keep-alive",
            "30",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        _wait_http(f"{base}/api/v1/ping")
        figures = _measure(args, base, seeded)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return figures


def _fetch_etags(base: str, tokens: list[str]) -> list[str]:
    """Each device's current ETag, from one real request per device (this also warms caches)."""
    etags = []
    for token in tokens:
        req = urllib.request.Request(
            f"{base}/api/v1/device/config", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            etags.append(resp.headers["ETag"])
    return etags


def _download_throughput(base: str, token: str, digest: str, size: int) -> dict[str, float]:
    """Whole-blob download and a resumed (Range) download of the second half, MB/s."""
    url = f"{base}/api/v1/packages/{digest}/model.safetensors"
    rates = []
    for _ in range(3):
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        t0 = time.perf_counter()
        got = 0
        with urllib.request.urlopen(req, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                got += len(chunk)
        rates.append(got / (time.perf_counter() - t0) / 1e6)
        if got != size:
            raise SystemExit(f"bench serve: downloaded {got} bytes, expected {size}")
    half = size // 2
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Range": f"bytes={half}-"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        status = resp.status
        tail = len(resp.read())
    if status != 206 or tail != size - half:
        raise SystemExit(f"bench serve: Range request answered {status} with {tail} bytes")
    rates.sort()
    return {"download_mb_per_s": rates[len(rates) // 2]}


def _measure(args: argparse.Namespace, base: str, seeded: dict[str, Any]) -> dict[str, Any]:
    tokens: list[str] = seeded["devices"]
    etags = _fetch_etags(base, tokens)
    tmp = Path(tempfile.mkdtemp(dir=args.workdir))
    token_file = tmp / "tokens.txt"
    token_file.write_text("".join(f"{t} {e}\n" for t, e in zip(tokens, etags, strict=True)))
    device_lua = tmp / "device.lua"
    device_lua.write_text(_WRK_LUA)
    common = {"EDGEFIT_WRK_TOKENS": str(token_file)}

    # Short warm-up of every path (connections, caches, code paths), not measured.
    warm = argparse.Namespace(**{**vars(args), "duration": 3})
    _wrk(warm, f"{base}/api/v1/ping", device_lua, {**common, "EDGEFIT_WRK_ETAG": "1"})
    _wrk(warm, f"{base}/api/v1/device/config", device_lua, {**common, "EDGEFIT_WRK_ETAG": "1"})

    results = {}
    for name, url, script, extra in (
        # The ceiling gets the same requests (a device's token and ETag, which it ignores): the
        # load generator's work per request is then the same on every path.
        ("ceiling", f"{base}/api/v1/ping", device_lua, {**common, "EDGEFIT_WRK_ETAG": "1"}),
        ("304", f"{base}/api/v1/device/config", device_lua, {**common, "EDGEFIT_WRK_ETAG": "1"}),
        ("200", f"{base}/api/v1/device/config", device_lua, {**common, "EDGEFIT_WRK_ETAG": "0"}),
    ):
        results[name] = r = _wrk(args, url, script, extra)
        _log(
            f"  {name:8s} {r['rps']:9,.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
            f"({r['requests']:,} requests, {r['errors']} errors)"
        )
        if r["errors_status"]:
            raise SystemExit(f"bench serve: {r['errors_status']} non-2xx/3xx answers on the {name} path")
    download = _download_throughput(base, tokens[0], seeded["digest"], seeded["package_bytes"])

    ceiling = results["ceiling"]["rps"]
    figures = {
        "rps_304": results["304"]["rps"],
        "rps_200": results["200"]["rps"],
        "p99_ms_304": results["304"]["p99_ms"],
        "p99_ms_200": results["200"]["p99_ms"],
        "ceiling_rps": ceiling,
        "ceiling_ratio_304": results["304"]["rps"] / ceiling,
        "ceiling_ratio_200": results["200"]["rps"] / ceiling,
        # The first build in this process (quantize, check-set answers, write, sign), model
        # already loaded; the rebuild of the same plan is reported next to it.
        "package_build_seconds": seeded["package_build_seconds"],
        "package_rebuild_seconds": seeded["package_rebuild_seconds"],
        "package_bytes": seeded["package_bytes"],
        "predicted_bytes": seeded["predicted_bytes"],
        "download_mb_per_s": download["download_mb_per_s"],
        "devices": len(tokens),
        "connections": args.connections,
        "duration_s": args.duration,
    }
    _report(figures)
    return figures


def _report(f: dict[str, Any]) -> None:
    rows = [
        (
            "config 304 (If-None-Match)",
            f"{f['rps_304']:,.0f}",
            f"{f['p99_ms_304']:.1f}",
            f"{f['ceiling_ratio_304']:.2f}×",
            "≥ 2,000 req/s, p99 ≤ 25 ms, ≥ 0.80×",
        ),
        (
            "config 200 (full body)",
            f"{f['rps_200']:,.0f}",
            f"{f['p99_ms_200']:.1f}",
            f"{f['ceiling_ratio_200']:.2f}×",
            "≥ 1,000 req/s, p99 ≤ 25 ms",
        ),
        ("constant JSON (ceiling)", f"{f['ceiling_rps']:,.0f}", "", "1.00×", "baseline, same run"),
    ]
    print()
    print(f"{'path':28s} {'req/s':>9s} {'p99 ms':>7s} {'vs ceiling':>10s}  target")
    print("-" * 90)
    for r in rows:
        print(f"{r[0]:28s} {r[1]:>9s} {r[2]:>7s} {r[3]:>10s}  {r[4]}")
    same = "yes" if f["package_bytes"] == f["predicted_bytes"] else "NO"
    print(
        f"\npackage: built in {f['package_build_seconds']:.2f} s (target ≤ 3 s; same plan rebuilt "
        f"{f['package_rebuild_seconds']:.2f} s, same digest), "
        f"{f['package_bytes']:,} bytes, predicted {f['predicted_bytes']:,} (equal: {same}); "
        f"download {f['download_mb_per_s']:.0f} MB/s"
    )
