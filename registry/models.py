"""Base models, their variants, and what was measured or predicted about each variant.

Numbers carry their provenance: `Variant.metrics_source` says whether accuracy figures were
measured by running the model or estimated by the sensitivity proxy; `Measurement` rows are
stopwatch / bytes-written facts with the host and date; `Prediction` rows are cost-model
outputs and always say so (with the cost model version).
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.utils.text import slugify

from devices.models import Device, DeviceProfile


class BaseModel(models.Model):
    class Kind(models.TextChoices):
        RUNNABLE = "runnable", "runnable (weights + evaluation set)"
        SPEC_ONLY = "spec_only", "spec only (planned from its config, no weights)"

    name = models.CharField(max_length=120, unique=True)
    slug = models.SlugField(max_length=140, unique=True, editable=False)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.RUNNABLE)
    adapter = models.CharField(
        max_length=60, blank=True, help_text="engine adapter that runs it, e.g. 'minilm'"
    )
    version = models.PositiveIntegerField(default=1)
    description = models.TextField(blank=True)
    spec = models.JSONField(help_text="planner ModelSpec: tensors, shapes, MACs per token, exit points")
    weights_sha256 = models.CharField(max_length=64, blank=True)
    eval_dataset = models.CharField(max_length=200, blank=True)
    eval_dataset_sha256 = models.CharField(max_length=64, blank=True)
    fp32_metrics = models.JSONField(default=dict, blank=True, help_text="measured on the held-out split")
    sensitivity = models.JSONField(null=True, blank=True, help_text="per-tensor, per-precision fidelity loss")
    tags = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: object, **kwargs: object) -> None:
        self.slug = slugify(self.name)[:140] or "model"
        super().save(*args, **kwargs)  # type: ignore[arg-type]


class Variant(models.Model):
    class Source(models.TextChoices):
        MEASURED = "measured", "measured (model run on the evaluation set)"
        ESTIMATED = "estimated", "estimated (sensitivity proxy)"

    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="variants")
    name = models.CharField(max_length=160)
    plan = models.JSONField(help_text="planner Plan: a scheme per tensor and the exit threshold")
    plan_hash = models.CharField(max_length=32)
    weight_bytes = models.PositiveBigIntegerField(help_text="packed weight payload bytes (as written)")
    metrics = models.JSONField(default=dict, help_text="accuracy, agreement, KL, cosine, mean layers …")
    metrics_source = models.CharField(max_length=16, choices=Source.choices)
    provenance = models.CharField(max_length=300, help_text="who/what produced the metrics, where and when")
    tags = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["base_model", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["base_model", "plan_hash"], name="one_variant_per_plan")
        ]
        indexes = [models.Index(fields=["base_model", "weight_bytes"])]

    def __str__(self) -> str:
        return f"{self.base_model.name} · {self.name}"


class Measurement(models.Model):
    """A fact measured by running a variant: on the EdgeFit host or reported by a device."""

    class Kind(models.TextChoices):
        HOST = "host", "host benchmark"
        DEVICE = "device", "device report"

    variant = models.ForeignKey(Variant, on_delete=models.CASCADE, related_name="measurements")
    device_profile = models.ForeignKey(
        DeviceProfile, null=True, blank=True, on_delete=models.SET_NULL, related_name="measurements"
    )
    device = models.ForeignKey(
        Device, null=True, blank=True, on_delete=models.SET_NULL, related_name="measurements"
    )
    package = models.ForeignKey(
        "Package", null=True, blank=True, on_delete=models.SET_NULL, related_name="measurements"
    )
    kind = models.CharField(max_length=8, choices=Kind.choices)
    host = models.CharField(max_length=200, help_text="machine that ran it")
    batch_size = models.PositiveIntegerField()
    seq_len = models.PositiveIntegerField(null=True, blank=True)
    latency_p50_s = models.FloatField()
    latency_p90_s = models.FloatField()
    peak_memory_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    accuracy = models.FloatField(null=True, blank=True)
    agreement = models.FloatField(null=True, blank=True, help_text="agreement with the FP32 predictions")
    check_examples = models.PositiveIntegerField(
        null=True, blank=True, help_text="examples of the package's check set behind accuracy/agreement"
    )
    samples = models.JSONField(
        default=list, blank=True, help_text="per-text timings: tokens, exit layer, latency (ms)"
    )
    runtime = models.JSONField(default=dict, blank=True, help_text="kernels per tensor, threads, versions")
    measured_at = models.DateTimeField()
    received_at = models.DateTimeField(null=True, blank=True)
    # NULL, not "": no key (the unique constraint below is partial on it).
    idempotency_key = models.CharField(  # noqa: DJ001
        max_length=100,
        null=True,
        blank=True,
        help_text="the report's Idempotency-Key header: a retry with it answers with this row",
    )
    request_digest = models.CharField(
        max_length=64, blank=True, default="", help_text="SHA-256 of the report's canonical JSON body"
    )

    class Meta:
        ordering = ["-measured_at"]
        indexes = [models.Index(fields=["device_profile", "kind", "measured_at"])]
        constraints = [
            # In the database, not only in the service: two concurrent retries cannot both insert.
            models.UniqueConstraint(
                fields=["device", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="one_measurement_per_device_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        p50_ms = self.latency_p50_s * 1000
        return f"{self.variant_id} on {self.host}: p50 {p50_ms:.2f} ms (batch {self.batch_size})"


class Prediction(models.Model):
    """A cost-model output for a variant on a device profile. Always a prediction."""

    variant = models.ForeignKey(Variant, on_delete=models.CASCADE, related_name="predictions")
    device_profile = models.ForeignKey(DeviceProfile, on_delete=models.CASCADE, related_name="predictions")
    batch_size = models.PositiveIntegerField(default=1)
    latency_s = models.FloatField()
    memory_bytes = models.PositiveBigIntegerField()
    cost_model_version = models.CharField(max_length=40)
    calibrated = models.BooleanField(
        default=False, help_text="cost model fitted to this profile's measurements"
    )
    predicted_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["variant", "device_profile", "batch_size"],
                name="one_prediction_per_variant_device_batch",
            )
        ]

    def __str__(self) -> str:
        return f"predicted {self.latency_s * 1000:.2f} ms for {self.variant_id} on {self.device_profile_id}"


class RecalibrationRequest(models.Model):
    """A device profile whose cost model is due a re-fit: a device reported since the last re-fit
    read the measurements.  Written in the report's transaction (`registry.measurements`),
    deleted by the re-fit that covers it (`registry.calibration`); one left longer than
    EDGEFIT_STALE_SECONDS — its message lost (broker down at commit) or its worker dead — is
    enqueued again by `workers.requeue_stale`."""

    profile = models.OneToOneField(
        DeviceProfile, primary_key=True, on_delete=models.CASCADE, related_name="+"
    )
    requested_at = models.DateTimeField(help_text="the latest report (or sweep) asking for the re-fit")

    def __str__(self) -> str:
        return f"re-fit of profile {self.profile_id} due since {self.requested_at:%Y-%m-%d %H:%M:%S}"


class PlanningRun(models.Model):
    """A fleet planning run: one model, several device profiles, a policy and a budget.

    Status moves queued → running → done / failed / cancelled, and only through
    `registry.planning` (a worker claims a queued run with a conditional update, so a run never
    executes twice at once).  Progress fields are written by the worker while it runs.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Sampler(models.TextChoices):
        NSGA2 = "nsga2", "NSGA-II (Optuna)"
        TPE = "tpe", "multi-objective TPE (Optuna)"
        RANDOM = "random", "random (baseline)"

    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="planning_runs")
    device_profiles = models.ManyToManyField(DeviceProfile, related_name="planning_runs")
    policy = models.JSONField(help_text="recommendation policy and constraints (see planner.recommend)")
    trials_per_device = models.PositiveIntegerField()
    real_eval_budget = models.PositiveIntegerField(help_text="real model evaluations the run may spend")
    sampler = models.CharField(max_length=12, choices=Sampler.choices, default=Sampler.NSGA2)
    seed = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED, db_index=True)
    cancel_requested = models.BooleanField(default=False)
    trials_done = models.PositiveIntegerField(default=0)
    trials_planned = models.PositiveIntegerField(default=0)
    real_evaluations = models.PositiveIntegerField(default=0)
    progress = models.JSONField(
        default=dict, blank=True, help_text="best per device (the history: HypervolumePoint rows)"
    )
    result = models.JSONField(default=dict, blank=True, help_text="per-device fronts and recommendations")
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="planning_runs"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="times a worker picked the run up")
    stage = models.CharField(max_length=12, default="search", help_text="search → confirm → done")
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="last sign of life of its worker")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.base_model_id} ({self.status})"

    @property
    def study_prefix(self) -> str:
        """Optuna studies of this run are named `<prefix><device id>`; resumed by that name."""
        return f"edgefit-run-{self.pk}-device-"

    @property
    def finished(self) -> bool:
        return self.status in {self.Status.DONE, self.Status.FAILED, self.Status.CANCELLED}

    @property
    def progress_fraction(self) -> float:
        return min(1.0, self.trials_done / self.trials_planned) if self.trials_planned else 0.0


