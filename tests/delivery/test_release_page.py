"""The releases page: per profile heads, history, audit; staff roll back with CSRF."""

from __future__ import annotations

import pytest
from django.test import Client

from registry.models import Release

pytestmark = pytest.mark.django_db
URL = "/releases/"


@pytest.fixture
def two_releases(profile, make_variant, make_package, publish):
    first = publish(make_package(make_variant("a")).variant, profile)
    second = publish(make_package(make_variant("b", precision="int8")).variant, profile, rollout_percent=25)
    return first, second


def test_viewers_see_heads_history_and_audit_but_no_buttons(client, viewer, profile, two_releases):
    _first, second = two_releases
    client.force_login(viewer)
    page = client.get(URL).content.decode()
    assert profile.name in page and "25 %" in page and second.package.digest[:12] in page
    assert "superseded by a newer release" in page
    assert "release.publish" in page and "rollback-form" not in page


def test_viewers_cannot_post(client, viewer, two_releases):
    _, second = two_releases
    client.force_login(viewer)
    response = client.post(URL, {"action": "rollback", "release": second.pk, "version": second.version})
    assert response.status_code == 403
    assert Release.objects.get(pk=second.pk).status == Release.Status.ACTIVE


def test_staff_roll_back_from_the_page_with_a_csrf_token(staff, two_releases):
    first, second = two_releases
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    page = client.get(URL)
    assert "rollback-form" in page.content.decode()
    without = client.post(URL, {"action": "rollback", "release": second.pk, "version": second.version})
    assert without.status_code == 403  # no CSRF token
    token = page.cookies["csrftoken"].value
    response = client.post(
        URL,
        {"action": "rollback", "release": second.pk, "version": second.version, "csrfmiddlewaretoken": token},
    )
    assert response.status_code == 302
    assert Release.objects.get(pk=second.pk).status == Release.Status.ROLLED_BACK
    assert Release.objects.get(pk=first.pk).status == Release.Status.ACTIVE
    assert "rolled back" in client.get(URL).content.decode()


def test_a_stale_version_on_the_page_is_refused_with_a_message(client, staff, two_releases):
    _, second = two_releases
    client.force_login(staff)
    response = client.post(
        URL, {"action": "rollout", "release": second.pk, "version": 1, "rollout_percent": 50}, follow=True
    )
    assert "stale" in response.content.decode()
    assert Release.objects.get(pk=second.pk).rollout_percent == 25
    ok = client.post(
        URL,
        {"action": "rollout", "release": second.pk, "version": second.version, "rollout_percent": 50},
        follow=True,
    )
    assert "50 %" in ok.content.decode() and Release.objects.get(pk=second.pk).rollout_percent == 50


def test_the_page_without_releases(client, viewer):
    client.force_login(viewer)
    assert "No releases yet" in client.get(URL).content.decode()


def test_heads_and_pending_releases_show_however_long_the_history(
    client, viewer, staff, profile, make_profile, make_variant, package, publish, monkeypatch
):
    from registry import views
    from registry.releases import publish as publish_release

    head = publish(package.variant, profile)
    other = make_profile("Zeta Board")  # sorts after: its rows fall beyond a short history
    pending = publish_release(variant=make_variant("unbuilt", precision="int8"), profile=other, by=staff)
    monkeypatch.setattr(views, "_HISTORY_ROWS", 1)
    client.force_login(viewer)
    response = client.get(URL)
    entries = {e["profile"].pk: e for e in response.context["profiles"]}
    assert [r.pk for r in entries[profile.pk]["heads"]] == [head.pk]
    assert [r.pk for r in entries[other.pk]["pending"]] == [pending.pk]
    assert f"Release #{pending.pk}" in response.content.decode()


@pytest.mark.parametrize("release", ["abc", "1e3", "", "-1", "²"])
def test_a_malformed_release_number_in_the_form_is_404_not_500(client, staff, two_releases, release):
    client.force_login(staff)
    response = client.post(URL, {"action": "rollback", "release": release, "version": "1"})
    assert response.status_code == 404
