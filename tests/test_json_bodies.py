"""JSON request bodies: absurdly nested ones are a 400 naming the body, never a 500."""

from __future__ import annotations

import pytest

from config.parsers import MAX_DEPTH

pytestmark = pytest.mark.django_db


def _post(client, url: str, body: str):
    return client.post(url, data=body, content_type="application/json")


@pytest.mark.parametrize("body", ["[" * 100_000, '{"a":' * 100_000, "[" * 100_000 + "]" * 100_000])
def test_a_body_nested_beyond_the_decoders_reach_is_a_400_json_parse_error(client, body):
    response = _post(client, "/api/v1/device/enroll", body)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("JSON parse error")
    assert f"more than {MAX_DEPTH} levels" in response.json()["detail"]


def test_a_body_one_level_past_the_limit_is_refused_for_staff_too(api_as, staff):
    nested = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    response = api_as(staff).post("/api/v1/devices/profiles/", data=nested, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["detail"].startswith("JSON parse error")


def test_a_body_at_the_limit_is_parsed_and_judged_by_the_endpoint(client):
    value = "{}"
    for _ in range(MAX_DEPTH - 2):  # with the body itself: MAX_DEPTH levels
        value = '{"x":' + value + "}"
    response = _post(
        client, "/api/v1/device/enroll", '{"enrollment_key": "efe_nope", "hardware": ' + value + "}"
    )
    assert response.status_code == 401  # parsed: the (unknown) key is what is refused
