"""Releases: buckets, rollout, rollback, If-Match, audit, who may publish."""

from __future__ import annotations

import uuid

import pytest

from registry.models import AuditEntry, Release
from registry.releases import ReleaseError, bucket, publish, rollback, set_rollout

pytestmark = pytest.mark.django_db
URL = "/api/v1/releases/"


def test_a_bucket_is_stable_and_spread_evenly():
    ids = [str(uuid.UUID(int=i)) for i in range(5000)]
    assert bucket("seed", ids[0]) == bucket("seed", ids[0])
    counts = [0] * 100
    for device in ids:
        counts[bucket("seed", device)] += 1
    assert min(counts) > 20 and max(counts) < 80  # ~50 each
    # Independent seeds: a canary's first 10 % are not the same devices every time.
    first = {d for d in ids if bucket("a", d) < 10}
    second = {d for d in ids if bucket("b", d) < 10}
    assert len(first & second) < len(first) / 4


def test_raising_the_rollout_only_adds_devices():
    ids = [str(uuid.uuid4()) for _ in range(2000)]
    reached = set()
    for percent in (0, 1, 5, 10, 25, 50, 75, 99, 100):
        now = {d for d in ids if bucket("s33d", d) < percent}
        assert reached <= now
        reached = now
    assert reached == set(ids)


def test_publishing_makes_the_release_the_head_and_supersedes_the_old_one(
    profile, make_variant, make_package, publish, staff
):
    first = publish(make_package(make_variant("a")).variant, profile)
    assert first.status == Release.Status.ACTIVE and first.previous is None
    second = publish(make_package(make_variant("b", precision="int8")).variant, profile)
    first.refresh_from_db()
    assert second.status == Release.Status.ACTIVE and second.previous == first
    assert first.status == Release.Status.SUPERSEDED
    actions = list(AuditEntry.objects.order_by("id").values_list("action", flat=True))
    assert actions == [
        "release.publish",
        "release.activate",
        "release.publish",
        "release.supersede",
        "release.activate",
    ]
    assert AuditEntry.objects.filter(actor=staff).count() == 5


