"""Per-tensor sensitivity to quantization and a fast additive fidelity proxy.

Profiling quantizes one tensor at a time (every precision, rest FP32) and measures the loss of
fidelity to the FP32 model on the CALIBRATION split.  Because only that tensor's stage and the
later ones change, each measurement resumes from the FP32 activations cached by the evaluator
before the tensor's block.  The profile is stored once per model (JSON via to_dict/from_dict).

The proxy predicts a plan's loss as the sum of its tensors' losses: plans are rows of precision
indices, the profile a (tensors × precisions) matrix, so a batch of plans is one gather + sum.

Besides that matrix — one "family" scheme per precision (the profile's group size, symmetry and
method) — a profile may hold **variants**: other schemes measured the same way for the tensors
they apply to (groups of 32 or 64, asymmetric grids, hot rows for embedding tables).  The
greedy frontier (`planner.mixed`) chooses among all of them; the vectorised proxy reads the
family matrix only (a plan's scheme counts as its precision's family scheme there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from planner.evaluate import Evaluator, kl_divergence
from planner.specs import PRECISIONS, ModelSpec, Plan, PlanError, TensorScheme, TensorSpec

__all__ = [
    "METRICS",
    "SchemeVariant",
    "SensitivityProfile",
    "check_proxy",
    "fidelity_losses",
    "profile_sensitivity",
    "random_plans",
    "spearman",
]

#: kl: mean KL(FP32 ‖ plan) of the task head; disagreement: 1 − top-1 agreement with FP32;
#: cosine: 1 − mean cosine of final embeddings with FP32.
METRICS: tuple[str, ...] = ("kl", "disagreement", "cosine")


@dataclass(frozen=True)
class SchemeVariant:
    """One more measured scheme of one tensor (beyond the profile's family columns)."""

    tensor: str
    scheme: TensorScheme
    losses: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "scheme": self.scheme.to_dict(), "losses": dict(self.losses)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchemeVariant:
        return cls(
            tensor=str(data["tensor"]),
            scheme=TensorScheme.from_dict(data["scheme"]),
            losses={m: float(v) for m, v in data["losses"].items()},
        )


@dataclass(frozen=True)
class SensitivityProfile:
    """Loss matrices (tensors × precisions) per metric; column order = `precisions`.

    `corrections[metric] = (a, b)` optionally maps the additive sum s to a·s**b (fitted on
    measured plans; monotone, so rankings are unchanged).  `variants` are further measured
    (tensor, scheme) pairs (see the module docstring).
    """

    model: str
    evaluator_key: str
    split: str
    n_examples: int
    group_size: int | None
    method: str
    symmetric: bool
    tensors: tuple[str, ...]
    precisions: tuple[str, ...]
    losses: dict[str, np.ndarray]
    seconds: float = 0.0
    corrections: dict[str, tuple[float, float]] = field(default_factory=dict)
    variants: tuple[SchemeVariant, ...] = ()

    def family_scheme(self, shape: tuple[int, int], precision: str) -> TensorScheme:
        """The scheme the family column of `precision` was measured with for a tensor of `shape`:
        the profile's group size where it divides the input dimension (else per channel)."""
        if not precision.startswith("int"):
            return TensorScheme(precision)
        gs = self.group_size if self.group_size is not None and shape[1] % self.group_size == 0 else None
        return TensorScheme(precision, gs, self.symmetric, self.method)

    def variants_of(self, tensor: str) -> list[SchemeVariant]:
        return [v for v in self.variants if v.tensor == tensor]

    def index_matrix(self, plans: Sequence[Plan]) -> np.ndarray:
        """(P, T) int matrix of precision column per tensor; unknown precision → PlanError."""
        col = {p: i for i, p in enumerate(self.precisions)}
        row = {n: i for i, n in enumerate(self.tensors)}
        out = np.zeros((len(plans), len(self.tensors)), dtype=np.int64)  # column 0 is fp32
        for k, plan in enumerate(plans):
            for name, scheme in plan.schemes:
                if name not in row:
                    raise PlanError(f"tensor {name!r} is not in the sensitivity profile of {self.model!r}")
                if scheme.precision not in col:
                    raise PlanError(f"precision {scheme.precision!r} was not profiled for {self.model!r}")
                out[k, row[name]] = col[scheme.precision]
        return out

    def estimate_many(self, index_matrix: np.ndarray, metric: str = "kl") -> np.ndarray:
        """Predicted loss of every row of a (P, T) precision-index matrix (vectorised)."""
        table = self._table(metric)
        idx = np.asarray(index_matrix, dtype=np.int64)
        total: np.ndarray = table[np.arange(table.shape[0])[None, :], idx].sum(1)
        a, b = self.corrections.get(metric, (1.0, 1.0))
        if (a, b) != (1.0, 1.0):
            total = a * np.power(np.maximum(total, 0.0), b)
        return total

    def estimate(self, plan: Plan, metric: str = "kl") -> float:
        """Predicted fidelity loss of one plan (see `estimate_many`); marked predicted by callers."""
        return float(self.estimate_many(self.index_matrix([plan]), metric)[0])

    def with_correction(
        self, metric: str, index_matrix: np.ndarray, measured: np.ndarray
    ) -> SensitivityProfile:
        """Fit log(measured) = log(a) + b·log(sum) on positive pairs; return a corrected copy."""
        raw = SensitivityProfile(**{**self.__dict__, "corrections": {}}).estimate_many(index_matrix, metric)
        m = np.asarray(measured, dtype=np.float64)
        ok = (raw > 0) & (m > 0)
        if ok.sum() < 3:
            return self
        b, log_a = np.polyfit(np.log(raw[ok]), np.log(m[ok]), 1)
        corrections = {**self.corrections, metric: (float(np.exp(log_a)), float(b))}
        return SensitivityProfile(**{**self.__dict__, "corrections": corrections})

    def _table(self, metric: str) -> np.ndarray:
        if metric not in self.losses:
            raise PlanError(f"unknown sensitivity metric {metric!r} (have {', '.join(self.losses)})")
        return self.losses[metric]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "evaluator_key": self.evaluator_key,
            "split": self.split,
            "n_examples": self.n_examples,
            "group_size": self.group_size,
            "method": self.method,
            "symmetric": self.symmetric,
            "tensors": list(self.tensors),
            "precisions": list(self.precisions),
            "losses": {m: v.tolist() for m, v in self.losses.items()},
            "seconds": self.seconds,
            "corrections": {m: list(v) for m, v in self.corrections.items()},
            "variants": [v.to_dict() for v in self.variants],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityProfile:
        tensors = tuple(data["tensors"])
        precisions = tuple(data["precisions"])
        losses = {m: np.asarray(v, dtype=np.float64) for m, v in data["losses"].items()}
        for m, v in losses.items():
            if v.shape != (len(tensors), len(precisions)):
                want = (len(tensors), len(precisions))
                raise PlanError(f"sensitivity matrix {m!r} has shape {v.shape}, expected {want}")
        return cls(
            model=data["model"],
            evaluator_key=data.get("evaluator_key", ""),
            split=data.get("split", "calibration"),
            n_examples=int(data.get("n_examples", 0)),
            group_size=data.get("group_size"),
            method=data.get("method", "rtn"),
            symmetric=bool(data.get("symmetric", True)),
            tensors=tensors,
            precisions=precisions,
            losses=losses,
            seconds=float(data.get("seconds", 0.0)),
            corrections={m: (float(v[0]), float(v[1])) for m, v in (data.get("corrections") or {}).items()},
            variants=tuple(SchemeVariant.from_dict(v) for v in data.get("variants") or ()),
        )


def fidelity_losses(evaluator: Evaluator, plan: Plan, split: str = "calibration") -> dict[str, float]:
    """Measured loss of `plan` per metric of METRICS (final exit, no early exit)."""
    ref = evaluator.reference(split)
    out = evaluator.outputs(plan, split, persist=False)
    ref_logits, logits = ref.logits[:, -1], out.logits[:, -1]
    return {
        "kl": float(kl_divergence(ref_logits, logits).mean()),
        "disagreement": float((ref_logits.argmax(-1) != logits.argmax(-1)).mean()),
        "cosine": float(1.0 - out.cosine.mean()),
    }


def _variant_for(tensor: TensorSpec, template: TensorScheme, method: str) -> TensorScheme | None:
    """`template` as measured on `tensor`, or None where it does not apply (a group size that
    does not divide the input dimension, hot rows on a Linear or on a table too small)."""
    if template.group_size is not None and tensor.shape[1] % template.group_size:
        return None
    if template.hot_rows and (tensor.kind != "embedding" or template.hot_rows >= tensor.shape[0]):
        return None
    # A lookup has no inputs to compensate: GPTQ there is RTN, so measure it as what it is.
    use = "rtn" if tensor.kind == "embedding" else template.method
    return TensorScheme(template.precision, template.group_size, template.symmetric, use, template.hot_rows)


def profile_sensitivity(
    evaluator: Evaluator,
    precisions: Sequence[str] = ("fp16", "int8", "int4", "int3", "int2"),
    group_size: int | None = None,
    method: str = "rtn",
    symmetric: bool = True,
    split: str = "calibration",
    progress: Callable[[int, int], None] | None = None,
    variants: Sequence[TensorScheme] = (),
) -> SensitivityProfile:
    """Measure every tensor at every precision, the rest FP32 (and every variant scheme).

    Steps:
      1. run the FP32 reference on `split` once (pins its per-stage activations);
      2. for each tensor (in model order, so a block's weights are quantized back to back) and
         each precision: a one-tensor plan; the evaluator resumes from the cached FP32 state
         before the tensor's block and recomputes only that block onward;
      3. record KL, disagreement and cosine loss; fp32 is column 0 with zero loss;
      4. the same for every scheme of `variants` that applies to the tensor (`_variant_for`)
         and differs from its family scheme; each becomes a `SchemeVariant`.
    Tensors whose shape the group size does not divide fall back to per-channel scales.
    Cost: about (n_tensors × (n_precisions + n_variants) × mean blocks recomputed / n_blocks)
    passes over `split`; to bound it, build `evaluator` on ``dataset.subsample("calibration", n)``.
    """
    started = time.perf_counter()
    spec = evaluator.spec
    cols = ("fp32", *(p for p in precisions if p != "fp32"))
    for p in cols:
        if p not in PRECISIONS:
            raise PlanError(f"precision {p!r} is not one of {', '.join(PRECISIONS)}")
    losses = {m: np.zeros((len(spec.tensors), len(cols))) for m in METRICS}
    evaluator.reference(split)
    family = SensitivityProfile(
        spec.name, evaluator.cache_key, split, 0, group_size, method, symmetric, (), cols, {}
    )
    extra: list[tuple[TensorSpec, TensorScheme]] = []
    for tensor in spec.tensors:
        own = {family.family_scheme(tensor.shape, p) for p in cols}
        for template in variants:
            scheme = _variant_for(tensor, template, method)
            if scheme is not None and scheme not in own and (tensor, scheme) not in extra:
                extra.append((tensor, scheme))
    total = len(spec.tensors) * (len(cols) - 1) + len(extra)
    done = 0

    def measure(name: str, scheme: TensorScheme) -> dict[str, float]:
        nonlocal done
        measured = fidelity_losses(evaluator, Plan.build({name: scheme}), split)
        done += 1
        if progress is not None:
            progress(done, total)
        return measured

    measured_variants: list[SchemeVariant] = []
    for i, tensor in enumerate(spec.tensors):
        for j, precision in enumerate(cols[1:], start=1):
            measured = measure(tensor.name, family.family_scheme(tensor.shape, precision))
            for m in METRICS:
                losses[m][i, j] = measured[m]
        for _, scheme in (x for x in extra if x[0] is tensor):
            measured_variants.append(SchemeVariant(tensor.name, scheme, measure(tensor.name, scheme)))
    return SensitivityProfile(
        model=spec.name,
        evaluator_key=evaluator.cache_key,
        split=split,
        n_examples=len(evaluator.labels(split)),
        group_size=group_size,
        method=method,
        symmetric=symmetric,
        tensors=spec.tensor_names,
        precisions=cols,
        losses=losses,
        seconds=time.perf_counter() - started,
        variants=tuple(measured_variants),
    )


def random_plans(
    profile: SensitivityProfile, n: int, seed: int = 0, spec: ModelSpec | None = None
) -> tuple[list[Plan], np.ndarray]:
    """`n` mixed plans of varied severity, and their (n, T) index matrix.

    Each plan draws its own precision mix from a Dirichlet, so the set spans nearly-lossless
    to heavily-quantized plans rather than clustering around one average severity.  With the
    model's `spec`, each tensor gets the scheme its profile column was measured with
    (`SensitivityProfile.family_scheme`: per channel where the group size does not divide its
    input dimension) — plans meant to be run need it; without, every tensor gets the profile's
    group size (enough for the proxy, which never validates a plan).
    """
    rng = np.random.default_rng(seed)
    k = len(profile.precisions)
    idx = np.zeros((n, len(profile.tensors)), dtype=np.int64)
    for r in range(n):
        mix = rng.dirichlet(np.full(k, 0.5))
        idx[r] = rng.choice(k, size=len(profile.tensors), p=mix)
    plans = []
    for row in idx:
        schemes = {}
        for name, c in zip(profile.tensors, row, strict=True):
            if c and spec is not None:
                schemes[name] = profile.family_scheme(spec.tensor(name).shape, profile.precisions[c])
            elif c:
                schemes[name] = TensorScheme(
                    profile.precisions[c], profile.group_size, profile.symmetric, profile.method
                )
        plans.append(Plan.build(schemes))
    return plans, idx


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x), dtype=np.float64)
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # average ranks of ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def check_proxy(
    evaluator: Evaluator, profile: SensitivityProfile, n_plans: int = 30, seed: int = 0
) -> dict[str, Any]:
    """Measure `n_plans` random mixed plans and correlate them with the additive proxy.

    Returns per metric the Spearman correlation, plus the measured and predicted values.
    """
    plans, idx = random_plans(profile, n_plans, seed, evaluator.spec)
    measured = {m: np.zeros(n_plans) for m in METRICS}
    for r, plan in enumerate(plans):
        got = fidelity_losses(evaluator, plan, profile.split)
        for m in METRICS:
            measured[m][r] = got[m]
    report: dict[str, Any] = {"n_plans": n_plans}
    for m in METRICS:
        predicted = profile.estimate_many(idx, m)
        report[m] = {
            "spearman": spearman(predicted, measured[m]),
            "measured": measured[m].tolist(),
            "predicted": predicted.tolist(),
        }
    return report
