"""Bridge between the registry and the engine: register runnable bundles, measure, profile.

Every figure stored here comes from running the model (planner.evaluate) or from bytes the
packer produces (planner.quant.plan_nbytes equals bytes written); provenance says where and when.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from filelock import FileLock, Timeout

from planner.builtin import Bundle, load_bundle
from planner.files import replacing
from planner.quant import plan_nbytes
from planner.sensitivity import SensitivityProfile, profile_sensitivity
from planner.specs import ModelSpec, Plan, TensorScheme
from registry.models import BaseModel, Variant

log = logging.getLogger(__name__)

__all__ = [
    "SENSITIVITY_CALIBRATION_EXAMPLES",
    "SENSITIVITY_FAMILY",
    "bundle_for",
    "compute_sensitivity",
    "measured_provenance",
    "record_variant",
    "register_bundle",
    "sensitivity_of",
]

#: Scheme family the per-tensor sensitivities are measured in (the search's default family).
SENSITIVITY_FAMILY: dict[str, Any] = {"group_size": 64, "method": "rtn", "symmetric": True}
#: Calibration examples used for profiling (a seeded subsample keeps it to minutes on 2 cores).
SENSITIVITY_CALIBRATION_EXAMPLES = 200
#: How often a process waiting for another's profiling of the same model calls its on_wait.
SENSITIVITY_LOCK_POLL_S = 5.0
#: How long it waits at most (profiling the demo model takes 5–20 minutes on 2 cores).
SENSITIVITY_LOCK_MAX_WAIT_S = 3600.0


def bundle_for(model: BaseModel) -> Bundle:
    return load_bundle(model.adapter, settings.ENGINE_DATA_DIR)


def measured_provenance(what: str = "measured") -> str:
    return f"{what} on host {platform.node()} at {timezone.now():%Y-%m-%d %H:%M} UTC by planner.evaluate"


def variant_metrics(result: Any) -> dict[str, Any]:
    keep = (
        "accuracy",
        "agreement",
        "final_accuracy",
        "final_agreement",
        "kl",
        "cosine",
        "exit_threshold",
        "mean_layers",
        "exit_fraction",
        "n_examples",
        "split",
        "seconds",
    )
    data = result.to_dict()
    return {k: data[k] for k in keep}


def record_variant(
    model: BaseModel,
    plan: Plan,
    *,
    name: str,
    metrics: dict[str, Any],
    source: str,
    provenance: str,
    tags: list[str] | None = None,
) -> Variant:
    """Create or update the variant of `model` for `plan` (one per plan hash)."""
    spec = ModelSpec.from_dict(model.spec)
    plan.validate(spec)
    variant, _ = Variant.objects.update_or_create(
        base_model=model,
        plan_hash=plan.hash(),
        defaults={
            "name": name,
            "plan": plan.to_dict(),
            "weight_bytes": plan_nbytes(spec, plan),
            "metrics": metrics,
            "metrics_source": source,
            "provenance": provenance,
            "tags": tags or [],
        },
    )
    return variant


def register_bundle(bundle_name: str) -> BaseModel:
    """Register (or refresh) a runnable built-in model: spec, weights and data hashes, measured
    FP32 metrics on the held-out split, and its FP32 and uniform-int8 variants (both measured)."""
    bundle = load_bundle(bundle_name, settings.ENGINE_DATA_DIR)
    spec = bundle.adapter.spec()
    fp32 = bundle.evaluator.evaluate(Plan(), "test")
    int8_plan = Plan.uniform(spec, TensorScheme("int8"))
    int8 = bundle.evaluator.evaluate(int8_plan, "test")
    split_sizes = ", ".join(f"{name}: {len(split)}" for name, split in bundle.dataset.splits.items())
    with transaction.atomic():
        model, _ = BaseModel.objects.update_or_create(
            name=bundle.info.title,
            defaults={
                "kind": BaseModel.Kind.RUNNABLE,
                "adapter": bundle_name,
                "description": bundle.info.description,
                "spec": spec.to_dict(),
                "weights_sha256": bundle.weights_sha256(),
                "eval_dataset": f"{bundle.dataset.name} ({split_sizes})",
                "eval_dataset_sha256": bundle.dataset.sha256,
                "fp32_metrics": {**variant_metrics(fp32), "provenance": measured_provenance()},
                "tags": ["built-in"],
            },
        )
        record_variant(
            model,
            Plan(),
            name="fp32",
            metrics=variant_metrics(fp32),
            source="measured",
            provenance=measured_provenance(),
            tags=["baseline"],
        )
        record_variant(
            model,
            int8_plan,
            name="uniform int8 (RTN, per-channel)",
            metrics=variant_metrics(int8),
            source="measured",
            provenance=measured_provenance(),
            tags=["uniform"],
        )
    return model


def compute_sensitivity(
    model: BaseModel,
    on_progress: Callable[[int, int], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> SensitivityProfile:
    """Profile every tensor at every precision (rest FP32) on a calibration subsample and
    store the profile on the model. Cached engine outputs make a repeat cheap.

    One process profiles a model at a time (a file lock beside the profile's cache file): a
    planning run started while the registration's own profiling is under way waits for that
    profile instead of measuring the same 10–20 minutes again on the other worker process.
    `on_wait` is called every few seconds while waiting (a run keeps its heartbeat with it)."""
    bundle = bundle_for(model)
    sample = bundle.dataset.subsample("calibration", SENSITIVITY_CALIBRATION_EXAMPLES)
    from planner.evaluate import Evaluator

    evaluator = Evaluator(bundle.adapter, sample, bundle.heads, cache_dir=settings.ENGINE_DATA_DIR)
    # The profile depends only on the model, data and family: keep it beside the engine caches
    # so another database (a benchmark, a second deployment) reuses it instead of re-measuring.
    family = "-".join(f"{k}={v}" for k, v in sorted(SENSITIVITY_FAMILY.items()))
    cache_file = Path(settings.ENGINE_DATA_DIR) / "sensitivity" / f"{evaluator.cache_key}-{family}.json"
    stored = _read_profile(cache_file)  # written by an atomic rename: no lock needed to read
    if stored is None:
        with contextlib.suppress(OSError):  # a read-only data dir: profiled unlocked, not cached
            cache_file.parent.mkdir(parents=True, exist_ok=True)
        with _profiling_lock(cache_file, on_wait):
            stored = _read_profile(cache_file)  # the process this one waited for wrote it
            if stored is None:
                profile = profile_sensitivity(evaluator, progress=on_progress, **SENSITIVITY_FAMILY)
                provenance = measured_provenance("profiled") + f" in {profile.seconds:.0f} s"
                stored = (profile, provenance)
                try:
                    with replacing(cache_file) as tmp:
                        tmp.write_text(json.dumps({"profile": profile.to_dict(), "provenance": provenance}))
                except OSError as exc:  # e.g. a read-only data dir: the model row still gets it
                    log.warning("sensitivity profile not cached in %s: %s", cache_file, exc)
    profile, provenance = stored
    BaseModel.objects.filter(pk=model.pk).update(sensitivity={**profile.to_dict(), "provenance": provenance})
    return profile


def _read_profile(cache_file: Path) -> tuple[SensitivityProfile, str] | None:
    if not cache_file.is_file():
        return None
    stored = json.loads(cache_file.read_text())
    return SensitivityProfile.from_dict(stored["profile"]), str(stored["provenance"])


@contextmanager
def _profiling_lock(cache_file: Path, on_wait: Callable[[], None] | None) -> Iterator[None]:
    """Hold the lock beside `cache_file` while profiling; `on_wait` every few seconds while
    another process holds it (it may raise to give up, e.g. on a cancelled run).  A data
    directory where the lock cannot be made (read-only, another user's) profiles unlocked, as
    before the lock; a holder that never finishes is given up on after
    SENSITIVITY_LOCK_MAX_WAIT_S."""
    lock = FileLock(cache_file.with_name(cache_file.name + ".lock"))
    waited_since = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=SENSITIVITY_LOCK_POLL_S)
            held = True
            break
        except Timeout:
            if time.monotonic() - waited_since > SENSITIVITY_LOCK_MAX_WAIT_S:
                raise RuntimeError(
                    f"another process has been profiling {cache_file.name} for over "
                    f"{SENSITIVITY_LOCK_MAX_WAIT_S:.0f} s (its lock: {lock.lock_file})"
                ) from None
            if on_wait is not None:
                on_wait()
        except OSError as exc:
            log.warning("profiling without the lock: %s cannot be locked (%s)", lock.lock_file, exc)
            held = False
            break
    try:
        yield
    finally:
        if held:
            lock.release()


def sensitivity_of(model: BaseModel) -> SensitivityProfile | None:
    if not model.sensitivity:
        return None
    data = {k: v for k, v in model.sensitivity.items() if k != "provenance"}
    return SensitivityProfile.from_dict(data)
