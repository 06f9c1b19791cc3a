"""Packages of variants: build (through `planner.package`), store content-addressed, describe.

`build_for_variant` is what `workers.build_package` runs: it reuses the variant's newest package
whose files are still on disk, else builds one under `settings.PACKAGE_DIR/<digest>/` with the
cost model's predictions for the profiles the variant is released to (or predicted for), records
the Package row and activates the releases that were waiting for it (`registry.releases`).
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from devices.models import DeviceProfile
from registry.models import Package, Prediction, Release, Variant

__all__ = [
    "DIGEST_RE",
    "FILES",
    "build_for_variant",
    "file_path",
    "files_present",
    "package_answer",
    "predicted_block",
    "signing_key_info",
    "usable_package",
]

log = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
#: The files of a package (docs/delivery.md), as served under /api/v1/packages/<digest>/.
FILES: tuple[str, ...] = ("manifest.json", "manifest.sig", "model.safetensors")


@functools.lru_cache(maxsize=4)
def _key_info(seed_hex: str) -> dict[str, str]:
    from planner.package import signing_key_info as info

    return info(seed_hex)


def signing_key_info() -> dict[str, str]:
    """{"algorithm": "ed25519", "public_key": hex, "key_id": hex16} of settings.SIGNING_KEY_HEX."""
    return dict(_key_info(settings.SIGNING_KEY_HEX))


def file_path(package: Package, name: str) -> Path:
    if name not in FILES:
        raise KeyError(name)
    return Path(package.storage_path) / name


def files_present(package: Package) -> bool:
    return all(file_path(package, name).is_file() for name in FILES)


def usable_package(variant: Variant) -> Package | None:
    """The variant's newest package whose files are on disk, signed with the current key."""
    key_id = signing_key_info()["key_id"]
    for package in Package.objects.filter(variant=variant, key_id=key_id).order_by("-created_at")[:5]:
        if files_present(package):
            return package
    return None


def package_answer(package: Package, release_id: int | None) -> dict[str, Any]:
    """The `package` object of the device config answer (docs/delivery.md)."""
    base = f"/api/v1/packages/{package.digest}"
    model = (package.manifest.get("model") or {}).get("name") or package.variant.base_model.slug
    return {
        "digest": package.digest,
        "size": int(package.blob_bytes),
        "manifest_url": f"{base}/manifest.json",
        "signature_url": f"{base}/manifest.sig",
        "blob_url": f"{base}/model.safetensors",
        "signature": package.signature,
        "key_id": package.key_id,
        "model": model,
        "variant_id": package.variant_id,
        "release_id": release_id,
        "precision_summary": package.precision_summary,
    }


def predicted_block(variant: Variant) -> dict[str, dict[str, Any]]:
    """{profile slug: {latency_ms, memory_bytes, cost_model_version, calibrated, calibration}}
    for the profiles the variant is released or predicted for, from each profile's cost model
    *as of the build* (a profile whose formats cannot run the plan is left out).

    The signed manifest is immutable, so these go stale when a profile is recalibrated; each
    entry names what it was computed with — the cost model version and `calibration`, the
    fit's `fitted_at` or "default" — which keeps the bytes a function of the database state.
    Current predictions are the registry's `Prediction` rows (the variant and device pages)."""
    from registry.calibration import predict_variant

    ids = set(Release.objects.filter(variant=variant).values_list("profile_id", flat=True))
    ids |= set(Prediction.objects.filter(variant=variant).values_list("device_profile_id", flat=True))
    block: dict[str, dict[str, Any]] = {}
    for profile in DeviceProfile.objects.filter(pk__in=ids).order_by("slug"):
        cost = predict_variant(variant, profile)
        if cost is None:
            continue
        block[profile.slug] = {
            "latency_ms": round(cost.latency_s * 1000, 6),
            "memory_bytes": int(cost.memory_bytes),
            "cost_model_version": cost.cost_model_version,
            "calibrated": profile.calibrated,
            "calibration": str((profile.calibration or {}).get("fitted_at") or "default")
            if profile.calibrated
            else "default",
        }
    return block


def build_for_variant(variant_id: int) -> Package | None:
    """Reuse or build the variant's package, then activate the releases waiting for it.

    Returns None when the variant is gone. A failed build marks the waiting releases failed
    (with the error) and re-raises."""
    from registry import releases

    variant = Variant.objects.select_related("base_model").filter(pk=variant_id).first()
    if variant is None:
        return None
    try:
        package = usable_package(variant) or _build(variant)
    except Exception as exc:
        releases.fail_pending(variant, f"{type(exc).__name__}: {exc}")
        raise
    releases.activate_pending(variant, package)
    return package


def _build(variant: Variant) -> Package:
    from planner.package import BLOB_NAME, MANIFEST_NAME, build_package
    from planner.specs import Plan
    from registry.engine import bundle_for

    model = variant.base_model
    if not model.adapter:
        raise ValueError(f"model {model.name!r} is spec-only: it has no weights to package")
    bundle = bundle_for(model)
    info = build_package(
        bundle,
        Plan.from_dict(variant.plan),
        settings.PACKAGE_DIR,
        signing_key=settings.SIGNING_KEY_HEX,
        predicted=predicted_block(variant),
        created_from=variant.plan_hash,
    )
    with transaction.atomic():
        package, created = Package.objects.get_or_create(
            digest=info.digest,
            defaults={
                "variant": variant,
                "manifest": info.manifest,
                "manifest_bytes": info.file(MANIFEST_NAME).stat().st_size,
                "blob_bytes": info.blob_bytes,
                "blob_sha256": info.blob_sha256,
                "predicted_bytes": info.predicted_bytes,
                "signature": info.signature_hex,
                "key_id": info.key_id,
                "build_seconds": info.seconds,
                "storage_path": str(info.path),
            },
        )
        if not created and (package.signature, package.key_id) != (info.signature_hex, info.key_id):
            # Rebuilt after a signing-key rotation: the same digest (the manifest does not name
            # the key), the files re-signed on disk.  The row must say so too — it kept the old
            # signature and key id: config answers advertised them, manifest.sig's ETag (from
            # the row) gave clients holding the old signature a 304, and usable_package never
            # matched the row again, so every publish of the variant rebuilt it.
            package.signature, package.key_id = info.signature_hex, info.key_id
            package.save(update_fields=["signature", "key_id"])
            from registry.delivery import forget_profile_on_commit  # (delivery imports this module)

            for profile_id in set(package.releases.values_list("profile_id", flat=True)):
                forget_profile_on_commit(profile_id)
    log.info(
        "package %s of variant %s: %s (%d bytes of %s, %.2f s)",
        info.digest[:12],
        variant.pk,
        "built" if created else "already stored",
        info.blob_bytes,
        BLOB_NAME,
        info.seconds,
    )
    return package
