"""The starting catalog: real devices, a source for every number, all-or-nothing imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from devices.catalog import DEFAULT_CATALOG, CatalogError, load_catalog
from devices.models import DeviceProfile
from devices.validation import SOURCED_FIELDS

pytestmark = pytest.mark.django_db


def test_the_catalog_holds_the_devices_the_product_promises():
    load_catalog()
    names = set(DeviceProfile.objects.values_list("name", flat=True))
    socs = set(DeviceProfile.objects.values_list("soc", flat=True))
    assert len(names) >= 12
    for soc in (
        "A17 Pro",
        "A18 Pro",
        "Snapdragon 8 Gen 2",
        "Snapdragon 8 Gen 3",
        "Snapdragon 8 Elite",
        "Tensor G4",
    ):
        assert soc in socs
    assert any("Raspberry Pi 5" in n for n in names)
    assert any("Jetson Orin Nano" in n for n in names)
    assert DeviceProfile.objects.filter(kind="laptop").exists()
    assert set(DeviceProfile.objects.values_list("origin", flat=True)) == {"catalog"}


def test_every_number_in_the_catalog_has_a_source():
    load_catalog()
    for profile in DeviceProfile.objects.all():
        for field in SOURCED_FIELDS:
            if getattr(profile, field) is not None:
                assert profile.sources.get(field), f"{profile.name}: {field} has no source"


def test_loading_twice_updates_instead_of_duplicating():
    first = load_catalog()
    second = load_catalog()
    assert first["created"] >= 12 and first["updated"] == 0
    assert second == {"created": 0, "updated": first["created"]}


def _write(tmp_path: Path, devices: object) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"format": "edgefit-device-catalog/1", "devices": devices}))
    return path


def test_a_bad_entry_names_itself_and_imports_nothing(tmp_path):
    devices = json.loads(DEFAULT_CATALOG.read_text())["devices"][:4]
    devices[2]["ram_budget_bytes"] = devices[2]["ram_total_bytes"] * 2
    with pytest.raises(CatalogError) as caught:
        load_catalog(_write(tmp_path, devices))
    message = str(caught.value)
    assert "entry 3" in message and devices[2]["name"] in message and "ram_budget_bytes" in message
    assert DeviceProfile.objects.count() == 0


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "edgefit-device-catalog/1",\n "devices": [\n  {"name": "x",}\n]}')
    with pytest.raises(CatalogError, match="line 3"):
        load_catalog(path)


def test_the_command_reports_the_error_and_leaves_the_database_alone(tmp_path):
    devices = json.loads(DEFAULT_CATALOG.read_text())["devices"][:2]
    devices[1]["weight_formats"] = ["fp32", "int9"]
    with pytest.raises(CommandError, match=r"entry 2 .*weight_formats.*int9.*nothing was imported"):
        call_command("load_catalog", str(_write(tmp_path, devices)))
    assert DeviceProfile.objects.count() == 0


def test_a_duplicate_name_is_refused(tmp_path):
    devices = json.loads(DEFAULT_CATALOG.read_text())["devices"][:1] * 2
    with pytest.raises(CatalogError, match=r"entry 2 .*appears twice"):
        load_catalog(_write(tmp_path, devices))
