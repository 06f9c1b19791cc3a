"""Releases: publish a variant to a device profile under an alias, roll it out, roll it back.

Rules (docs/delivery.md):
  * per (profile, alias) one release is `active` — the head; publishing makes the new release
    the head once its package exists (`pending` until `workers.build_package` has built it),
    and links the old head as `previous`;
  * a device's bucket is `int(sha256(f"{seed}:{device_id}")[:8], 16) % 100`; it gets the head
    when its bucket < rollout_percent, else the nearest previous release that is fully rolled
    out (or nothing) — so raising the percentage only ever adds devices;
  * rollback marks the head rolled back and makes its previous release the head again;
  * every change is audited (who, when, before → after) in its own transaction, and drops the
    profile's cached config state on commit;
  * a rollout change names the version it changes (`If-Match: "<version>"`): a stale one is
    refused (412), a missing one too (428); a rollback's If-Match is optional (docs/delivery.md),
    but a stale one is refused (412) as well;
  * a pending release whose `workers.build_package` message was lost (broker down at commit,
    Redis restarted) is found by `stale_pending` and its build enqueued again.
"""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from devices.models import DeviceProfile
from registry import audit
from registry.delivery import bucket, forget_profile_on_commit
from registry.dispatch import enqueue
from registry.models import Package, Release, Variant

__all__ = [
    "ReleaseError",
    "activate_pending",
    "bucket",
    "etag_matches",
    "fail_pending",
    "publish",
    "rollback",
    "set_rollout",
    "stale_pending",
]

_ALIAS = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class ReleaseError(ValueError):
    """A refused release change: `errors` maps fields to rules; `status` is the HTTP status."""

    def __init__(self, errors: dict[str, str], status: int = 400) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors
        self.status = status


def etag_matches(header: str, etag: str, *, strong: bool = False) -> bool:
    """Does an If-Match / If-None-Match header name `etag`? (`*` matches.)

    RFC 9110 §8.8.3.2: If-None-Match compares weakly (a `W/` prefix is ignored); If-Match
    compares strongly (`strong=True`): a weak tag on either side never matches."""
    if header.strip() == "*":
        return True
    if strong:
        return not etag.startswith("W/") and any(part.strip() == etag for part in header.split(","))
    bare = etag.removeprefix("W/")
    return any(part.strip().removeprefix("W/") == bare for part in header.split(","))


def _state(release: Release) -> dict[str, Any]:
    return {
        "status": release.status,
        "rollout_percent": release.rollout_percent,
        "variant": release.variant_id,
        "package": release.package.digest if release.package_id and release.package else None,
        "previous": release.previous_id,
        "version": release.version,
    }