def test_publishing_a_variant_without_a_package_waits_for_its_build(
    profile, variant, staff, package_dir, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        release = publish(variant=variant, profile=profile, by=staff)
    assert release.status == Release.Status.PENDING and release.package is None
    assert len(callbacks) == 1  # workers.build_package, once committed


def test_a_pending_release_becomes_the_head_when_its_package_is_built(
    profile, variant, make_package, staff, package_dir, django_capture_on_commit_callbacks
):
    from registry.releases import activate_pending

    with django_capture_on_commit_callbacks(execute=False):
        release = publish(variant=variant, profile=profile, by=staff)
    package = make_package(variant)
    activate_pending(variant, package)
    release.refresh_from_db()
    assert release.status == Release.Status.ACTIVE and release.package == package


def test_a_failed_build_marks_waiting_releases_failed(
    profile, variant, staff, django_capture_on_commit_callbacks
):
    from registry.releases import fail_pending

    with django_capture_on_commit_callbacks(execute=False):
        release = publish(variant=variant, profile=profile, by=staff)
    fail_pending(variant, "PlanError: boom")
    release.refresh_from_db()
    assert release.status == Release.Status.FAILED and "boom" in release.error


def test_rollback_puts_the_previous_release_back_in_one_call(
    profile, make_variant, make_package, publish, staff
):
    first = publish(make_package(make_variant("a")).variant, profile)
    second = publish(make_package(make_variant("b", precision="int8")).variant, profile)
    rolled, active = rollback(second, by=staff)
    assert rolled.status == Release.Status.ROLLED_BACK and active == first
    first.refresh_from_db()
    assert first.status == Release.Status.ACTIVE
    entry = AuditEntry.objects.get(action="release.rollback")
    assert entry.before["head"] == second.pk and entry.after["head"] == first.pk
    with pytest.raises(ReleaseError) as refused:
        rollback(second, by=staff)
    assert refused.value.status == 409
    third = publish(make_package(make_variant("c", precision="int4")).variant, profile)
    assert third.previous == first  # the rolled-back release is out of the history


def test_rolling_back_the_only_release_leaves_the_alias_empty(profile, package, publish, staff):
    release = publish(package.variant, profile)
    _rolled, active = rollback(release, by=staff)
    assert active is None and not Release.objects.filter(status=Release.Status.ACTIVE).exists()


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"rollout_percent": 101}, "rollout_percent"),
        ({"rollout_percent": -1}, "rollout_percent"),
        ({"alias": "Not An Alias!"}, "alias"),
        ({"profile": "no-such-profile"}, "profile"),
        ({"variant": 999_999}, "variant"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_publish_input_is_400_naming_the_field(api_as, staff, profile, package, fields, bad):
    body = {"variant": package.variant_id, "profile": profile.slug, "alias": "stable", "rollout_percent": 10}
    response = api_as(staff).post(URL, body | fields, format="json")
    assert response.status_code == 400, response.json()
    assert bad in response.json()["errors"]
    assert not Release.objects.exists()


def test_staff_publish_over_the_api(api_as, staff, profile, package, django_capture_on_commit_callbacks):
    body = {"variant": package.variant_id, "profile": profile.slug, "alias": "canary", "rollout_percent": 10}
    with django_capture_on_commit_callbacks(execute=True):
        response = api_as(staff).post(URL, body, format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert data["status"] == "active" and data["package_digest"] == package.digest
    assert response["ETag"] == f'"{data["version"]}"'


@pytest.mark.parametrize(("role", "status"), [("viewer", 403), ("outsider", 403), ("anonymous", 401)])
def test_only_staff_publish(api_as, viewer, outsider, profile, package, role, status):
    user = {"viewer": viewer, "outsider": outsider, "anonymous": None}[role]
    body = {"variant": package.variant_id, "profile": profile.slug}
    assert api_as(user).post(URL, body, format="json").status_code == status
    assert not Release.objects.exists()


@pytest.mark.parametrize(("role", "status"), [("viewer", 403), ("outsider", 403), ("anonymous", 401)])
def test_only_staff_roll_back(api_as, viewer, outsider, profile, package, publish, role, status):
    release = publish(package.variant, profile)
    user = {"viewer": viewer, "outsider": outsider, "anonymous": None}[role]
    assert api_as(user).post(f"{URL}{release.pk}/rollback/").status_code == status
    assert Release.objects.get(pk=release.pk).status == Release.Status.ACTIVE


def test_viewers_read_releases_with_their_etag(api_as, viewer, profile, package, publish):
    release = publish(package.variant, profile)
    response = api_as(viewer).get(f"{URL}{release.pk}/")
    assert response.status_code == 200 and response["ETag"] == release.etag
    assert api_as(viewer).get(URL).json()["count"] == 1


def test_patch_needs_the_current_version_in_if_match(api_as, staff, viewer, profile, package, publish):
    release = publish(package.variant, profile, rollout_percent=10)
    url = f"{URL}{release.pk}/"
    client = api_as(staff)
    missing = client.patch(url, {"rollout_percent": 50}, format="json")
    assert missing.status_code == 428 and "If-Match" in missing.json()["errors"]
    ok = client.patch(url, {"rollout_percent": 50}, format="json", HTTP_IF_MATCH=release.etag)
    assert ok.status_code == 200 and ok.json()["rollout_percent"] == 50
    assert ok["ETag"] != release.etag
    stale = client.patch(url, {"rollout_percent": 80}, format="json", HTTP_IF_MATCH=release.etag)
    assert stale.status_code == 412
    assert Release.objects.get(pk=release.pk).rollout_percent == 50
    assert (
        api_as(viewer).patch(url, {"rollout_percent": 0}, format="json", HTTP_IF_MATCH=ok["ETag"]).status_code
        == 403
    )
    bad = client.patch(url, {"rollout_percent": 500}, format="json", HTTP_IF_MATCH=ok["ETag"])
    assert bad.status_code == 400 and "rollout_percent" in bad.json()["errors"]
    entry = AuditEntry.objects.get(action="release.rollout")
    assert (entry.before["rollout_percent"], entry.after["rollout_percent"]) == (10, 50)
    assert entry.actor_label == staff.username


def test_a_superseded_release_cannot_change(profile, make_variant, make_package, publish, staff):
    first = publish(make_package(make_variant("a")).variant, profile)
    publish(make_package(make_variant("b", precision="int8")).variant, profile)
    first.refresh_from_db()
    with pytest.raises(ReleaseError) as refused:
        set_rollout(first, 50, if_match=first.etag, by=staff)
    assert refused.value.status == 409


def test_rollback_over_the_api_and_a_stale_if_match(
    api_as, staff, profile, make_variant, make_package, publish
):
    first = publish(make_package(make_variant("a")).variant, profile)
    second = publish(make_package(make_variant("b", precision="int8")).variant, profile)
    stale = api_as(staff).post(f"{URL}{second.pk}/rollback/", HTTP_IF_MATCH='"1"')
    assert stale.status_code == 412
    response = api_as(staff).post(f"{URL}{second.pk}/rollback/", HTTP_IF_MATCH=second.etag)
    assert response.status_code == 200, response.json()
    assert response.json()["rolled_back"]["status"] == "rolled_back"
    assert response.json()["active"]["id"] == first.pk


def test_the_audit_log_says_who_when_and_before_after(api_as, viewer, staff, profile, package, publish):
    release = publish(package.variant, profile, rollout_percent=10)
    set_rollout(release, 40, if_match=release.etag, by=staff)
    entries = api_as(viewer).get("/api/v1/audit/", {"action": "release.rollout"}).json()["results"]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["actor"] == staff.username and entry["at"]
    assert entry["target_type"] == "release" and entry["target_id"] == str(release.pk)
    assert entry["before"]["rollout_percent"] == 10 and entry["after"]["rollout_percent"] == 40
