"""Early exit: exit heads (training, storage) and threshold curves from cached exit logits."""

from planner.exits.curve import (
    DEFAULT_THRESHOLDS,
    ThresholdCurve,
    choose_threshold,
    confidences,
    threshold_curve,
    threshold_for_layers,
    worst_of,
)
from planner.exits.heads import (
    L2_GRID,
    ExitHeads,
    HeadsChoice,
    pooled_features,
    prepare_heads,
    select_heads,
    train_exit_heads,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "L2_GRID",
    "ExitHeads",
    "HeadsChoice",
    "ThresholdCurve",
    "choose_threshold",
    "confidences",
    "pooled_features",
    "prepare_heads",
    "select_heads",
    "threshold_curve",
    "threshold_for_layers",
    "train_exit_heads",
    "worst_of",
]