def _check_percent(value: Any, errors: dict[str, str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        errors["rollout_percent"] = "an integer percentage from 0 to 100"
        return 0
    return value


def _check_runnable(variant: Variant, profile: DeviceProfile, errors: dict[str, str]) -> None:
    """Refuse only what the profile truly cannot run.  A precision the device does not list is
    not a reason: the cost model (`planner.cost.compute_precision`) prices it in the next wider
    precision the device has, and the runtime runs it that way.  Only a precision with no wider
    compute precision at all (no fp16 or fp32 peak either) is refused."""
    from planner.cost import compute_precision
    from planner.specs import Plan, PlanError

    try:
        plan = Plan.from_dict(variant.plan)
        device = profile.to_device_spec()
        for precision in sorted({scheme.precision for _, scheme in plan.schemes} | {"fp32"}):
            compute_precision(precision, device)
    except PlanError as exc:
        errors["variant"] = f"profile {profile.slug!r} cannot run this variant: {exc}"


def publish(
    *,
    variant: Variant | int,
    profile: DeviceProfile | int | str,
    alias: str = "stable",
    rollout_percent: int = 100,
    by: Any = None,
) -> Release:
    """Create a release; it becomes the alias's head at once when the variant's package exists,
    else when `workers.build_package` (enqueued on commit) has built it."""
    from registry.packages import usable_package

    errors: dict[str, str] = {}
    if isinstance(variant, int):
        variant_obj = Variant.objects.select_related("base_model").filter(pk=variant).first()
        if variant_obj is None:
            errors["variant"] = f"unknown variant {variant}"
    else:
        variant_obj = variant
    if isinstance(profile, DeviceProfile):
        profile_obj: DeviceProfile | None = profile
    else:
        lookup = {"slug": profile} if isinstance(profile, str) else {"pk": profile}
        profile_obj = DeviceProfile.objects.filter(**lookup).first()
        if profile_obj is None:
            errors["profile"] = f"unknown device profile {profile!r}"
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        errors["alias"] = "lowercase letters, digits, '-' or '_', starting with a letter or digit, ≤ 40"
    percent = _check_percent(rollout_percent, errors)
    if variant_obj is not None and not variant_obj.base_model.adapter:
        errors["variant"] = "its model is spec-only (no weights): nothing to package"
    if variant_obj is not None and profile_obj is not None and "variant" not in errors:
        _check_runnable(variant_obj, profile_obj, errors)
    if errors:
        raise ReleaseError(errors)
    assert variant_obj is not None and profile_obj is not None
    package = usable_package(variant_obj)
    try:
        with transaction.atomic():
            release = Release.objects.create(
                profile=profile_obj,
                alias=alias,
                variant=variant_obj,
                rollout_percent=percent,
                seed=secrets.token_hex(8),
                created_by=by if getattr(by, "is_authenticated", False) else None,
            )
            audit.record(by, "release.publish", release, None, _state(release))
            if package is not None:
                _activate(release, package, by)
            else:
                variant_id = variant_obj.pk
                transaction.on_commit(lambda: enqueue("workers.build_package", variant_id))
    except IntegrityError:
        raise ReleaseError(
            {"alias": "another release of this alias was published at the same moment"}, 409
        ) from None
    release.refresh_from_db()
    return release


def _activate(release: Release, package: Package, by: Any) -> None:
    """Make `release` the head of its alias (inside the caller's transaction)."""
    head = (
        Release.objects.select_for_update()
        .filter(profile_id=release.profile_id, alias=release.alias, status=Release.Status.ACTIVE)
        .exclude(pk=release.pk)
        .first()
    )
    if head is not None:
        before = _state(head)
        head.status = Release.Status.SUPERSEDED
        head.version += 1
        head.save(update_fields=["status", "version", "updated_at"])
        audit.record(by, "release.supersede", head, before, _state(head))
    before = _state(release)
    release.package = package
    release.previous = head
    release.status = Release.Status.ACTIVE
    release.activated_at = timezone.now()
    release.version += 1
    release.save(update_fields=["package", "previous", "status", "activated_at", "version", "updated_at"])
    audit.record(by, "release.activate", release, before, _state(release))
    forget_profile_on_commit(release.profile_id)


def activate_pending(variant: Variant, package: Package) -> list[Release]:
    """The package of `variant` exists: its pending releases become heads, oldest first.

    A pending release older than its alias's current head is not activated — that would
    silently replace a newer publish: it is marked superseded (audited) instead.  A release
    that cannot become the head (a concurrent activation broke a constraint) is marked failed
    with the reason, never left pending."""
    done = []
    with transaction.atomic():
        pending = Release.objects.select_for_update().filter(variant=variant, status=Release.Status.PENDING)
        for release in pending.order_by("created_at", "pk"):
            newer = (
                Release.objects.filter(
                    profile_id=release.profile_id,
                    alias=release.alias,
                    status=Release.Status.ACTIVE,
                    created_at__gt=release.created_at,
                )
                .values_list("pk", flat=True)
                .first()
            )
            if newer is not None:
                before = _state(release)
                release.status = Release.Status.SUPERSEDED
                release.version += 1
                release.save(update_fields=["status", "version", "updated_at"])
                audit.record(
                    None,
                    "release.supersede",
                    release,
                    before,
                    {**_state(release), "reason": f"release {newer}, published later, is already the head"},
                )
                continue
            try:
                with transaction.atomic():
                    _activate(release, package, None)
            except IntegrityError as exc:
                release.refresh_from_db()
                _fail(release, f"could not become the head of {release.alias!r}: {exc}")
                continue
            done.append(release)
    return done


def stale_pending() -> list[int]:
    """Variants with a release pending for longer than EDGEFIT_STALE_SECONDS: their build
    message was lost or its worker died.  The caller enqueues `workers.build_package` for each.

    The releases' `updated_at` is bumped (the version is not: nothing a client sees changes),
    so a build that is merely slow is enqueued again once per stale period, not every sweep."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.EDGEFIT_STALE_SECONDS)
    with transaction.atomic():
        pending = Release.objects.select_for_update().filter(
            status=Release.Status.PENDING, updated_at__lt=stale
        )
        variants = sorted(set(pending.values_list("variant_id", flat=True)))
        pending.update(updated_at=now)
    return variants


def _fail(release: Release, error: str) -> None:
    before = _state(release)
    release.status = Release.Status.FAILED
    release.error = error[:5000]
    release.version += 1
    release.save(update_fields=["status", "error", "version", "updated_at"])
    audit.record(None, "release.fail", release, before, {**_state(release), "error": error[:500]})


def fail_pending(variant: Variant, error: str) -> None:
    with transaction.atomic():
        for release in Release.objects.select_for_update().filter(
            variant=variant, status=Release.Status.PENDING
        ):
            _fail(release, error)


def _locked(release: Release | int) -> Release:
    pk = release.pk if isinstance(release, Release) else release
    found = Release.objects.select_for_update(of=("self",)).select_related("package").filter(pk=pk).first()
    if found is None:
        raise ReleaseError({"release": "not found"}, 404)
    return found


def _check_version(locked: Release, if_match: str | None, required: bool) -> None:
    if if_match is None or not if_match.strip():
        if required:
            raise ReleaseError(
                {"If-Match": f"send If-Match: {locked.etag} (the version you are changing)"}, 428
            )
        return
    if not etag_matches(if_match, locked.etag, strong=True):
        raise ReleaseError(
            {"If-Match": f"stale: the release is now at version {locked.etag}, you sent {if_match.strip()}"},
            412,
        )


def set_rollout(release: Release | int, rollout_percent: Any, *, if_match: str | None, by: Any) -> Release:
    """Change the head's (or a pending release's) rollout percentage; `if_match` is required."""
    errors: dict[str, str] = {}
    percent = _check_percent(rollout_percent, errors)
    with transaction.atomic():
        locked = _locked(release)
        _check_version(locked, if_match, required=True)
        if errors:
            raise ReleaseError(errors)
        if locked.status not in (Release.Status.ACTIVE, Release.Status.PENDING):
            raise ReleaseError(
                {"status": f"a {locked.status} release cannot change; publish a new release instead"}, 409
            )
        before = _state(locked)
        locked.rollout_percent = percent
        locked.version += 1
        locked.save(update_fields=["rollout_percent", "version", "updated_at"])
        audit.record(by, "release.rollout", locked, before, _state(locked))
        forget_profile_on_commit(locked.profile_id)
    return locked


def rollback(
    release: Release | int, *, by: Any, if_match: str | None = None
) -> tuple[Release, Release | None]:
    """Roll the head back: it is marked rolled back and its previous release (skipping any that
    were rolled back or failed) is the head again. Returns (rolled back, new head or None)."""
    with transaction.atomic():
        locked = _locked(release)
        _check_version(locked, if_match, required=False)
        if locked.status != Release.Status.ACTIVE:
            raise ReleaseError(
                {"status": f"only the head of an alias can be rolled back (this one is {locked.status})"},
                409,
            )
        # Lock each candidate before judging its status: what was read unlocked may have
        # changed (another rollback, a concurrent change) by the time we hold it.
        restored: Release | None = None
        candidate_id = locked.previous_id
        while candidate_id is not None:
            candidate = _locked(candidate_id)
            if candidate.status == Release.Status.SUPERSEDED:
                restored = candidate
                break
            candidate_id = candidate.previous_id
        before = {"head": locked.pk, **_state(locked)}
        locked.status = Release.Status.ROLLED_BACK
        locked.version += 1
        locked.save(update_fields=["status", "version", "updated_at"])
        if restored is not None:
            restored.status = Release.Status.ACTIVE
            restored.version += 1
            restored.save(update_fields=["status", "version", "updated_at"])
        after = {
            "head": restored.pk if restored else None,
            "package": restored.package.digest if restored and restored.package else None,
            "rollout_percent": restored.rollout_percent if restored else None,
            **{f"rolled_back_{k}": v for k, v in _state(locked).items() if k in ("status", "version")},
        }
        audit.record(by, "release.rollback", locked, before, after)
        forget_profile_on_commit(locked.profile_id)
    return locked, restored
