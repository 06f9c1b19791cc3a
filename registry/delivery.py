"""The device config answer: which package a device gets, rendered once and served from memory.

A profile's *delivery state* — per alias, the head release and the nearest previous release
that is fully rolled out, each with its package's config entry — is built from the database on
a miss, kept in the shared cache (`profile_key`, tagged with the generation marker it was built
at) and in the process memo (`devices.hotpath`), and dropped on commit of any release change
(`forget_profile_on_commit`).  A device's answer depends only
on that state and on (device id, channel), so its JSON bytes and ETag are rendered once per
state and reused for every poll until the state changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from django.conf import settings

from devices import hotpath
from devices.models import DeviceProfile
from registry.models import Release
from registry.packages import package_answer

__all__ = [
    "PROFILE_TTL_S",
    "Choice",
    "ProfileState",
    "RenderedConfig",
    "bucket",
    "build_profile_state",
    "config_for",
    "forget_profile_on_commit",
    "profile_key",
    "profile_state",
    "render_config",
]

#: Safety net: a profile's state is rebuilt after this long even if no change was seen.
PROFILE_TTL_S = 3600


class Choice(NamedTuple):
    """One release a device may get: it does when its bucket < `percent`."""

    percent: int
    seed: str
    answer: dict[str, Any]  # the config answer's `package` object


class ProfileState(NamedTuple):
    """What every device of a profile is answered from: per alias, (head, fallback?) where the
    fallback is the nearest previous release of the head that is fully rolled out."""

    slug: str
    aliases: dict[str, tuple[Choice, ...]]


class RenderedConfig(NamedTuple):
    body: bytes
    etag: str  # strong
    state: ProfileState  # the state it was rendered from (identity marks it current)


def profile_key(profile_id: int) -> str:
    return f"delivery:profile:{profile_id}"


def _choice(release: Release) -> Choice:
    assert release.package is not None
    return Choice(release.rollout_percent, release.seed, package_answer(release.package, release.pk))


def build_profile_state(profile_id: int) -> ProfileState:
    """The profile's state from the database (a few queries)."""
    slug = DeviceProfile.objects.filter(pk=profile_id).values_list("slug", flat=True).first() or ""
    heads = (
        Release.objects.filter(profile_id=profile_id, status=Release.Status.ACTIVE, package__isnull=False)
        .select_related("package__variant__base_model", "previous__package__variant__base_model")
        .order_by("alias")
    )
    aliases: dict[str, tuple[Choice, ...]] = {}
    for head in heads:
        chain = [_choice(head)]
        if head.rollout_percent < 100:
            previous = head.previous
            while previous is not None and not (
                previous.status == Release.Status.SUPERSEDED
                and previous.rollout_percent == 100
                and previous.package is not None
            ):
                previous = previous.previous
            if previous is not None:
                chain.append(_choice(previous))
        aliases[head.alias] = tuple(chain)
    return ProfileState(slug, aliases)


def profile_state(profile_id: int, epoch: int) -> ProfileState:
    """The profile's delivery state: process memo → shared cache → database. `epoch`: the
    memo's epoch at the start of the request (see `devices.hotpath`)."""
    state: ProfileState | None = hotpath.memo.profiles.get(profile_id)
    if state is not None:
        return state
    key = profile_key(profile_id)
    gen, shared = hotpath.shared_read(key)
    if isinstance(shared, ProfileState):
        state = shared
    else:  # (MISS, or an entry of an older layout)
        state = build_profile_state(profile_id)
        hotpath.shared_write(key, gen, state, PROFILE_TTL_S)
    hotpath.memo.remember("profiles", profile_id, state, epoch, gen)
    return state


def bucket(seed: str, device_id: str) -> int:
    """The device's bucket (0–99) for a release seed: stable, uniform, independent per seed."""
    return int(hashlib.sha256(f"{seed}:{device_id}".encode()).hexdigest()[:8], 16) % 100


def config_for(device_id: str, channel: str, state: ProfileState) -> dict[str, Any]:
    """The config answer of one device (docs/delivery.md, "Config answer")."""
    package = None
    chain = state.aliases.get(channel) or ()
    if chain:
        head = chain[0]
        if bucket(head.seed, device_id) < head.percent:
            package = head.answer
        elif len(chain) > 1:
            package = chain[1].answer
    return {
        "device_id": device_id,
        "profile": state.slug,
        "channel": channel,
        "package": package,
        "poll_interval_s": settings.EDGEFIT_POLL_INTERVAL_S,
        "poll_jitter_s": settings.EDGEFIT_POLL_JITTER_S,
    }


def render_config(device_id: str, channel: str, state: ProfileState) -> RenderedConfig:
    body = json.dumps(config_for(device_id, channel, state), sort_keys=True, separators=(",", ":")).encode()
    return RenderedConfig(body, '"' + hashlib.sha256(body).hexdigest()[:40] + '"', state)


def forget_profile_on_commit(profile_id: int) -> None:
    """In the transaction of a change to the profile's delivery state: on commit, drop its
    shared state and replace the marker (every process re-reads; entries built before are
    refused) — durably, even if the cache fails then (`devices.hotpath.note_change`)."""
    hotpath.note_change([profile_key(profile_id)])
