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
