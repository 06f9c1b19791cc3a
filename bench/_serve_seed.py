"""Data for `bench serve`: the demo model, one released package and many enrolled devices.

Runs in the benchmark's own process against its private database (the environment is set by
bench/serve.py before this module is imported).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

_PROFILE = "raspberry-pi-5-8-gb"


def _mixed_plan(spec: Any) -> Any:
    """int4 (g128, RTN) feed-forward Linears, int8 everything else: the shape of plan the
    planner recommends for phones (≈ 4.6× smaller than FP32)."""
    from planner.specs import Plan, TensorScheme

    schemes = {}
    for t in spec.tensors:
        if (
            t.kind == "linear"
            and (".intermediate." in t.name or ".output.dense" in t.name)
            and "attention" not in t.name
        ):
            schemes[t.name] = TensorScheme("int4", 128, True, "rtn")
        else:
            schemes[t.name] = TensorScheme("int8", None, True, "rtn")
    return Plan.build(schemes)


def seed(n_devices: int) -> dict[str, Any]:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from devices.catalog import load_catalog
    from devices.enrollment import preregister_device
    from devices.models import DeviceProfile
    from planner.package import build_package, predict_bundle_package_bytes
    from planner.specs import ModelSpec, Plan
    from registry import packages, releases
    from registry.engine import (
        bundle_for,
        measured_provenance,
        record_variant,
        register_bundle,
        variant_metrics,
    )

    load_catalog()
    profile = (
        DeviceProfile.objects.filter(slug=_PROFILE).first() or DeviceProfile.objects.order_by("pk").first()
    )
    assert profile is not None, "the device catalog is empty"
    model = register_bundle("minilm-docstrings")
    bundle = bundle_for(model)
    plan = _mixed_plan(ModelSpec.from_dict(model.spec))
    result = bundle.evaluator.evaluate(plan, "test")
    variant = record_variant(
        model,
        plan,
        name="int4 g128 FFN + int8 (bench serve)",
        metrics=variant_metrics(result),
        source="measured",
        provenance=measured_provenance(),
        tags=["bench"],
    )
    # Build through the registry (as the worker does), then the same plan again into a scratch
    # directory: both timed, and the second must give the same digest.
    started = time.perf_counter()
    package = packages.build_for_variant(variant.pk)
    first_build_s = time.perf_counter() - started
    assert package is not None
    with tempfile.TemporaryDirectory(dir=settings.PACKAGE_DIR) as scratch:
        info = build_package(
            bundle,
            Plan.from_dict(variant.plan),
            scratch,
            signing_key=settings.SIGNING_KEY_HEX,
            predicted=packages.predicted_block(variant),
            created_from=variant.plan_hash,
        )
    if info.digest != package.digest:
        raise SystemExit("bench serve: the same plan built twice gave different packages")
    releases.publish(variant=variant, profile=profile, alias="stable", rollout_percent=100)
    tokens = [
        preregister_device(name=f"bench-{i:04d}", profile=profile.slug, by=None)["token"]
        for i in range(n_devices)
    ]
    return {
        "profile": profile.slug,
        "devices": tokens,
        "digest": package.digest,
        "package_bytes": package.blob_bytes,
        "predicted_bytes": predict_bundle_package_bytes(bundle, plan),
        "package_build_seconds": first_build_s,
        "package_rebuild_seconds": info.seconds,
    }
