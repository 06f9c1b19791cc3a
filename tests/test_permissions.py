"""Who may do what, with a fixed cast: staff (write), viewer (read), outsider (no role), anonymous."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from accounts.models import ApiToken
from devices.models import DeviceProfile
from tests.devices.factories import profile_payload

URL = "/api/v1/devices/profiles/"
pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("role", "status"), [("staff", 200), ("viewer", 200), ("outsider", 403), ("anonymous", 401)]
)
def test_reading_profiles(api_as, staff, viewer, outsider, role, status):
    user = {"staff": staff, "viewer": viewer, "outsider": outsider, "anonymous": None}[role]
    assert api_as(user).get(URL).status_code == status


@pytest.mark.parametrize(
    ("role", "status"), [("staff", 201), ("viewer", 403), ("outsider", 403), ("anonymous", 401)]
)
def test_creating_profiles(api_as, staff, viewer, outsider, role, status):
    user = {"staff": staff, "viewer": viewer, "outsider": outsider, "anonymous": None}[role]
    assert api_as(user).post(URL, profile_payload(), format="json").status_code == status
    assert DeviceProfile.objects.count() == (1 if status == 201 else 0)


def test_viewer_cannot_change_or_delete(api_as, staff, viewer):
    created = api_as(staff).post(URL, profile_payload(), format="json").json()
    assert (
        api_as(viewer).patch(f"{URL}{created['id']}/", {"bandwidth_gbs": 1}, format="json").status_code == 403
    )
    assert api_as(viewer).delete(f"{URL}{created['id']}/").status_code == 403
    assert DeviceProfile.objects.get().bandwidth_gbs == 51.2


def test_anonymous_sees_only_login_health_and_the_schema(client: Client):
    assert client.get("/health/").status_code == 200
    assert client.get("/api/v1/schema/").status_code == 200
    assert client.get("/api/v1/docs/").status_code == 200
    assert client.get("/login/").status_code == 200
    for page in ("/devices/", "/models/", "/plans/", "/releases/"):
        response = client.get(page)
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_an_outsider_gets_a_403_page_on_the_dashboard(client: Client, outsider):
    client.force_login(outsider)
    response = client.get("/devices/")
    assert response.status_code == 403
    assert b"no role" in response.content


def test_a_script_token_acts_as_its_user_until_revoked(client: Client, staff, viewer):
    token, raw = ApiToken.issue(viewer, "ci")
    assert token.digest != raw and raw not in token.digest
    auth = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    assert client.get(URL, **auth).status_code == 200
    assert client.post(URL, profile_payload(), content_type="application/json", **auth).status_code == 403
    staff_token = ApiToken.issue(staff, "publisher")[1]
    created = client.post(
        URL, profile_payload(), content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {staff_token}"
    )
    assert created.status_code == 201
    token.revoke()
    assert client.get(URL, **auth).status_code == 401


def test_a_made_up_token_is_refused(client: Client):
    response = client.get(URL, HTTP_AUTHORIZATION="Bearer efu_not-a-real-token")
    assert response.status_code == 401
    assert "invalid or revoked" in response.json()["detail"]


def test_a_token_added_in_the_admin_gets_a_value_shown_once(client: Client, django_user_model, viewer):
    admin_user = django_user_model.objects.create_superuser("ada", password="pw-ada")
    client.force_login(admin_user)
    shown = []
    for name in ("ci", "cron"):
        response = client.post(
            "/admin/accounts/apitoken/add/", {"user": viewer.pk, "name": name}, follow=True
        )
        assert response.status_code == 200
        text = " ".join(str(m) for m in response.context["messages"])
        shown += re.findall(r"efu_[\w-]{40,}", text)
    tokens = list(ApiToken.objects.order_by("pk"))
    assert len(tokens) == 2 and len(shown) == 2
    assert all(t.digest and t.user_id == viewer.pk for t in tokens)
    client.logout()
    assert client.get(URL, HTTP_AUTHORIZATION=f"Bearer {shown[1]}").status_code == 200
    # An existing token cannot be moved to another user.
    client.force_login(admin_user)
    change = client.get(f"/admin/accounts/apitoken/{tokens[0].pk}/change/").content.decode()
    assert 'name="user"' not in change


def test_a_logged_in_user_sent_back_to_the_login_page_lands_on_the_overview(client: Client, viewer):
    client.force_login(viewer)
    response = client.get("/login/", {"next": "/login/"})
    assert response.status_code == 302 and response["Location"] == "/overview/"
