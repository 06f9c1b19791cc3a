"""Server-rendered device pages: sorting, filtering, bad query strings, detail with sources."""

from __future__ import annotations

import json
import re

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer_client(client: Client, viewer, catalog) -> Client:
    client.force_login(viewer)
    return client


def _row_names(html: str) -> list[str]:
    return re.findall(r'<td><a href="/devices/[^"]+/">([^<]+)</a></td>', html)


def test_the_list_sorts_by_a_column_both_ways(viewer_client):
    up = _row_names(viewer_client.get("/devices/", {"sort": "ram"}).content.decode())
    down = _row_names(viewer_client.get("/devices/", {"sort": "-ram"}).content.decode())
    assert len(up) >= 12
    assert up[0] == "Google Coral Dev Board (Edge TPU, 1 GB)"
    assert down[-1] == "Google Coral Dev Board (Edge TPU, 1 GB)"


def test_the_list_filters_by_kind_format_and_search(viewer_client):
    boards = _row_names(viewer_client.get("/devices/", {"kind": "board"}).content.decode())
    assert boards and all(("Pi" in n or "Jetson" in n or "Coral" in n) for n in boards)
    int4 = _row_names(viewer_client.get("/devices/", {"format": "int4"}).content.decode())
    assert "Raspberry Pi 5 (8 GB)" not in int4 and int4
    assert _row_names(viewer_client.get("/devices/", {"q": "tensor g4"}).content.decode()) == [
        "Google Pixel 9 (Tensor G4)"
    ]


def test_malformed_query_values_fall_back_to_defaults_with_a_notice(viewer_client):
    response = viewer_client.get("/devices/", {"sort": "'; drop", "kind": "toaster", "format": "int9"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Cannot sort by" in html and "Unknown kind" in html and "Unknown format" in html
    assert len(_row_names(html)) >= 12


def test_a_nul_in_the_search_is_removed_with_a_notice(viewer_client):
    # PostgreSQL text cannot hold NUL: the raw value in the lookup was a 500 there.
    response = viewer_client.get("/devices/", {"q": "tensor\x00 g4"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "NUL characters removed" in html
    assert _row_names(html) == ["Google Pixel 9 (Tensor G4)"]


def test_the_detail_page_shows_every_source_and_a_roofline(viewer_client):
    response = viewer_client.get("/devices/raspberry-pi-5-8-gb/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "derived: 4 Cortex-A76 cores" in html
    assert "/static/vendor/plotly.min.js" in html
    figures = json.loads(
        re.search(r'<script id="figures" type="application/json">(.*?)</script>', html, re.S)[1]
    )
    roofline = figures[0]["figure"]
    assert roofline["layout"]["xaxis"]["title"]["text"].endswith("(ops per byte read)")
    assert {trace["name"].split()[0] for trace in roofline["data"]} == {"int8", "fp16", "fp32"}


def test_an_unknown_device_is_a_404_page_with_a_way_back(viewer_client):
    response = viewer_client.get("/devices/no-such-device/")
    assert response.status_code == 404
    assert b"Back to the device list" in response.content


def test_plotly_is_served_locally(client: Client):
    from asgiref.sync import async_to_sync

    response = client.get("/static/vendor/plotly.min.js")
    assert response.status_code == 200

    async def body() -> bytes:  # servestatic streams asynchronously (native under ASGI)
        return b"".join([chunk async for chunk in response.streaming_content])

    assert b"plotly" in async_to_sync(body)()[:2000].lower()
