"""Early exit: exit heads (training, storage) and threshold curves from cached exit logits."""

from planner.exits.curve import (
    DEFAULT_THRESHOLDS,
    ThresholdCurve,
    choose_threshold,
    confidences,
    threshold_curve,
)
from planner.exits.heads import ExitHeads, pooled_features, prepare_heads, train_exit_heads

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ExitHeads",
    "ThresholdCurve",
    "choose_threshold",
    "confidences",
    "pooled_features",
    "prepare_heads",
    "threshold_curve",
    "train_exit_heads",
]
