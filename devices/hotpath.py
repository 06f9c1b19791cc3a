"""What the device config path reads instead of the database.

A device polls `GET /api/v1/device/config` every few minutes, so a fleet makes this the busiest
endpoint, and it must not run a single SQL query.  Three layers serve it:

1. the **shared cache** (Django's default cache: Redis on the real stack, a file cache under
   ./var on one machine — both seen by every web process and the worker) holds what a token
   resolves to (`token_key`) and, in `registry.delivery`, each profile's releases;
2. a **per-process memo** (`memo`) keeps copies of those entries, plus the rendered config body
   and ETag per device, so a warm request reads nothing outside the process;
3. **invalidation**: a writer changes the database, then *on commit* deletes the shared entries
   it touched and replaces the **generation marker** (`GEN_KEY`, a random value) —
   `forget_tokens`, `bump_generation` — and, on Redis, publishes it on `CHANNEL`.  Each web
   process listens on that channel in a background thread and empties its memo when a message
   arrives.  Until its subscription is confirmed (start-up, lost connection) and always with
   the file cache, a process instead reads the marker on every request and empties its memo
   when it changed.  Either way the request after a change sees it.

A memo entry is only stored if no invalidation happened since the request started
(`memo.epoch`), so a value read just before a change cannot outlive it.  Entries missing from
the shared cache are rebuilt from the database — the only queries this path can make (the
first request after a change or an expiry) — and written back only if the marker did not
change meanwhile.

Throttling: `EDGEFIT_DEVICE_RATE_LIMIT` requests per device token per
`EDGEFIT_DEVICE_RATE_WINDOW_S`-second window.  Each process counts a token's requests itself;
past an eighth of the limit in one process it also counts them in the shared cache, which
decides — so a well-behaved device costs no shared operation, and a flooding one is limited
fleet-wide (to at most the limit plus an eighth per web process).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, cast

from django.conf import settings
from django.core.cache import cache
from django.core.signals import setting_changed

__all__ = [
    "CHANNEL",
    "GEN_KEY",
    "TokenEntry",
    "bump_generation",
    "forget_tokens",
    "memo",
    "rate",
    "resolve_token",
    "store",
    "token_digest",
    "token_key",
]

log = logging.getLogger(__name__)

GEN_KEY = "delivery:gen"
CHANNEL = "delivery:invalidate"
#: A positive token entry lives this long in the shared cache (rebuilt from the database after).
TOKEN_TTL_S = 6 * 3600
#: An unknown or revoked token is remembered as such for this long.
NEGATIVE_TTL_S = 600
#: Per-process memo dictionaries are emptied when they grow past this many entries.
MEMO_MAX_ENTRIES = 200_000

#: What a device token resolves to: (device id, profile id, channel alias).
TokenEntry = tuple[str, int, str]

_MISS = object()


def token_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def token_key(digest: str) -> str:
    return f"delivery:token:{digest}"


class LocalMemo:
    """Per-process copies of shared entries and rendered answers, dropped on invalidation."""

    def __init__(self) -> None:
        self.gen: object = _MISS
        self.epoch = 0
        self.tokens: dict[str, TokenEntry | None] = {}
        self.profiles: dict[int, Any] = {}
        self.bodies: dict[str, Any] = {}

    def sync(self, gen: object) -> None:
        """Marker read by this request: a new value means something changed."""
        if gen != self.gen:
            self.clear()
            self.gen = gen

    def clear(self) -> None:
        self.epoch += 1
        self.gen = _MISS
        self.tokens = {}
        self.profiles = {}
        self.bodies = {}

    def remember(self, table: str, key: Any, value: Any, epoch: int) -> None:
        """Store unless the memo was emptied since `epoch` (the value may predate a change)."""
        entries = getattr(self, table)
        if epoch != self.epoch:
            return
        if len(entries) >= MEMO_MAX_ENTRIES:
            entries.clear()
        entries[key] = value


memo = LocalMemo()


# --------------------------------------------------------------------------- invalidation channel


class Store:
    """How this process learns about changes: the Redis channel, else the marker per request."""

    def __init__(self, redis_location: str | None) -> None:
        self.redis_location = redis_location
        self.live = False  # subscribed: the memo is dropped by messages, no per-request read
        self._client: Any = None
        self._client_pid = 0
        self._pid = 0  # the process whose listener runs (0: none yet)
        self._lock = threading.Lock()

    def generation(self) -> object:
        return cache.get(GEN_KEY)

    def check(self) -> None:
        """Called at the start of every hot-path request."""
        if self.live:
            return
        if self.redis_location and self._pid != os.getpid():
            self._start_listener()
        memo.sync(cache.get(GEN_KEY))

    def _redis(self) -> Any:
        if self._client is None or self._client_pid != os.getpid():  # a forked child needs its own
            import redis

            self._client = redis.Redis.from_url(
                str(self.redis_location), socket_keepalive=True, health_check_interval=15
            )
            self._client_pid = os.getpid()
        return self._client

    def publish(self, marker: str) -> None:
        if self.redis_location:
            try:
                self._redis().publish(cache.make_key(CHANNEL), marker)
            except Exception:  # the marker is set: listeners fall back to reading it
                log.exception("could not publish a delivery invalidation")

    def _start_listener(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()  # after a fork, this process needs its own listener
            self.live = False
            client = self._redis()
            thread = threading.Thread(
                target=self._listen, args=(client,), name="edgefit-delivery-invalidation", daemon=True
            )
            thread.start()

    def _listen(self, client: Any) -> None:
        channel = cache.make_key(CHANNEL)
        pid = os.getpid()
        backoff = 0.5
        while self._pid == pid and _store is self:
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(channel)
                while self._pid == pid and _store is self:
                    message = pubsub.get_message(timeout=5.0)
                    if message is None:
                        pubsub.ping()  # a dead connection raises here instead of waiting forever
                        continue
                    if message["type"] == "subscribe":
                        memo.clear()  # changes made before we listened
                        self.live = True
                        backoff = 0.5
                    elif message["type"] == "message":
                        memo.clear()
            except Exception as exc:
                log.warning("delivery invalidation channel lost (%s); retrying", exc)
            finally:
                self.live = False
                memo.clear()
                with contextlib.suppress(Exception):
                    pubsub.close()
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


_store: Store | None = None


def store() -> Store:
    global _store
    if _store is None:
        backend = settings.CACHES["default"]
        location = None
        if backend["BACKEND"].endswith("RedisCache"):
            raw = backend["LOCATION"]
            location = str(raw[0] if isinstance(raw, list | tuple) else raw).split(",")[0]
        _store = Store(location)
    return _store


def _reset(setting: str, **kwargs: Any) -> None:
    global _store
    if setting == "CACHES":
        if _store is not None:
            _store.live = False
        _store = None
        memo.clear()
        rate.reset()


# --------------------------------------------------------------------------- throttling


class Rate:
    """Fixed-window request counts per token: in this process, then shared past a threshold."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window = -1
        self._counts: dict[str, int] = {}

    def reset(self) -> None:
        with self._lock:
            self._window, self._counts = -1, {}

    def hit(self, digest: str) -> float | None:
        """Count one request; None if allowed, else the seconds until the window ends."""
        limit = settings.EDGEFIT_DEVICE_RATE_LIMIT
        window_s = settings.EDGEFIT_DEVICE_RATE_WINDOW_S
        now = time.time()
        window = int(now // window_s)
        with self._lock:
            if window != self._window:
                self._window, self._counts = window, {}
            local = self._counts.get(digest, 0) + 1
            self._counts[digest] = local
        threshold = limit // 8
        if local <= threshold:
            return None
        key = f"delivery:rate:{digest[:32]}:{window}"
        cache.add(key, 0, window_s + 1)
        try:
            # The first time past the threshold, bring the requests counted so far along.
            shared = cache.incr(key, local if local == threshold + 1 else 1)
        except ValueError:  # expired between add and incr
            shared = local
        if shared <= limit and local <= limit:
            return None
        return (window + 1) * window_s - now


rate = Rate()
setting_changed.connect(_reset)


# --------------------------------------------------------------------------- tokens


def _token_from_db(digest: str) -> TokenEntry | None:
    from devices.models import DeviceToken

    row = (
        DeviceToken.objects.filter(digest=digest, revoked_at__isnull=True, device__revoked_at__isnull=True)
        .values_list("device_id", "device__profile_id", "device__channel")
        .first()
    )
    return (str(row[0]), int(row[1]), str(row[2])) if row else None


def resolve_token(digest: str, epoch: int) -> TokenEntry | None:
    """The device a token digest belongs to, or None (unknown or revoked). `epoch` is
    `memo.epoch` read after `store().check()` at the start of the request."""
    # (.get, not `in` + [ ]: another thread may empty the memo in between)
    known = memo.tokens.get(digest, _MISS)
    if known is not _MISS:
        return cast("TokenEntry | None", known)
    shared = cache.get(token_key(digest), _MISS)
    if shared is _MISS:
        before = cache.get(GEN_KEY)
        found = _token_from_db(digest)
        # A change committed while we read the database has replaced the marker: do not
        # put what we read back into the shared cache (it may be older than the change).
        if cache.get(GEN_KEY) == before:
            cache.set(token_key(digest), found or False, TOKEN_TTL_S if found else NEGATIVE_TTL_S)
        shared = found or False
    result: TokenEntry | None = (str(shared[0]), int(shared[1]), str(shared[2])) if shared else None
    memo.remember("tokens", digest, result, epoch)
    return result


# --------------------------------------------------------------------------- writers


def bump_generation() -> None:
    """Replace the marker and announce it: every process drops its memo before its next request
    (this one at once; the others when the message arrives, within a millisecond on a LAN)."""
    marker = uuid.uuid4().hex
    cache.set(GEN_KEY, marker, None)
    memo.clear()
    store().publish(marker)


def forget_tokens(digests: Iterable[str]) -> None:
    keys = [token_key(d) for d in digests]
    if keys:
        cache.delete_many(keys)
    bump_generation()
