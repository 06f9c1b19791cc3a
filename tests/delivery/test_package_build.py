"""Publishing a variant without a package builds it (workers.build_package, planner.package)."""

from __future__ import annotations

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