class HypervolumePoint(models.Model):
    """One point of a run's hypervolume-over-time history (the live chart).

    A row per point, appended: in the run's JSON `progress` the history was rewritten whole,
    under the run's row lock, every 50 trials of every device — up to 40,000 points (6 MB)
    rewritten 40,000 times for a run at its limits — and every list of runs returned it."""

    run = models.ForeignKey(PlanningRun, on_delete=models.CASCADE, related_name="hypervolume_points")
    device_profile = models.ForeignKey(DeviceProfile, on_delete=models.CASCADE, related_name="+")
    trials = models.PositiveIntegerField(help_text="trials of this device's search done at this point")
    hypervolume = models.FloatField(help_text="of the device's estimated front (normalised)")
    source = models.CharField(max_length=12, default="estimated")
    at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["run", "id"], name="hypervolume_point_run_order")]

    def __str__(self) -> str:
        return f"run {self.run_id} · device {self.device_profile_id} · {self.trials} trials"

    def to_dict(self) -> dict[str, Any]:
        """The point as the progress API and the chart have always shown it."""
        return {
            "at": self.at.isoformat(),
            "device": self.device_profile_id,
            "trials": self.trials,
            "hypervolume": self.hypervolume,
            "source": self.source,
        }


class DeviceSearch(models.Model):
    """One device's share of a planning run: its Optuna study, leased by one worker at a time."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        CANCELLED = "cancelled"

    run = models.ForeignKey(PlanningRun, on_delete=models.CASCADE, related_name="device_searches")
    device_profile = models.ForeignKey(DeviceProfile, on_delete=models.CASCADE, related_name="+")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    trials_done = models.PositiveIntegerField(default=0)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "device_profile"], name="one_search_per_run_device")
        ]

    def __str__(self) -> str:
        return f"run {self.run_id} · device {self.device_profile_id} ({self.status})"

    @property
    def study_name(self) -> str:
        return f"edgefit-run-{self.run_id}-device-{self.device_profile_id}"


class RealEvaluation(models.Model):
    """A plan's weights run on the held-out split: shared by every device and every run of the
    model (accuracy does not depend on the device), claimed by one worker so none is repeated."""

    class Status(models.TextChoices):
        RUNNING = "running"
        DONE = "done"

    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="real_evaluations")
    weights_key = models.CharField(max_length=32)
    plan = models.JSONField()
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.RUNNING)
    result = models.JSONField(default=dict, blank=True)
    claimed_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    run = models.ForeignKey(PlanningRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["base_model", "weights_key"], name="one_evaluation_per_weights")
        ]

    def __str__(self) -> str:
        return f"{self.base_model_id}:{self.weights_key} ({self.status})"


class Package(models.Model):
    """A built, signed package of a variant: content-addressed by the SHA-256 of its manifest.

    The files live under `storage_path` (`<EDGEFIT_PACKAGE_DIR>/<digest>/`); the row holds what
    the API and the config answer need without opening them."""

    digest = models.CharField(max_length=64, unique=True, help_text="SHA-256 of manifest.json")
    variant = models.ForeignKey(Variant, on_delete=models.PROTECT, related_name="packages")
    manifest = models.JSONField()
    manifest_bytes = models.PositiveIntegerField()
    blob_bytes = models.PositiveBigIntegerField(help_text="model.safetensors, bytes written")
    blob_sha256 = models.CharField(max_length=64)
    predicted_bytes = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="the engine's prediction of blob_bytes before writing"
    )
    signature = models.CharField(max_length=128, help_text="Ed25519 signature of manifest.json, hex")
    key_id = models.CharField(max_length=16, help_text="first 16 hex of SHA-256 of the public key")
    build_seconds = models.FloatField()
    storage_path = models.CharField(max_length=500)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"package {self.digest[:12]} of variant {self.variant_id}"

    @property
    def size(self) -> int:
        return int(self.blob_bytes)

    @property
    def precision_summary(self) -> dict[str, int]:
        return dict(self.manifest.get("precision_summary") or {})


class Release(models.Model):
    """A variant published to a device profile under an alias, to a percentage of its devices.

    Per (profile, alias) one release is `active` (the head); publishing makes the new one the
    head and links the old one as `previous` (superseded); rollback marks the head rolled back
    and makes its previous release the head again.  A device gets the head when its bucket
    (a hash of seed and device id, 0–99) is below `rollout_percent`, else the nearest previous
    release that is fully rolled out.  `version` counts changes (ETag / If-Match).
    """

    class Status(models.TextChoices):
        PENDING = "pending", "pending (package being built)"
        ACTIVE = "active", "active (head of its alias)"
        SUPERSEDED = "superseded", "superseded by a newer release"
        ROLLED_BACK = "rolled_back", "rolled back"
        FAILED = "failed", "failed (package build failed)"

    profile = models.ForeignKey(DeviceProfile, on_delete=models.CASCADE, related_name="releases")
    alias = models.SlugField(max_length=40)
    variant = models.ForeignKey(Variant, on_delete=models.PROTECT, related_name="releases")
    package = models.ForeignKey(
        Package, null=True, blank=True, on_delete=models.PROTECT, related_name="releases"
    )
    rollout_percent = models.PositiveSmallIntegerField()
    seed = models.CharField(max_length=32, help_text="bucket seed: sha256(f'{seed}:{device_id}')")
    version = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    previous = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="the head of the alias this release replaced",
    )
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["profile", "alias"],
                condition=models.Q(status="active"),
                name="one_active_release_per_alias",
            ),
            models.CheckConstraint(
                condition=models.Q(rollout_percent__lte=100), name="rollout_percent_at_most_100"
            ),
        ]

    def __str__(self) -> str:
        return f"release {self.pk}: {self.alias} on {self.profile_id} at {self.rollout_percent} %"

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


class AuditEntry(models.Model):
    """Who changed what, when, from what to what. Written in the transaction of the change."""

    actor = models.ForeignKey("auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_label = models.CharField(max_length=160, help_text="username, 'device <id>' or 'system'")
    action = models.CharField(max_length=40, db_index=True)
    target_type = models.CharField(max_length=40)
    target_id = models.CharField(max_length=64)
    target_label = models.CharField(max_length=200, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["target_type", "target_id"])]

    def __str__(self) -> str:
        return (
            f"{self.at:%Y-%m-%d %H:%M} {self.actor_label} {self.action} {self.target_type} {self.target_id}"
        )
