"""Early exit evaluated from cached per-exit logits: whole threshold curves in milliseconds.

An example stops at the first exit whose confidence (max softmax probability) reaches the
threshold; the last exit always answers.  Given the (N, E, C) logits of one plan on a split,
every threshold of a grid is evaluated at once with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ThresholdCurve",
    "choose_threshold",
    "confidences",
    "threshold_curve",
    "threshold_for_layers",
    "worst_of",
]

#: 0.30, 0.31, …, 0.99 then finer steps up to 0.9999 where confident heads separate.
DEFAULT_THRESHOLDS: np.ndarray = np.unique(
    np.concatenate([np.round(np.arange(0.30, 1.0, 0.01), 4), [0.995, 0.998, 0.999, 0.9995, 0.9999]])
)


def confidences(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(…, C) logits → (max softmax probability, argmax), numerically stable."""
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return (1.0 / e.sum(-1)).astype(np.float64), logits.argmax(-1)


@dataclass(frozen=True)
class ThresholdCurve:
    """Early-exit figures for every threshold of a grid (arrays indexed like `thresholds`).

    `exit_fraction[t, e]` is the share of examples answered by exit e; `mean_layers` the mean
    number of blocks executed; `full_*` the figures without early exit (every block runs).
    """

    thresholds: np.ndarray
    accuracy: np.ndarray
    agreement: np.ndarray
    mean_layers: np.ndarray
    mean_cost: np.ndarray
    exit_fraction: np.ndarray
    full_accuracy: float
    full_agreement: float
    n_blocks: int

    def at(self, threshold: float | None) -> dict[str, Any]:
        """Figures at one grid threshold (None = no early exit)."""
        if threshold is None:
            frac = [0.0] * (self.n_blocks - 1) + [1.0]
            return {
                "threshold": None,
                "accuracy": self.full_accuracy,
                "agreement": self.full_agreement,
                "mean_layers": float(self.n_blocks),
                "exit_fraction": frac,
            }
        i = int(np.argmin(np.abs(self.thresholds - threshold)))
        return {
            "threshold": float(self.thresholds[i]),
            "accuracy": float(self.accuracy[i]),
            "agreement": float(self.agreement[i]),
            "mean_layers": float(self.mean_layers[i]),
            "exit_fraction": [float(x) for x in self.exit_fraction[i]],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": [float(x) for x in self.thresholds],
            "accuracy": [float(x) for x in self.accuracy],
            "agreement": [float(x) for x in self.agreement],
            "mean_layers": [float(x) for x in self.mean_layers],
            "mean_cost": [float(x) for x in self.mean_cost],
            "exit_fraction": [[float(x) for x in row] for row in self.exit_fraction],
            "full_accuracy": self.full_accuracy,
            "full_agreement": self.full_agreement,
            "n_blocks": self.n_blocks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThresholdCurve:
        return cls(
            thresholds=np.asarray(data["thresholds"], dtype=np.float64),
            accuracy=np.asarray(data["accuracy"], dtype=np.float64),
            agreement=np.asarray(data["agreement"], dtype=np.float64),
            mean_layers=np.asarray(data["mean_layers"], dtype=np.float64),
            mean_cost=np.asarray(data["mean_cost"], dtype=np.float64),
            exit_fraction=np.asarray(data["exit_fraction"], dtype=np.float64),
            full_accuracy=float(data["full_accuracy"]),
            full_agreement=float(data["full_agreement"]),
            n_blocks=int(data["n_blocks"]),
        )


def threshold_curve(
    exit_logits: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    reference: Sequence[int] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
    exit_costs: Sequence[float] | np.ndarray | None = None,
) -> ThresholdCurve:
    """Accuracy, agreement and cost of early exit at every threshold.

    `exit_logits` (N, E, C) of the plan; `labels` the true classes; `reference` the FP32
    model's final-exit predictions; `exit_costs[e]` the cost of stopping at exit e (default
    e + 1 blocks).  Steps:
      1. confidence and prediction of every exit for every example;
      2. for all thresholds at once, a (T, N, E) "confident enough" mask with the last exit
         forced true; the first true exit along E is where each example stops;
      3. gather predictions at the stopping exit; average correctness, agreement and cost.
    """
    logits = np.asarray(exit_logits, dtype=np.float64)
    n, e_count, _ = logits.shape
    y = np.asarray(labels)
    ref = np.asarray(reference)
    t = np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64)
    costs = (
        np.arange(1, e_count + 1, dtype=np.float64) if exit_costs is None else np.asarray(exit_costs, float)
    )
    conf, pred = confidences(logits)
    hit = conf[None, :, :] >= t[:, None, None]
    hit[:, :, -1] = True
    stop = hit.argmax(-1)  # (T, N): first exit confident enough
    chosen = pred[np.arange(n)[None, :], stop]
    fraction = (stop[:, :, None] == np.arange(e_count)[None, None, :]).mean(1)
    final = pred[:, -1]
    return ThresholdCurve(
        thresholds=t,
        accuracy=(chosen == y[None, :]).mean(1),
        agreement=(chosen == ref[None, :]).mean(1),
        mean_layers=(stop + 1).mean(1).astype(np.float64),
        mean_cost=costs[stop].mean(1),
        exit_fraction=fraction,
        full_accuracy=float((final == y).mean()) if n else 0.0,
        full_agreement=float((final == ref).mean()) if n else 0.0,
        n_blocks=e_count,
    )


