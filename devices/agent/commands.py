"""What each agent command does; every command returns the dict its ``--json`` answer prints.

Commands raise `AgentError` for anything the user should see (the CLI maps it to an exit
code and a JSON error object).  The engine (`planner.package`, `planner.runtime`,
`planner.hostprobe`) is imported inside the commands that need it, so ``--help``, `enroll`
and `report` never load torch.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devices.agent.client import IDEMPOTENCY_HEADER, Client, SizeMismatchError, new_idempotency_key
from devices.agent.errors import EXIT_REFUSED, EXIT_SERVER, EXIT_STATE, AgentError
from devices.agent.progress import Progress
from devices.agent.state import AgentState

__all__ = ["Context", "bench", "enroll", "profile", "report", "status", "sync"]

SIGNING_KEY_PATH = "/api/v1/signing-key"
ENROLL_PATH = "/api/v1/device/enroll"
CONFIG_PATH = "/api/v1/device/config"
MEASUREMENTS_PATH = "/api/v1/device/measurements"
_MANIFEST = "manifest.json"
_SIGNATURE = "manifest.sig"
_BLOB = "model.safetensors"


@dataclass
class Context:
    """Options every command shares (from the command line), and where to log."""

    state: AgentState
    quiet: bool = False
    retries: int = 5
    timeout: float = 30.0
    log: Callable[[str], None] = field(default=lambda _msg: None)
    #: Injected by tests (no real sleeping); None = time.sleep.
    sleep: Callable[[float], None] | None = None

    def client(self, server: str, token: str | None) -> Client:
        client = Client(server, token, timeout=self.timeout, retries=self.retries, log=self.log)
        if self.sleep is not None:
            client.sleep = self.sleep
        return client

    def progress(self, label: str, total: int, unit: str = "B", initial: int = 0) -> Progress:
        return Progress(label, total, enabled=Progress.wanted(self.quiet), unit=unit, initial=initial)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- enroll


def enroll(
    ctx: Context,
    *,
    server: str,
    key: str,
    name: str,
    profile: str | None = None,
    probe: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Enroll this device and pin the server's package-signing key.

    Steps: (1) refuse to overwrite an existing enrollment unless `force`; (2) fetch
    ``GET signing-key`` and check the key id is the SHA-256 of the key (pinned from now on:
    every package must verify against it); (3) ``POST device/enroll`` with the enrollment key,
    name, optional profile and hardware probe, and one ``Idempotency-Key`` for all its retries
    (a retry of an enrollment the server committed gets the same device, with a new token,
    not a second device); (4) store the token (0600) and the state.
    """
    from planner.package import key_id

    if not key.startswith("efe_"):
        raise AgentError("bad-argument", "the enrollment key must start with efe_", EXIT_STATE)
    if not name.strip():
        raise AgentError("bad-argument", "--name must not be empty", EXIT_STATE)
    if ctx.state.enrolled() and not force:
        raise AgentError(
            "already-enrolled",
            f"{ctx.state.root} already holds an enrollment; pass --force to replace it",
            EXIT_STATE,
        )
    client = ctx.client(server, None)
    signing = client.request("GET", SIGNING_KEY_PATH).json()
    public = str(signing.get("public_key", "")) if isinstance(signing, dict) else ""
    try:
        kid = key_id(public)
    except ValueError as exc:
        raise AgentError(
            "bad-signing-key", f"the server's signing key is not usable: {exc}", EXIT_SERVER
        ) from exc
    if signing.get("algorithm") != "ed25519" or signing.get("key_id") != kid:
        raise AgentError(
            "bad-signing-key",
            f"the server's signing key does not check out (algorithm {signing.get('algorithm')!r}, "
            f"key id {signing.get('key_id')!r} vs computed {kid})",
            EXIT_SERVER,
        )
    body: dict[str, Any] = {"enrollment_key": key, "name": name}
    if profile:
        body["profile"] = profile
    hardware = ctx.state.read_json(ctx.state.hardware_path) if ctx.state.hardware_path.is_file() else None
    if probe:
        hardware = _probe(quick=True)
    if hardware:
        body["hardware"] = hardware
    # (`Client.request` gives the POST its Idempotency-Key, the same on all its retries.)
    answer = client.request("POST", ENROLL_PATH, body=body, ok=(200, 201)).json()
    token = answer.get("token") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token.startswith("efd_") or not answer.get("device_id"):
        raise AgentError(
            "bad-response", "the enrollment answer lacks a device id or an efd_ token", EXIT_SERVER
        )
    ctx.state.ensure()
    ctx.state.save_token(token)
    state = {
        "server": server,
        "device_id": str(answer["device_id"]),
        "name": name,
        "profile": answer.get("profile"),
        "channel": answer.get("channel"),
        "config_url": answer.get("config_url") or CONFIG_PATH,
        "public_key": public,
        "key_id": kid,
        "enrolled_at": _now(),
        "etag": None,
        "config": None,
    }
    ctx.state.save(state)
    ctx.log(f"enrolled as {state['device_id']} (profile {state['profile']}); signing key {kid} pinned")
    return {
        "device_id": state["device_id"],
        "profile": state["profile"],
        "channel": state["channel"],
        "server": server,
        "config_url": state["config_url"],
        "key_id": kid,
        "state_dir": str(ctx.state.root),
    }


