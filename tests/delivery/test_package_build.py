"""Publishing a variant without a package builds it (workers.build_package, planner.package)."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.models import Package, Release
from registry.releases import publish

pytestmark = pytest.mark.django_db


def test_publish_builds_a_signed_package_then_activates_the_release(
    tiny_model, profile, staff, package_dir, settings, django_capture_on_commit_callbacks, client
):
    from celery import current_app

    import workers.tasks  # noqa: F401  (registers the task, so eager mode runs it here)
    from planner.package import verify_package
    from registry.packages import signing_key_info

    current_app.conf.task_always_eager = True
    try:
        variant = tiny_model.variants.get(name__startswith="uniform int8")
        with django_capture_on_commit_callbacks(execute=True):
            release = publish(variant=variant, profile=profile, by=staff)
    finally:
        current_app.conf.task_always_eager = False
    release.refresh_from_db()
    assert release.status == Release.Status.ACTIVE
    package = Package.objects.get()
    assert release.package == package and package.variant == variant
    assert package.blob_bytes == package.predicted_bytes
    assert package.manifest["predicted"][profile.slug]["kind"] == "predicted"
    # As of the build, and saying with what: the uncalibrated model here.
    assert package.manifest["predicted"][profile.slug]["calibration"] == "default"
    manifest = verify_package(package.storage_path, signing_key_info()["public_key"], package.digest)
    assert manifest["plan_hash"] == variant.plan_hash
    # Built once: publishing the variant again reuses the stored package.
    again = publish(variant=variant, profile=profile, alias="canary", by=staff)
    assert again.status == Release.Status.ACTIVE and again.package == package
    assert Package.objects.count() == 1


def test_a_rebuild_after_a_signing_key_rotation_updates_the_stored_signature(
    tiny_model, profile, staff, package_dir, settings, django_capture_on_commit_callbacks
):
    from planner.package import verify_package
    from registry.packages import _build, signing_key_info, usable_package

    variant = tiny_model.variants.get(name__startswith="uniform int8")
    first = _build(variant)
    old_key = signing_key_info()["key_id"]
    settings.SIGNING_KEY_HEX = "22" * 32  # the operator rotates the key
    assert usable_package(variant) is None  # signed with the old key: rebuilt
    with django_capture_on_commit_callbacks(execute=True):
        again = _build(variant)
    assert again.pk == first.pk and again.digest == first.digest  # the manifest names no key
    again.refresh_from_db()
    new = signing_key_info()
    assert again.key_id == new["key_id"] != old_key
    assert verify_package(again.storage_path, new["public_key"], again.digest)
    # The row says what the file on disk (raw Ed25519 bytes) holds: the new key's signature.
    assert (Path(again.storage_path) / "manifest.sig").read_bytes().hex() == again.signature
    assert usable_package(variant) == again  # no rebuild at every publish