def choose_threshold(
    curve: ThresholdCurve,
    max_loss_points: float,
    metric: str = "accuracy",
    min_agreement: float | None = None,
) -> float | None:
    """The cheapest threshold losing at most `max_loss_points` (percentage points) of `metric`
    and, when `min_agreement` is given, keeping top-1 agreement with FP32 at or above it.

    Use the CALIBRATION split's curve; report the chosen threshold's figures on the test split.
    Steps: loss = (figure without early exit − figure at t) × 100 per threshold; keep those
    within the bound (and the agreement floor); take the lowest mean cost, ties to the highest
    (safest) threshold.  Returns None when no threshold saves anything.
    """
    if metric not in ("accuracy", "agreement"):
        raise ValueError(f"metric must be 'accuracy' or 'agreement', not {metric!r}")
    values = curve.accuracy if metric == "accuracy" else curve.agreement
    base = curve.full_accuracy if metric == "accuracy" else curve.full_agreement
    ok = (base - values) * 100.0 <= max_loss_points + 1e-9
    if min_agreement is not None:
        ok &= curve.agreement >= min_agreement - 1e-12
    if not ok.any():
        return None
    cost = np.where(ok, curve.mean_layers, np.inf)
    best = cost.min()
    if best >= curve.n_blocks:
        return None
    candidates = np.flatnonzero(cost <= best + 1e-12)
    return float(curve.thresholds[candidates.max()])


def threshold_for_layers(
    curve: ThresholdCurve,
    max_mean_layers: float,
    max_loss_points: float,
    min_agreement: float | None = None,
) -> float | None:
    """The most faithful threshold that runs at most `max_mean_layers` blocks on average.

    The other side of `choose_threshold`: there the accuracy bound is fixed and the cost
    minimised; here the compute budget is fixed (e.g. "1.5× fewer layers") and, among the
    thresholds within it that lose at most `max_loss_points` of accuracy (and keep agreement
    ≥ `min_agreement`), the one with the highest top-1 agreement with FP32 is taken (ties: the
    fewest layers, then the highest threshold).  Use the CALIBRATION curve.  None when no
    threshold meets the budget and the bounds.
    """
    ok = (curve.mean_layers <= max_mean_layers + 1e-12) & (
        (curve.full_accuracy - curve.accuracy) * 100.0 <= max_loss_points + 1e-9
    )
    if min_agreement is not None:
        ok &= curve.agreement >= min_agreement - 1e-12
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    best = max(idx, key=lambda i: (curve.agreement[i], -curve.mean_layers[i], curve.thresholds[i]))
    return float(curve.thresholds[best])


def worst_of(*curves: ThresholdCurve) -> ThresholdCurve:
    """The pessimistic envelope of curves of ONE plan measured two ways (e.g. the evaluator's
    weight-only numerics and the runtime's W8A8 kernels) on the same split and grid: per
    threshold the lowest accuracy and agreement and the most blocks run.  Choosing a threshold
    on it keeps every way of measuring within the bounds — what a headline that reports the
    worse of the two needs.  `exit_fraction` per threshold is the costliest curve's.
    """
    if not curves:
        raise ValueError("worst_of needs at least one curve")
    first = curves[0]
    for c in curves[1:]:
        if c.n_blocks != first.n_blocks or not np.array_equal(c.thresholds, first.thresholds):
            raise ValueError("worst_of needs curves over the same thresholds and blocks")
    layers = np.stack([c.mean_layers for c in curves])
    costliest = layers.argmax(0)
    fractions = np.stack([c.exit_fraction for c in curves])
    return ThresholdCurve(
        thresholds=first.thresholds,
        accuracy=np.min([c.accuracy for c in curves], axis=0),
        agreement=np.min([c.agreement for c in curves], axis=0),
        mean_layers=layers.max(0),
        mean_cost=np.max([c.mean_cost for c in curves], axis=0),
        exit_fraction=fractions[costliest, np.arange(len(first.thresholds))],
        full_accuracy=min(c.full_accuracy for c in curves),
        full_agreement=min(c.full_agreement for c in curves),
        n_blocks=first.n_blocks,
    )
