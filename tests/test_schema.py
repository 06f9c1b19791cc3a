"""The OpenAPI schema builds without warnings and documents both auth schemes."""

from __future__ import annotations

import io

import pytest
import yaml
from django.core.management import call_command


@pytest.mark.django_db
def test_the_schema_validates_and_lists_every_resource():
    out = io.StringIO()
    call_command("spectacular", "--validate", "--fail-on-warn", stdout=out)
    schema = yaml.safe_load(out.getvalue())
    paths = set(schema["paths"])
    for path in ("/api/v1/devices/profiles/", "/api/v1/models/", "/api/v1/variants/", "/api/v1/plans/"):
        assert path in paths
    assert "/api/v1/plans/{id}/cancel/" in paths
    assert {"apiToken", "cookieAuth"} <= set(schema["components"]["securitySchemes"])


@pytest.mark.django_db
def test_the_device_posts_document_the_idempotency_key_header():
    out = io.StringIO()
    call_command("spectacular", stdout=out)
    schema = yaml.safe_load(out.getvalue())
    for path in ("/api/v1/device/measurements", "/api/v1/device/enroll"):
        post = schema["paths"][path]["post"]
        (header,) = [p for p in post["parameters"] if p["name"] == "Idempotency-Key"]
        assert header["in"] == "header" and not header.get("required", False)
        assert "1 to 100 characters" in header["description"]
        assert {"200", "201", "422"} <= set(post["responses"]), path