# --------------------------------------------------------------------------- profile


def _probe(quick: bool, repeats: int | None = None) -> dict[str, Any]:
    from planner.hostprobe import probe_host

    if quick:
        result = probe_host(repeats=repeats or 3, copy_bytes=32 * 1024**2, matmul_size=256)
    else:
        result = probe_host(repeats=repeats or 5)
    return result.to_dict()


def profile(ctx: Context, *, quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    """Probe this host (RAM, memory bandwidth, fp32 / int8 matmul throughput) and keep the result."""
    ctx.log("probing this host (RAM, memory bandwidth, fp32 and int8 matmul throughput)…")
    hardware = _probe(quick, repeats)
    ctx.state.write_json(ctx.state.hardware_path, hardware)
    return {"hardware": hardware, "quick": quick, "source": f"measured on {_now()} by edgefit-agent profile"}


# --------------------------------------------------------------------------- sync


def _refused(exc: Exception, reason: str, digest: str, current: str | None) -> AgentError:
    return AgentError(
        "package-refused",
        f"package {digest[:16]}… refused ({reason}): {getattr(exc, 'detail', exc)}; "
        f"still running {current[:16] + '…' if current else 'no package'}",
        EXIT_REFUSED,
        reason=reason,
        digest=digest,
        current=current,
    )


def sync(ctx: Context) -> dict[str, Any]:
    """Fetch the config and install the package it names, verified, or keep the current one.

    Steps: (1) ``GET device/config`` with ``If-None-Match`` of the last ETag (304 → the stored
    config); (2) no package → nothing to do; same digest as `current` → unchanged; already
    installed (e.g. a rollback) → verify again and switch; (3) otherwise download manifest and
    signature and verify digest + signature against the pinned key *before* the blob; (4)
    download the blob into a ``.part`` file, resuming with HTTP Range, never beyond the signed
    size; (5) verify the whole package (`planner.package.verify_package`); (6) move it into
    packages/<digest> and switch `current` atomically; keep the previous package for
    rollback, delete older ones.  Partial downloads (staging/) of digests other than the one
    the config names are deleted at step (2).  Any verification failure → `package-refused`
    with the reason, the staged blob is deleted and `current` is untouched.
    """
    from planner.package import PackageError, verify_manifest, verify_package

    state = ctx.state.load()
    client = ctx.client(state["server"], ctx.state.token())
    headers = {"If-None-Match": state["etag"]} if state.get("etag") and state.get("config") else {}
    resp = client.request("GET", state.get("config_url") or CONFIG_PATH, headers=headers, ok=(200, 304))
    if resp.status == 304:
        config = state["config"]
        config_status = "not-modified"
    else:
        config = resp.json()
        if not isinstance(config, dict):
            raise AgentError("bad-response", "the config answer is not a JSON object", EXIT_SERVER)
        state["config"] = config
        state["etag"] = resp.headers.get("ETag")
        config_status = "fetched"
    state["last_sync_at"] = _now()
    ctx.state.save(state)
    current = ctx.state.current_digest()
    out: dict[str, Any] = {
        "config": config_status,
        "etag": state.get("etag"),
        "previous": current,
        "current": current,
        "bytes_downloaded": 0,
        "resumed_from": 0,
        "retries": client.waits,
        "poll_interval_s": config.get("poll_interval_s"),
        "poll_jitter_s": config.get("poll_jitter_s"),
    }
    package = config.get("package")
    if not package:
        out["pruned"] = ctx.state.prune_staging(None)  # partial downloads nobody wants now
        ctx.log("no package is released to this device")
        return {**out, "status": "no-package", "digest": None}
    digest = str(package.get("digest", "")).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise AgentError("bad-response", f"the config names an invalid digest {digest!r}", EXIT_SERVER)
    out["digest"] = digest
    # Partial downloads of digests the config no longer names (a release rolled back or
    # replaced mid-download) are dropped; this digest's own is resumed below.
    out["pruned"] = ctx.state.prune_staging(digest)
    if digest == current:
        ctx.log(f"package {digest[:16]}… is current")
        return {**out, "status": "unchanged"}
    public_key = state["public_key"]
    installed = ctx.state.package_dir(digest)
    if installed.is_dir():
        try:
            verify_package(installed, public_key, digest)
        except PackageError as exc:
            shutil.rmtree(installed, ignore_errors=True)
            raise _refused(exc, exc.reason, digest, current) from exc
        return _switch(ctx, state, digest, current, {**out, "status": "switched"})

    staged = ctx.state.staging(digest)
    staged.mkdir(parents=True, exist_ok=True)
    base = f"/api/v1/packages/{digest}/"
    urls = {
        _MANIFEST: package.get("manifest_url") or base + _MANIFEST,
        _SIGNATURE: package.get("signature_url") or base + _SIGNATURE,
        _BLOB: package.get("blob_url") or base + _BLOB,
    }
    manifest_bytes = client.request("GET", urls[_MANIFEST], headers={"Accept": "*/*"}).body
    signature = client.request("GET", urls[_SIGNATURE], headers={"Accept": "*/*"}).body
    try:
        manifest = verify_manifest(manifest_bytes, signature, public_key, digest)
    except PackageError as exc:
        shutil.rmtree(staged, ignore_errors=True)  # nothing under this digest can be trusted
        raise _refused(exc, exc.reason, digest, current) from exc
    for name, data in ((_MANIFEST, manifest_bytes), (_SIGNATURE, signature)):
        (staged / name).write_bytes(data)
    blob = manifest["files"][_BLOB]
    size, sha = int(blob["bytes"]), str(blob["sha256"])
    part = staged / (_BLOB + ".part")
    have = part.stat().st_size if part.exists() else 0
    bar = ctx.progress(f"download {digest[:12]}", size, initial=min(have, size))
    try:
        result = client.download(urls[_BLOB], part, size=size, etag=f'"{sha}"', progress=bar)
    except SizeMismatchError as exc:
        part.unlink(missing_ok=True)
        raise _refused(exc, "blob-size-mismatch", digest, current) from exc
    finally:
        bar.close()
    out["bytes_downloaded"] = result.bytes_downloaded
    out["resumed_from"] = result.resumed_from
    os.replace(part, staged / _BLOB)
    try:
        verify_package(staged, public_key, digest)
    except PackageError as exc:
        # A bad blob is never resumed from: the next sync downloads it afresh.
        (staged / _BLOB).unlink(missing_ok=True)
        raise _refused(exc, exc.reason, digest, current) from exc
    ctx.state.install(staged, digest)
    return _switch(ctx, state, digest, current, {**out, "status": "updated"})


def _switch(
    ctx: Context, state: dict[str, Any], digest: str, current: str | None, out: dict[str, Any]
) -> dict[str, Any]:
    ctx.state.switch_current(digest)
    state["previous"] = current
    state["current"] = digest
    ctx.state.save(state)
    keep = {digest} | ({current} if current else set())
    pruned = sorted([*out.get("pruned", []), *ctx.state.prune(keep, downloading=digest)])
    ctx.log(f"package {digest[:16]}… is now current" + (f" (was {current[:16]}…)" if current else ""))
    return {**out, "current": digest, "pruned": pruned}


# --------------------------------------------------------------------------- bench


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bench(ctx: Context, *, rounds: int = 5, warmup: int = 1, threads: int | None = None) -> dict[str, Any]:
    """Run the current package's check set with the runtime's real kernels and measure it.

    Steps: (1) decide how the integer Linears run on this host (`w8a8_pays_off`: W8A8 unless
    int8 GEMMs are not faster than fp32 here, or as EDGEFIT_W8A8 says) and load the current
    package through `planner.package.load_package` (verified against the pinned key again);
    (2) one pass over the check set at batch 1 — accuracy against the labels and agreement
    with the shipped FP32 answers, per-text exit block; (3) `rounds` timed rounds of every
    text at batch 1 (`planner.runtime.measure_text_latency`, `warmup` untimed passes first),
    per text the median; p50 / p90 over texts; (4) peak memory of one call on the longest
    text (`measure_memory`: storage bytes + profiler peak); (5) the kernels that really ran
    (`observed_kernels`: counts, and per tensor the cost model's regime).  The result is
    kept for `report`.
    """
    import torch

    from planner.package import PackageError, load_package
    from planner.runtime import measure_memory, measure_text_latency, observed_kernels, w8a8_pays_off
    from planner.specs import PlanError

    if rounds < 1 or warmup < 0:
        raise AgentError("bad-argument", "--rounds must be ≥ 1 and --warmup ≥ 0", EXIT_STATE)
    state = ctx.state.load()
    digest = ctx.state.current_digest()
    if digest is None:
        raise AgentError("no-package", "no package installed yet: run `edgefit-agent sync` first", EXIT_STATE)
    n_threads = threads or torch.get_num_threads()
    try:
        w8a8, w8a8_reason = w8a8_pays_off(n_threads)  # decided at the thread count measured
    except PlanError as exc:  # EDGEFIT_W8A8 malformed: nothing loaded or measured
        raise AgentError("bad-argument", str(exc), EXIT_STATE) from exc
    try:
        loaded = load_package(ctx.state.package_dir(digest), state["public_key"], digest, w8a8=w8a8)
    except PackageError as exc:
        raise AgentError(
            "package-refused",
            f"the installed package {digest[:16]}… fails verification: {exc}",
            EXIT_REFUSED,
            reason=exc.reason,
            digest=digest,
            current=digest,
        ) from exc
    check = loaded.check_set
    batches = check.batches()
    lengths = check.lengths()
    n = len(batches)
    bar = ctx.progress("bench", n + rounds * n, unit="texts")
    try:
        preds: list[int] = []
        exits: list[int] = []
        old = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            with torch.inference_mode():
                for b in batches:
                    decision = loaded.runner.run(b)[0]
                    preds.append(decision.prediction)
                    exits.append(decision.exit_index)
                    bar.update(1)
        finally:
            torch.set_num_threads(old)
        per_round: list[tuple[float, ...]] = []
        for r in range(rounds):
            got = measure_text_latency(
                {"package": loaded.runner},
                batches,
                rounds=1,
                warmup=warmup if r == 0 else 0,
                threads=n_threads,
            )["package"]
            per_round.append(got.per_text_s)
            bar.update(n)
    finally:
        bar.close()
    per_text_ms = [statistics.median(r[i] for r in per_round) * 1000 for i in range(n)]
    longest = max(range(n), key=lambda i: lengths[i])
    memory = measure_memory(loaded.module, loaded.runner.run, [batches[longest]])
    observed = observed_kernels(loaded.module, loaded.kernels)
    accuracy = sum(int(p == y) for p, y in zip(preds, check.labels.tolist(), strict=True)) / n
    agreement = sum(int(p == y) for p, y in zip(preds, check.reference.tolist(), strict=True)) / n
    measurement = {
        "package_digest": digest,
        "batch_size": 1,
        "latency_p50_ms": round(_percentile(per_text_ms, 0.5), 4),
        "latency_p90_ms": round(_percentile(per_text_ms, 0.9), 4),
        "peak_memory_bytes": int(memory.total_bytes),
        "check_accuracy": round(accuracy, 6),
        "check_agreement": round(agreement, 6),
        "check_examples": n,
        "samples": [
            {"tokens": lengths[i], "exit_layer": exits[i], "latency_ms": round(per_text_ms[i], 4)}
            for i in range(n)
        ],
        "runtime": {
            "torch": torch.__version__.split("+")[0],
            "threads": n_threads,
            "kernels": observed.by_kernel(),
            # tensor → planner.cost regime: what the server's cost-model fit prices each tensor as
            "regimes": observed.regimes(),
            "host": platform.node(),
        },
        "measured_at": _now(),
    }
    summary = {
        "model": loaded.manifest["model"]["name"],
        "plan_hash": loaded.manifest.get("plan_hash"),
        "exit_threshold": loaded.plan.exit_threshold,
        "mean_layers": round(sum(e + 1 for e in exits) / n, 4),
        "n_blocks": loaded.spec.n_blocks,
        "mean_latency_ms": round(statistics.fmean(per_text_ms), 4),
        "weights_bytes": memory.weights_bytes,
        "activation_peak_bytes": memory.activation_peak_bytes,
        "memory_method": memory.method,
        "rounds": rounds,
        "warmup": warmup,
        "load_seconds": round(loaded.load_seconds, 3),
        "w8a8": w8a8_reason,
        "predicted": loaded.manifest.get("predicted", {}).get(state.get("profile") or "", None),
    }
    # The key `report` sends: kept with the measurement, so a report retried, re-run after a
    # crash, or forced sends the same key and the server stores the measurement once.
    record = {
        "measurement": measurement,
        "summary": summary,
        "reported": None,
        "idempotency_key": new_idempotency_key(),
    }
    ctx.state.write_json(ctx.state.bench_path, record)
    ctx.log(
        f"{n} texts: accuracy {accuracy:.3f}, agreement {agreement:.3f}, "
        f"p50 {measurement['latency_p50_ms']:.2f} ms, p90 {measurement['latency_p90_ms']:.2f} ms, "
        f"peak memory {memory.total_bytes / 1e6:.1f} MB; {w8a8_reason}"
    )
    return record


# --------------------------------------------------------------------------- report


def report(ctx: Context, *, force: bool = False) -> dict[str, Any]:
    """POST the last bench measurement to ``device/measurements`` (once, unless `force`).

    The POST carries the record's ``Idempotency-Key`` (written by `bench`; a record from an
    older agent gets one, saved before sending): however often it is sent — retries, a re-run
    after a crash, ``--force`` — the server stores it once and answers a repeat with the stored
    measurement's id (200, `replayed`)."""
    state = ctx.state.load()
    record = ctx.state.read_json(ctx.state.bench_path)
    if record is None or "measurement" not in record:
        raise AgentError("no-measurement", "nothing to report: run `edgefit-agent bench` first", EXIT_STATE)
    if record.get("reported") and not force:
        raise AgentError(
            "already-reported",
            f"the last bench was already reported (measurement {record['reported'].get('id')}); "
            "run bench again, or pass --force (the server answers with the stored measurement)",
            EXIT_STATE,
        )
    key = record.get("idempotency_key")
    if not isinstance(key, str) or not key:
        key = record["idempotency_key"] = new_idempotency_key()
        ctx.state.write_json(ctx.state.bench_path, record)  # before sending: a re-run reuses it
    client = ctx.client(state["server"], ctx.state.token())
    resp = client.request(
        "POST",
        MEASUREMENTS_PATH,
        body=record["measurement"],
        headers={IDEMPOTENCY_HEADER: key},
        ok=(200, 201),
    )
    answer = resp.json()
    if not isinstance(answer, dict):
        raise AgentError("bad-response", "the measurement answer is not a JSON object", EXIT_SERVER)
    replayed = resp.status == 200
    record["reported"] = {"id": answer.get("id"), "at": _now()}
    ctx.state.write_json(ctx.state.bench_path, record)
    ctx.log(
        f"measurement {answer.get('id')} "
        + ("was already stored (same Idempotency-Key)" if replayed else "stored")
        + f"; recalibration {answer.get('recalibration')}"
    )
    return {
        "id": answer.get("id"),
        "recalibration": answer.get("recalibration"),
        "package_digest": record["measurement"]["package_digest"],
        "replayed": replayed,
        "idempotency_key": key,
        "retries": client.waits,
    }


# --------------------------------------------------------------------------- status


def status(ctx: Context) -> dict[str, Any]:
    """What this state directory holds (no network)."""
    state = ctx.state.read_json(ctx.state.state_path)
    bench_record = ctx.state.read_json(ctx.state.bench_path)
    current = ctx.state.current_digest()
    installed = (
        sorted(p.name for p in ctx.state.packages_dir.iterdir() if p.is_dir())
        if ctx.state.packages_dir.is_dir()
        else []
    )
    return {
        "enrolled": state is not None and ctx.state.token_path.is_file(),
        "state_dir": str(ctx.state.root),
        "device_id": (state or {}).get("device_id"),
        "server": (state or {}).get("server"),
        "profile": (state or {}).get("profile"),
        "key_id": (state or {}).get("key_id"),
        "current": current,
        "installed": installed,
        "last_sync_at": (state or {}).get("last_sync_at"),
        "last_bench": None
        if bench_record is None
        else {
            "package_digest": bench_record["measurement"]["package_digest"],
            "measured_at": bench_record["measurement"]["measured_at"],
            "reported": bench_record.get("reported"),
        },
    }
