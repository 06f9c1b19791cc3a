"""Delivery fixtures: a model with the tiny bundle's spec, variants, packages written to a
temporary package directory (real files, fake weights), profiles, devices and releases."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.devices.factories import profile_payload


@functools.cache
def tiny_spec() -> dict[str, Any]:
    from planner.builtin import BUNDLES

    return BUNDLES["tiny-topics"].make_adapter().spec().to_dict()


@pytest.fixture
def package_dir(settings, tmp_path: Path) -> Path:
    settings.PACKAGE_DIR = tmp_path / "packages"
    settings.PACKAGE_DIR.mkdir()
    return settings.PACKAGE_DIR


@pytest.fixture
def make_profile(db) -> Callable[..., Any]:
    from devices.models import DeviceProfile

    def make(name: str = "Test Phone X", **overrides: Any) -> DeviceProfile:
        return DeviceProfile.objects.create(**profile_payload(name=name, **overrides))

    return make


@pytest.fixture
def profile(make_profile):
    return make_profile()


@pytest.fixture
def model(db):
    from registry.models import BaseModel

    return BaseModel.objects.create(
        name="tiny", adapter="tiny-topics", spec=tiny_spec(), fp32_metrics={"accuracy": 0.9}
    )


@pytest.fixture
def make_variant(model) -> Callable[..., Any]:
    from planner.specs import ModelSpec, Plan, TensorScheme
    from registry.models import Variant

    def make(
        name: str = "fp32", precision: str | None = None, exit_threshold: float | None = None
    ) -> Variant:
        spec = ModelSpec.from_dict(model.spec)
        plan = Plan.uniform(spec, TensorScheme(precision)) if precision else Plan()
        if exit_threshold is not None:
            plan = Plan.build(dict(plan.schemes), exit_threshold)
        return Variant.objects.create(
            base_model=model,
            name=name,
            plan=plan.to_dict(),
            plan_hash=plan.hash(),
            weight_bytes=1000,
            metrics={"accuracy": 0.9},
            metrics_source="measured",
            provenance="test",
        )

    return make


@pytest.fixture
def variant(make_variant):
    return make_variant()


@pytest.fixture
def make_package(package_dir: Path) -> Callable[..., Any]:
    """A Package row with real files (manifest, signature, a blob of random bytes)."""
    import os

    from registry.models import Package
    from registry.packages import signing_key_info

    def make(variant: Any, blob_bytes: int = 300_000) -> Package:
        blob = os.urandom(blob_bytes)
        blob_sha = hashlib.sha256(blob).hexdigest()
        manifest = {
            "format": 1,
            "model": {"name": "tiny-topics", "adapter": "tiny"},
            "plan": variant.plan,
            "precision_summary": {"fp32": 15},
            "files": {"model.safetensors": {"sha256": blob_sha, "bytes": blob_bytes}},
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        folder = package_dir / digest
        folder.mkdir()
        (folder / "manifest.json").write_bytes(manifest_bytes)
        signature = os.urandom(64)
        (folder / "manifest.sig").write_bytes(signature)
        (folder / "model.safetensors").write_bytes(blob)
        return Package.objects.create(
            digest=digest,
            variant=variant,
            manifest=manifest,
            manifest_bytes=len(manifest_bytes),
            blob_bytes=blob_bytes,
            blob_sha256=blob_sha,
            predicted_bytes=blob_bytes,
            signature=signature.hex(),
            key_id=signing_key_info()["key_id"],
            build_seconds=0.1,
            storage_path=str(folder),
        )

    return make


@pytest.fixture
def package(make_package, variant):
    return make_package(variant)


@pytest.fixture
def make_device(db) -> Callable[..., dict[str, Any]]:
    """Pre-register a device; the answer carries its token."""
    from devices.enrollment import preregister_device

    def make(profile: Any, name: str = "dev", channel: str = "stable") -> dict[str, Any]:
        return preregister_device(name=name, profile=profile, channel=channel, by=None)

    return make


@pytest.fixture
def committed(django_capture_on_commit_callbacks) -> Callable[[], Any]:
    """`with committed(): …` runs the on-commit callbacks (cache invalidation) of the block, as
    a real commit would (tests run inside one transaction that never commits)."""
    return lambda: django_capture_on_commit_callbacks(execute=True)


@pytest.fixture
def publish(staff, committed) -> Callable[..., Any]:
    """Publish a variant whose package exists (the release becomes the head at once)."""
    from registry.releases import publish as publish_release

    def do(variant: Any, profile: Any, alias: str = "stable", rollout_percent: int = 100) -> Any:
        with committed():
            return publish_release(
                variant=variant, profile=profile, alias=alias, rollout_percent=rollout_percent, by=staff
            )

    return do


def bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.fixture(scope="session")
def delivery_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained tiny exit heads and engine caches, shared by this session's delivery tests."""
    return tmp_path_factory.mktemp("delivery-engine")


@pytest.fixture
def tiny_model(db, settings, delivery_engine_dir: Path):
    """The tiny bundle registered for real (weights, heads): packages can be built from it."""
    from registry.engine import register_bundle

    settings.ENGINE_DATA_DIR = delivery_engine_dir
    return register_bundle("tiny-topics")


@pytest.fixture
def redis_cache(require_redis, settings):
    """The default cache on Redis under a private key prefix (the real stack's layout)."""
    import redis

    prefix = f"edgefit-test-{uuid.uuid4().hex[:8]}"
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": require_redis,
            "KEY_PREFIX": prefix,
        }
    }
    yield settings
    client = redis.Redis.from_url(require_redis)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def wait_until(condition: Callable[[], Any], seconds: float = 5.0) -> bool:
    """Poll `condition` every 20 ms for up to `seconds`; whether it became true."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


#: Every operation of a cache backend the delivery paths (and Django) may call.
_CACHE_OPERATIONS = (
    "get",
    "get_many",
    "set",
    "set_many",
    "add",
    "incr",
    "decr",
    "delete",
    "delete_many",
    "has_key",
    "touch",
    "get_or_set",
    "clear",
)


@contextlib.contextmanager
def cache_unreachable() -> Iterator[None]:
    """`with cache_unreachable():` — the default cache cannot be reached (Redis restarting, a
    network blip): every operation raises what redis-py raises then.  Patched on the backend's
    class, so every thread's instance fails (the ASGI handler's request threads, the listener)."""
    import redis
    from django.core.cache import caches

    def refuse(*args: object, **kwargs: object) -> None:
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    backend = type(caches["default"])
    with pytest.MonkeyPatch.context() as patch:
        for name in _CACHE_OPERATIONS:
            patch.setattr(backend, name, refuse)
        yield
