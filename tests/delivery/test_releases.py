"""Releases: buckets, rollout, rollback, If-Match, audit, who may publish."""

from __future__ import annotations

import uuid

import pytest

from registry.models import AuditEntry, Release
from registry.releases import ReleaseError, bucket, publish, rollback, set_rollout
from registry.releases import publish as publish_release

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


def test_raising_the_rollout_through_set_rollout_keeps_every_device_that_had_the_new_package(
    profile, make_variant, make_package, publish, staff, committed
):
    from registry.delivery import build_profile_state, config_for

    old = make_package(make_variant("old"))
    new = make_package(make_variant("new", precision="int8"))
    publish(old.variant, profile)
    head = publish(new.variant, profile, rollout_percent=30)
    ids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(3000)]

    def reached() -> set[str]:
        state = build_profile_state(profile.pk)
        digests = {d: (config_for(d, "stable", state)["package"] or {}).get("digest") for d in ids}
        assert set(digests.values()) == {old.digest, new.digest}  # everyone gets one of the two
        return {d for d, digest in digests.items() if digest == new.digest}

    at_30 = reached()
    with committed():
        set_rollout(head, 60, if_match=head.etag, by=staff)
    at_60 = reached()
    assert at_30 <= at_60
    assert abs(len(at_30) / len(ids) - 0.30) < 0.04
    assert abs(len(at_60) / len(ids) - 0.60) < 0.04


def test_if_match_compares_strongly(api_as, staff, profile, package, publish):
    release = publish(package.variant, profile, rollout_percent=10)
    url = f"{URL}{release.pk}/"
    weak = api_as(staff).patch(url, {"rollout_percent": 50}, format="json", HTTP_IF_MATCH="W/" + release.etag)
    assert weak.status_code == 412
    assert Release.objects.get(pk=release.pk).rollout_percent == 10
    with pytest.raises(ReleaseError) as refused:
        rollback(release, by=staff, if_match=f"W/{release.etag}")
    assert refused.value.status == 412


def test_a_pending_release_older_than_the_head_is_superseded_not_activated(
    profile, make_variant, make_package, staff, publish, package_dir, django_capture_on_commit_callbacks
):
    from registry.releases import activate_pending

    slow = make_variant("slow", precision="int8")
    with django_capture_on_commit_callbacks(execute=False):
        pending = publish_release(variant=slow, profile=profile, by=staff)
    newer = publish(make_package(make_variant("fast")).variant, profile)
    assert activate_pending(slow, make_package(slow)) == []
    pending.refresh_from_db()
    newer.refresh_from_db()
    assert newer.status == Release.Status.ACTIVE and newer.previous is None
    assert pending.status == Release.Status.SUPERSEDED and pending.package is None
    entry = AuditEntry.objects.filter(action="release.supersede", target_id=str(pending.pk)).get()
    assert entry.before["status"] == "pending" and str(newer.pk) in entry.after["reason"]


def test_an_activation_that_breaks_a_constraint_fails_the_release_instead_of_leaving_it_pending(
    profile, variant, make_package, staff, package_dir, django_capture_on_commit_callbacks, monkeypatch
):
    from django.db import IntegrityError

    from registry import releases

    with django_capture_on_commit_callbacks(execute=False):
        pending = publish_release(variant=variant, profile=profile, by=staff)

    def clash(*args, **kwargs):
        raise IntegrityError("one_active_release_per_alias")

    monkeypatch.setattr(releases, "_activate", clash)
    assert releases.activate_pending(variant, make_package(variant)) == []
    pending.refresh_from_db()
    assert pending.status == Release.Status.FAILED and "one_active_release_per_alias" in pending.error
    assert AuditEntry.objects.filter(action="release.fail", target_id=str(pending.pk)).exists()


def test_rollback_skips_a_previous_release_whose_status_changed_before_it_was_locked(
    profile, make_variant, make_package, publish, staff, monkeypatch
):
    from registry import releases

    first = publish(make_package(make_variant("a")).variant, profile)
    second = publish(make_package(make_variant("b", precision="int8")).variant, profile)
    third = publish(make_package(make_variant("c", precision="int4")).variant, profile)
    locked = releases._locked

    def racing(release):
        # Another transaction rolls `second` back just before this one gets its lock.
        if (release.pk if isinstance(release, Release) else release) == second.pk:
            Release.objects.filter(pk=second.pk).update(status=Release.Status.ROLLED_BACK)
        return locked(release)

    monkeypatch.setattr(releases, "_locked", racing)
    _, restored = rollback(third, by=staff)
    assert restored is not None and restored.pk == first.pk
    assert Release.objects.get(pk=second.pk).status == Release.Status.ROLLED_BACK
    assert Release.objects.get(pk=first.pk).status == Release.Status.ACTIVE


def test_publishing_is_refused_only_for_a_profile_that_cannot_run_the_variant(
    make_profile, make_variant, make_package, staff
):
    int4 = make_package(make_variant("int4", precision="int4")).variant
    # No int4 listed: the cost model runs int4 weights in int8 (a fallback, not a refusal).
    fallback = make_profile("Int8 Phone", weight_formats=["fp16", "int8"])
    assert publish_release(variant=int4, profile=fallback, by=staff).status == Release.Status.ACTIVE
    hopeless = make_profile("Int8 Only", weight_formats=["int8"], fp16_tflops=None, activation_formats=[])
    with pytest.raises(ReleaseError) as refused:
        publish_release(variant=int4, profile=hopeless, by=staff)
    assert "variant" in refused.value.errors
    assert not Release.objects.filter(profile=hopeless).exists()


def test_a_numeric_string_profile_is_a_slug_and_a_json_number_is_an_id(
    api_as, staff, make_profile, package, django_capture_on_commit_callbacks
):
    numeric = make_profile("2024")  # slug "2024"
    decoy = make_profile("Decoy")
    assert numeric.slug == "2024" and decoy.pk != 2024
    client = api_as(staff)
    body = {"variant": package.variant_id, "alias": "stable"}
    with django_capture_on_commit_callbacks(execute=True):
        by_slug = client.post(URL, body | {"profile": "2024"}, format="json")
        by_pk = client.post(URL, body | {"profile": decoy.pk, "alias": "canary"}, format="json")
        by_pk_text = client.post(URL, body | {"profile": str(decoy.pk), "alias": "beta"}, format="json")
    assert by_slug.status_code == 201, by_slug.json()
    assert Release.objects.get(pk=by_slug.json()["id"]).profile == numeric
    assert by_pk.status_code == 201 and Release.objects.get(pk=by_pk.json()["id"]).profile == decoy
    assert by_pk_text.status_code == 400 and "profile" in by_pk_text.json()["errors"]


def test_the_admin_cannot_delete_releases_audit_entries_or_packages(rf, admin_user):
    from django.contrib import admin

    from registry.models import Package

    request = rf.get("/admin/")
    request.user = admin_user  # a superuser: every permission the admin class does not deny
    for model in (Release, AuditEntry, Package):
        model_admin = admin.site._registry[model]
        assert not model_admin.has_delete_permission(request), model.__name__
        assert not model_admin.has_add_permission(request), model.__name__


def test_a_profile_with_releases_is_not_deleted_with_them(api_as, staff, profile, package, publish):
    publish(package.variant, profile)
    response = api_as(staff).delete(f"/api/v1/devices/profiles/{profile.pk}/")
    assert response.status_code == 409
    assert "1 release(s), which would be deleted with it" in response.json()["errors"]["profile"][0]
    assert Release.objects.filter(profile=profile).exists()
