"""What the device config path reads instead of the database.

A device polls `GET /api/v1/device/config` every few minutes, so a fleet makes this the busiest
endpoint, and a warm request runs no SQL query (the one exception: each process's look for
missed invalidations, at most once a second, below).  Three layers serve it:

1. the **shared cache** (Django's default cache: Redis on the real stack, a file cache under
   ./var on one machine — both seen by every web process and the worker) holds what a token
   resolves to (`token_key`) and, in `registry.delivery`, each profile's delivery state.  Every
   shared entry is stored with the **generation marker** (`GEN_KEY`) that was current when its
   build *started* (`shared_read` / `shared_write`), and a reader accepts it only if that is
   still the current marker — so a value read from the database just before a change, and
   written after it, is never served (no check-then-set race);
2. a **per-process memo** (`memo`) keeps copies of those entries, plus the rendered config body
   and ETag per device, so a warm request reads nothing outside the process; unknown tokens go
   to a small separate table (`memo.negative`) that can never push out a known one;
3. **invalidation**: a writer changes the database and, in the same transaction, records a
   `PendingInvalidation` row (`note_change`); *on commit* it replaces the marker (a random
   value), deletes the shared entries it touched, and, on Redis, publishes the marker on
   `CHANNEL` (retried once); then it deletes its row.  Each web process listens on that channel
   in a background thread and empties its memo when a message arrives.  A cache that fails on
   commit does not fail the change (it is logged): see "a lost invalidation" below.

How soon a process sees a committed change (the bound is what matters, the channel is the fast
path): with the file cache, or until the subscription is confirmed, the process reads the
marker on every request, so *the next request* sees the change.  Once subscribed it usually
sees it within milliseconds (the message), and in any case — a lost message, a failed publish —
within `MARKER_RECHECK_S` (1 s): the listener thread re-reads the marker every half of that,
and a request that finds the last read older than that re-reads it itself (`Store.check`; the
ASGI fast path, `Store.fresh`, answers only while the last read is recent).  Independently, no
memo entry is older than `MEMO_MAX_AGE_S`.

A lost invalidation (the cache refused the marker on commit — an outage, a read-only replica,
memory full — or the process died after the commit) is not lost for good: its row stays, and
every process looks for such rows within every `DURABLE_RECHECK_S` (one query on a table that
is empty but for a few milliseconds after each change; on Redis the listener thread makes it
every half period ahead of time, on its own short-lived connection, so no request waits for it;
without a listener the request that finds the look due makes it).  Finding one, it replaces the marker —
every entry built before is then refused, in every process — and deletes the rows it saw
(`Store.verify`).  While the cache still refuses that write, the process reads the database
instead of the shared entries (`Store.behind`).  So a change is seen within
`DURABLE_RECHECK_S` even when its invalidation failed (by the writing process at its next
request).

An unreachable cache (Redis restarting, a network blip: a read raises) costs speed, not answers.
The process empties its memo and, until the cache answers a marker read again (tried at most
every `UNREACHABLE_RETRY_S` by a request, never by the others meanwhile), answers every request
from the database: nothing is read from or written to the shared cache, nothing kept in the
memo (values read then carry the marker `DOWN`, which matches none), the ASGI fast path declines
(`Store.fresh`), throttling counts in the process alone (`Rate.hit`).  The outage is logged
once, when found, and its end once.  When the cache answers, the look for missed invalidations
runs before anything shared is trusted again: a change committed meanwhile left its
`PendingInvalidation` row, so the marker is replaced and every entry built before is refused —
also when Redis comes back from disk with its old marker and entries.  A subscribed process
finds the outage through its listener (its marker re-read fails, or the channel drops) within
`MARKER_RECHECK_S` / 2, when the fast path stops answering.

A memo entry is only stored if the memo was not emptied since the request started
(`memo.epoch`) and still believes in the marker the entry was built at.  Entries missing from
the shared cache are rebuilt from the database — the only queries this path can make (the
first request after a change or an expiry, or an unknown but well-formed token).

Throttling: `EDGEFIT_DEVICE_RATE_LIMIT` requests per device token per
`EDGEFIT_DEVICE_RATE_WINDOW_S`-second window.  Each process counts a token's requests itself;
past an eighth of the limit in one process it also counts them in the shared cache, which
decides — so a well-behaved device costs no shared operation, and a flooding one is limited
fleet-wide (to at most the limit plus an eighth per web process).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, NamedTuple

from django.conf import settings
from django.core.cache import cache
from django.core.signals import setting_changed
from django.db import DatabaseError, transaction

from devices.models import device_token_digest

__all__ = [
    "CHANNEL",
    "DOWN",
    "DURABLE_RECHECK_S",
    "GEN_KEY",
    "MARKER_RECHECK_S",
    "MEMO_MAX_AGE_S",
    "MISS",
    "UNREACHABLE_RETRY_S",
    "TokenEntry",
    "bump_generation",
    "device_token_digest",
    "forget_tokens_on_commit",
    "memo",
    "note_change",
    "rate",
    "resolve_token",
    "shared_read",
    "shared_write",
    "store",
    "token_key",
]

log = logging.getLogger(__name__)

GEN_KEY = "delivery:gen"
CHANNEL = "delivery:invalidate"
#: A token entry lives this long in the shared cache (rebuilt from the database after).
TOKEN_TTL_S = 6 * 3600
#: Per-process memo dictionaries of known entries are emptied when they grow past this.
MEMO_MAX_ENTRIES = 200_000
#: Unknown or revoked tokens remembered per process (emptied, alone, when full).
NEGATIVE_MAX_ENTRIES = 10_000
#: A subscribed process still re-reads the marker at most this often (bounded staleness).
MARKER_RECHECK_S = 1.0
#: No memo entry outlives this, whatever happens to the marker and the channel.
MEMO_MAX_AGE_S = 300.0
#: A process looks for invalidations the cache missed (`PendingInvalidation`) this often.
DURABLE_RECHECK_S = 1.0
#: While the shared cache is unreachable, one request per process tries it again this often.
UNREACHABLE_RETRY_S = 1.0


class TokenEntry(NamedTuple):
    """What a device token resolves to."""

    device_id: str
    profile_id: int
    channel: str


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: "Nothing usable": no entry, or one built at another generation.
MISS: Any = _Sentinel("MISS")
#: The marker of a value read while the shared cache was unreachable: it equals no marker (nor
#: MISS), so such a value is neither kept in the memo nor written to the shared cache.
DOWN: Any = _Sentinel("DOWN")


def token_key(digest: str) -> str:
    return f"delivery:token:{digest}"


def shared_read(key: str) -> tuple[object, Any]:
    """(the current marker, the shared entry under `key` if it was built at that marker, else
    MISS) — one round trip.  (DOWN, MISS) while the cache is unreachable, without trying it:
    the caller reads the database (`Store.check` tries the cache again)."""
    current = store()
    if current.down_since is not None:
        return DOWN, MISS
    try:
        found = cache.get_many([GEN_KEY, key])
    except Exception as exc:
        current.unreachable(exc)
        return DOWN, MISS
    gen = found.get(GEN_KEY)
    tagged = found.get(key)
    if isinstance(tagged, tuple) and len(tagged) == 2 and tagged[0] == gen and not current.behind:
        return gen, tagged[1]
    return gen, MISS


def shared_write(key: str, gen: object, value: Any, ttl: float) -> None:
    """Store `value`, built from the database *after* `gen` was read by `shared_read` (not
    while the cache is behind the database: it refuses writes then; nor a value read while it
    was unreachable).  Never raises: the value is right without its shared copy."""
    current = store()
    if gen is DOWN or current.behind:
        return
    try:
        cache.set(key, (gen, value), ttl)
    except Exception as exc:
        current.refused(exc)


class LocalMemo:
    """Per-process copies of shared entries and rendered answers, dropped on invalidation."""

    def __init__(self) -> None:
        self.gen: object = MISS
        self.epoch = 0
        self.born = time.monotonic()
        self.tokens: dict[str, TokenEntry] = {}
        self.negative: dict[str, None] = {}
        self.profiles: dict[int, Any] = {}
        self.bodies: dict[str, Any] = {}

    def sync(self, gen: object) -> None:
        """Marker read by this request: a new value means something changed."""
        if gen != self.gen:
            self.clear()
            self.gen = gen

    def clear(self) -> None:
        self.epoch += 1
        self.gen = MISS
        self.born = time.monotonic()
        self.tokens = {}
        self.negative = {}
        self.profiles = {}
        self.bodies = {}

    def remember(self, table: str, key: Any, value: Any, epoch: int, gen: object = MISS) -> None:
        """Store unless the memo was emptied since `epoch`, or (when `gen` is given) the value
        was built at another marker than the one the memo holds (it may predate a change)."""
        entries = getattr(self, table)
        if epoch != self.epoch or (gen is not MISS and gen != self.gen):
            return
        if len(entries) >= (NEGATIVE_MAX_ENTRIES if table == "negative" else MEMO_MAX_ENTRIES):
            entries.clear()  # tables are separate: unknown tokens never evict known ones
        entries[key] = value


memo = LocalMemo()


# --------------------------------------------------------------------------- invalidation channel


class Store:
    """How this process learns about changes: the Redis channel, else the marker per request."""

    def __init__(self, redis_location: str | None) -> None:
        self.redis_location = redis_location
        self.live = False  # subscribed: messages drop the memo, the marker is read ≤ 1/s
        self._client: Any = None
        self._client_pid = 0
        self._pid = 0  # the process whose listener runs (0: none yet)
        self._thread: threading.Thread | None = None
        self._read_at = 0.0  # monotonic time of the last marker read
        self._durable_at = -math.inf  # … and of the last look for missed invalidations
        #: The newest missed invalidation the cache's marker could not be replaced for (0:
        #: none): shared entries are then neither read nor written.
        self.behind = 0
        self._behind_ids: frozenset[int] = frozenset()  # the missed invalidations seen while behind
        self._db_failing = False  # the last look's query failed (logged once per streak)
        #: Monotonic time the shared cache was found unreachable (None: it answers).  Until a
        #: marker read succeeds again the process answers from the database alone, like
        #: `behind` but without even reading the marker (see the module docstring).
        self.down_since: float | None = None
        self._down_at = 0.0  # … and of the last failed try
        self._refusal_logged = False
        self._look_failing = False  # the listener's last look for missed invalidations raised
        self._lock = threading.Lock()

    def generation(self) -> object:
        return cache.get(GEN_KEY)

    def check(self) -> None:
        """Called at the start of every hot-path request."""
        # The pid first: a forked child inherits `live` but not the listener thread.
        if self.redis_location and self._pid != os.getpid():
            self._start_listener()
        now = time.monotonic()
        durable_due = now - self._durable_at >= DURABLE_RECHECK_S
        if now - memo.born > MEMO_MAX_AGE_S:
            memo.clear()
        elif (
            self.live and memo.gen is not MISS and now - self._read_at < MARKER_RECHECK_S and not durable_due
        ):
            return
        down = self.down_since is not None
        if down and now - self._down_at < UNREACHABLE_RETRY_S:
            return  # still unreachable: this request reads the database (`shared_read`)
        self._read_at = now
        try:
            gen = cache.get(GEN_KEY)
        except Exception as exc:
            self.unreachable(exc)
            return
        if down:
            # Back.  Changes committed meanwhile left their PendingInvalidation rows: replace
            # the marker for them before anything shared is trusted again (the entries Redis
            # kept, or reloaded from disk, carry the marker read here).
            gen, looked = self.verify(gen, now)
            if not looked:  # the database did not answer: still nothing shared, tried again later
                self._down_at = now
                return
            self._recovered(now)
        elif durable_due:
            gen, _ = self.verify(gen, now)
        memo.sync(gen)

    def unreachable(self, exc: Exception) -> None:
        """A read of the shared cache failed: until a marker read succeeds again (`check`), the
        process answers from the database alone.  Logged once per outage."""
        with self._lock:
            now = time.monotonic()
            self._down_at = now
            # Neither the fast path (`fresh`) nor `check` may trust what was read before, and
            # the look for missed invalidations runs first when the cache answers again.
            self._read_at = self._durable_at = -math.inf
            memo.clear()
            if self.down_since is not None:
                return
            self.down_since = now
        log.warning(
            "the delivery cache is unreachable (%s); the device paths answer from the database "
            "until it is back",
            exc,
        )

    def _recovered(self, now: float) -> None:
        with self._lock:
            since, self.down_since = self.down_since, None
            self._refusal_logged = False
        if since is not None:
            log.warning("the delivery cache is back after %.1f s unreachable", now - since)

    def refused(self, exc: Exception) -> None:
        """A write the answer does not depend on failed (an entry, a throttling count): logged
        once until the cache is next found unreachable and back, and not while it is down."""
        with self._lock:
            if self._refusal_logged or self.down_since is not None:
                return
            self._refusal_logged = True
        log.warning("the delivery cache refuses writes (%s); the config path goes on without them", exc)

    def fresh(self) -> bool:
        """Whether a request may skip `check()` now: this process listens on the channel, the
        memo holds a marker read less than `MARKER_RECHECK_S` ago and is younger than
        `MEMO_MAX_AGE_S`, and the look for missed invalidations is not due.  (The ASGI fast path
        answers only then; otherwise the request goes to the view, whose `check()` does the
        reading.)"""
        if not self.live or self._pid != os.getpid() or memo.gen is MISS:
            return False
        now = time.monotonic()
        return (
            now - self._read_at < MARKER_RECHECK_S
            and now - memo.born <= MEMO_MAX_AGE_S
            and now - self._durable_at < DURABLE_RECHECK_S
        )

    def recheck_soon(self) -> None:
        """Look for missed invalidations at the next request (one just failed here)."""
        self._durable_at = -math.inf

    def verify(self, gen: object, now: float) -> tuple[object, bool]:
        """(the marker this request goes on with, whether the database was looked at): `gen`
        (just read from the cache), unless the database holds invalidations the cache missed —
        then a new marker, written and announced, and those rows deleted.  If the cache refuses
        that write, the process is `behind`: it reads the database instead of shared entries
        until a later look succeeds."""
        from devices.models import PendingInvalidation

        self._durable_at = now
        try:
            # The newest first: past 1,000 pending rows a new change is still among those seen.
            missed = list(PendingInvalidation.objects.order_by("-pk").values_list("pk", flat=True)[:1000])
        except DatabaseError as exc:  # warm entries still answer; looked for again next time
            if not self._db_failing:  # once per failing streak, not at every look
                log.warning("could not look for missed delivery invalidations (%s)", exc)
            self._db_failing = True
            return gen, False
        self._db_failing = False
        if not missed:
            if self.behind:
                log.warning("the delivery cache accepts writes again")
            self.behind, self._behind_ids = 0, frozenset()
            return gen, True
        marker = uuid.uuid4().hex
        try:
            cache.set(GEN_KEY, marker, None)
        except Exception as exc:
            seen = frozenset(missed)
            # Any change not seen before empties the memo — not only a newer id than the newest
            # seen: ids are taken at insert but committed in any order, so an older one can
            # appear after the memo was refilled from a database that did not hold it yet.
            if seen - self._behind_ids:
                if not self.behind:
                    log.warning(
                        "the delivery cache missed %d change(s) and refuses a new marker (%s); the "
                        "config path reads the database until it accepts one",
                        len(missed),
                        exc,
                    )
                memo.clear()
            self.behind, self._behind_ids = max(missed), seen
            return gen, True
        # (Usually a change whose writer failed or died; rarely one whose writer is finishing.)
        log.info("replaced the delivery marker for %d change(s) not known to be invalidated", len(missed))
        self.behind, self._behind_ids = 0, frozenset()
        self.publish(marker)
        try:  # only the rows seen: the marker was replaced after those committed
            PendingInvalidation.objects.filter(pk__in=missed).delete()
        except DatabaseError as exc:
            log.warning("could not delete delivery invalidations (%s); looked at again", exc)
        return marker, True

    def _durable_look(self, now: float) -> None:
        """The look for missed invalidations (`verify`), made by the listener thread ahead of
        time so that no request waits for its query.  Done by the request that found it due
        (as `check` still does where no listener runs), it sent every poll of the moment to the
        view: on the Intel AMX host, 2026-12-05, `bench serve`'s p99 went from 6–7 ms to 60–84 ms.
        The thread's connection is closed after each look, as a request's is under ASGI
        (`DB_CONN_MAX_AGE` 0): a connection held by a daemon thread would outlive its database
        (a test database cannot be dropped while it is open) and survive a database restart."""
        from django.db import connection

        try:
            gen = cache.get(GEN_KEY)
        except Exception as exc:
            self.unreachable(exc)
            return
        try:
            gen, _ = self.verify(gen, now)
        except Exception:  # not the listener's to die of: requests still look when it is due
            if not self._look_failing:  # once per failing streak, not every half second
                log.exception("looking for missed delivery invalidations failed")
            self._look_failing = True
        else:
            self._look_failing = False
        with contextlib.suppress(Exception):
            connection.close()
        memo.sync(gen)

    def _redis(self) -> Any:
        if self._client is None or self._client_pid != os.getpid():  # a forked child needs its own
            import redis

            # Timeouts as the cache's (EDGEFIT_CACHE_TIMEOUT_S): `publish` runs in a staff
            # request's commit callback, which a silently dropped connection would hold for
            # TCP's own timeout (minutes); the listener polls with its own shorter timeout.
            timeout = float(getattr(settings, "CACHE_TIMEOUT_S", 2.0))
            self._client = redis.Redis.from_url(
                str(self.redis_location),
                socket_keepalive=True,
                health_check_interval=15,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
            )
            self._client_pid = os.getpid()
        return self._client

    def publish(self, marker: str) -> None:
        if not self.redis_location:
            return
        for attempt in (1, 2):
            try:
                self._redis().publish(cache.make_key(CHANNEL), marker)
                return
            except Exception:
                if attempt == 2:  # the marker is set: listeners see it within MARKER_RECHECK_S
                    log.exception("could not publish a delivery invalidation")
                else:
                    self._client = None  # a fresh connection for the retry

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
            self._thread = thread

    def _listen(self, client: Any) -> None:
        channel = cache.make_key(CHANNEL)
        pid = os.getpid()
        backoff = 0.5
        lost = False  # logged once per loss, not at every retry while Redis is away
        while self._pid == pid and _store is self:
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(channel)
                pinged = time.monotonic()
                while self._pid == pid and _store is self:
                    message = pubsub.get_message(timeout=MARKER_RECHECK_S / 4)
                    now = time.monotonic()
                    if message is None and now - pinged > 5.0:
                        pubsub.ping()  # a dead connection raises here instead of waiting forever
                        pinged = now
                    elif message is not None and message["type"] == "subscribe":
                        memo.clear()  # changes made before we listened
                        self.live = True
                        backoff = 0.5
                        if lost:
                            log.info("delivery invalidation channel subscribed again")
                            lost = False
                    elif message is not None and message["type"] == "message":
                        memo.clear()
                    if self.live and self.down_since is None and now - self._read_at >= MARKER_RECHECK_S / 2:
                        # The bounded-staleness re-read, done here so that no request waits
                        # for it (and so that requests in the fast path never find it due).
                        # (Not while the cache is unreachable: `check` finds it back.)
                        self._read_at = now
                        try:
                            gen = cache.get(GEN_KEY)
                        except Exception as exc:
                            self.unreachable(exc)
                        else:
                            memo.sync(gen)
                    if (
                        self.live
                        and self.down_since is None
                        and now - self._durable_at >= DURABLE_RECHECK_S / 2
                    ):
                        self._durable_look(now)
            except Exception as exc:
                if not lost:
                    log.warning("delivery invalidation channel lost (%s); retrying", exc)
                lost = True
            finally:
                self.live = False
                memo.clear()
                with contextlib.suppress(Exception):
                    pubsub.close()
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


_store: Store | None = None


def stop_listener(timeout_s: float = 5.0) -> None:
    """Stop this process's invalidation listener and wait for it to end (its look for missed
    invalidations included).  For the end of a test session: a look in flight holds a
    connection to the test database, which then cannot be dropped."""
    global _store
    current, _store = _store, None  # the listener's loop ends when it is no longer the store
    if current is not None and current._thread is not None:
        current._thread.join(timeout_s)


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

    def _count(self, digest: str, now: float, cap: int | None = None) -> tuple[int, int] | None:
        """Count one request for `digest` in this process's window containing `now`:
        (count so far, window number); with `cap`, count nothing and return None when the
        count would pass it."""
        window = int(now // settings.EDGEFIT_DEVICE_RATE_WINDOW_S)
        with self._lock:
            if window != self._window:
                self._window, self._counts = window, {}
            local = self._counts.get(digest, 0) + 1
            if cap is not None and local > cap:
                return None
            self._counts[digest] = local
        return local, window

    def hit_locally(self, digest: str) -> bool:
        """Count one request if it stays within this process's share (an eighth of the limit),
        where `hit` would make no shared operation; otherwise count nothing and return False
        (the caller then goes through `hit`)."""
        return self._count(digest, time.time(), cap=settings.EDGEFIT_DEVICE_RATE_LIMIT // 8) is not None

    def hit(self, digest: str) -> float | None:
        """Count one request; None if allowed, else the seconds until the window ends."""
        limit = settings.EDGEFIT_DEVICE_RATE_LIMIT
        window_s = settings.EDGEFIT_DEVICE_RATE_WINDOW_S
        now = time.time()
        counted = self._count(digest, now)
        assert counted is not None  # no cap: always counted
        local, window = counted
        threshold = limit // 8
        if local <= threshold:
            return None
        key = f"delivery:rate:{digest[:32]}:{window}"
        current = store()
        # Without the shared cache the count is this process's own: the limit then holds per
        # web process.  Open, not closed: refusing (429) every device past an eighth of its
        # limit, or failing, would take a fleet that polls within its limit offline for as
        # long as Redis is away.  Not uncounted either: a flooding device is still stopped at
        # the limit in each process — which matters more then, as every request reads the
        # database.
        shared = local
        if current.down_since is None:
            try:
                cache.add(key, 0, window_s + 1)
                try:
                    # The first time past the threshold, bring the requests counted so far along.
                    shared = cache.incr(key, local if local == threshold + 1 else 1)
                except ValueError:  # expired between add and incr
                    shared = local
            except Exception as exc:
                current.refused(exc)
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
    return TokenEntry(str(row[0]), int(row[1]), str(row[2])) if row else None


def resolve_token(digest: str, epoch: int) -> TokenEntry | None:
    """The device a token digest belongs to, or None (unknown or revoked). `epoch` is
    `memo.epoch` read after `store().check()` at the start of the request.  Only known tokens
    are written to the shared cache; an unknown one is remembered in this process alone."""
    # (.get, not `in` + [ ]: another thread may empty the memo in between)
    known = memo.tokens.get(digest)
    if known is not None:
        return known
    if digest in memo.negative:
        return None
    key = token_key(digest)
    gen, shared = shared_read(key)
    if shared is MISS:
        entry = _token_from_db(digest)
        if entry is not None:
            shared_write(key, gen, tuple(entry), TOKEN_TTL_S)
    else:
        entry = TokenEntry(str(shared[0]), int(shared[1]), str(shared[2]))
    if entry is None:
        memo.remember("negative", digest, None, epoch, gen)
    else:
        memo.remember("tokens", digest, entry, epoch, gen)
    return entry


# --------------------------------------------------------------------------- writers


def note_change(keys: Iterable[str] = ()) -> None:
    """Call in the transaction of a change to what the config path serves: records the change
    durably (a `PendingInvalidation` row) and, on commit, drops the shared entries under `keys`,
    replaces the marker (`bump_generation`) and deletes the row.  Should the cache fail then,
    the change still stands and nothing is raised: the row stays, and every process finds it
    within `DURABLE_RECHECK_S` and replaces the marker (`Store.verify`)."""
    from devices.models import PendingInvalidation

    pending = PendingInvalidation.objects.create().pk
    stale = list(keys)
    transaction.on_commit(lambda: _invalidate(stale, pending))


def forget_tokens_on_commit(digests: Iterable[str]) -> None:
    """`note_change` for device tokens (revoked, deleted, or their device changed)."""
    note_change(token_key(d) for d in digests)


def _invalidate(keys: list[str], pending: int) -> None:
    from devices.models import PendingInvalidation

    if keys:
        try:
            cache.delete_many(keys)
        except Exception:  # the new marker refuses them anyway
            log.exception("could not delete %d delivery cache entries", len(keys))
    if not bump_generation():
        return
    try:
        PendingInvalidation.objects.filter(pk=pending).delete()
    except DatabaseError:  # a process's next look deletes it (and replaces the marker once more)
        log.exception("could not delete delivery invalidation %d", pending)


def bump_generation() -> bool:
    """Replace the marker and announce it: every process drops its memo before its next request
    (this one at once; the others when the message arrives, within a millisecond on a LAN).
    Never raises: if the cache refuses the marker, the error is logged, False is returned, and
    the change's `PendingInvalidation` row gets the marker replaced later (`Store.verify`; this
    process looks at its next request)."""
    marker = uuid.uuid4().hex
    try:
        cache.set(GEN_KEY, marker, None)
    except Exception:
        log.exception("could not replace the delivery marker; retried within %ss", DURABLE_RECHECK_S)
        store().recheck_soon()
        return False
    finally:
        memo.clear()
    store().publish(marker)
    return True
