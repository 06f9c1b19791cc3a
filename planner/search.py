"""Per-device multi-objective search over per-tensor precisions (Optuna), multi-fidelity.

One Optuna study per (run, device), kept in an RDB storage and named after both, so a worker
that dies mid-search is replaced by one that resumes the same study (`load_if_exists`).

Fidelity levels:
  * every trial is scored by the sensitivity proxy (additive per-tensor fidelity loss,
    microseconds per plan) for accuracy, and by the roofline cost model for the device's latency and
    memory (both predictions, and labelled so);
  * the candidates on each device's estimated front are then confirmed by real evaluations
    (the caller runs them, cached by plan and shared by every device of the run).

Objectives: estimated accuracy up, predicted latency down, predicted memory down.  Constraints
(recorded with `trial.set_constraint`, feasible when ≤ 0): memory within the device budget, only
precisions the device supports, the accuracy floor, the latency SLO.  Exit thresholds are not a
search variable: the engine evaluates the whole threshold curve of a confirmed plan for free.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from planner.cost import CostParams, predict
from planner.recommend import Candidate
from planner.sensitivity import SensitivityProfile
from planner.specs import PRECISION_BITS, DeviceSpec, ModelSpec, Plan, PlanError, TensorScheme

__all__ = [
    "SAMPLERS",
    "DeviceTarget",
    "SearchSettings",
    "TrialScore",
    "closest_misses",
    "ends_first",
    "estimated_front",
    "greedy_path",
    "hypervolume",
    "make_sampler",
    "plan_from_params",
    "run_device_search",
    "score_plan",
    "spread",
    "warm_start_plans",
]

SAMPLERS = ("nsga2", "tpe", "random")
GROUP_PARAM = "group_size"
#: Sequence length the latency of a request is predicted at (the demo task's texts are short).
DEFAULT_SEQ_LEN = 64


@dataclass(frozen=True)
class SearchSettings:
    """What one device search may choose and how long it runs."""

    trials: int
    sampler: str = "nsga2"
    seed: int = 0
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "int3", "int2")
    group_sizes: tuple[int | None, ...] = (64, 128)
    method: str = "rtn"
    seq_len: int = DEFAULT_SEQ_LEN
    population_size: int = 40

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise PlanError("trials must be ≥ 1")
        if self.sampler not in SAMPLERS:
            raise PlanError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        unknown = [p for p in self.precisions if p not in PRECISION_BITS]
        if unknown or "fp32" not in self.precisions:
            raise PlanError(f"precisions must include fp32 and come from {', '.join(PRECISION_BITS)}")


@dataclass(frozen=True)
class DeviceTarget:
    """A device as the search sees it: its spec, cost parameters and the policy's limits."""

    key: str
    device: DeviceSpec
    cost_params: CostParams = field(default_factory=CostParams)
    memory_budget_bytes: int | None = None
    latency_slo_s: float | None = None
    accuracy_floor: float | None = None

    @property
    def budget(self) -> int:
        return self.memory_budget_bytes or self.device.ram_budget_bytes

    def supports(self, precision: str) -> bool:
        return precision == "fp32" or precision in self.device.weight_formats


@dataclass(frozen=True)
class TrialScore:
    """A plan scored on one device: accuracy ESTIMATED by the proxy, latency and memory PREDICTED."""

    plan: Plan
    accuracy: float
    agreement: float
    latency_s: float
    memory_bytes: int
    weight_bytes: int
    constraints: dict[str, float]

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())


def scheme_for(
    precision: str, group_size: int | None, method: str, spec: ModelSpec, name: str
) -> TensorScheme:
    """The scheme of one tensor; a group size that does not divide it falls back to per-channel."""
    if precision in ("fp32", "fp16"):
        return TensorScheme(precision)
    tensor = spec.tensor(name)
    group = group_size if group_size is not None and tensor.shape[1] % group_size == 0 else None
    use_method = method if tensor.kind == "linear" else "rtn"  # GPTQ needs a matmul's inputs
    return TensorScheme(precision, group, True, use_method)


def plan_from_params(params: dict[str, Any], spec: ModelSpec, method: str) -> Plan:
    group = params.get(GROUP_PARAM)
    schemes = {
        t.name: scheme_for(str(params.get(t.name, "fp32")), group, method, spec, t.name) for t in spec.tensors
    }
    return Plan.build(schemes)


def _params_of(plan: Plan, spec: ModelSpec, default_group: int | None) -> dict[str, Any]:
    groups = {s.group_size for _, s in plan.schemes if s.is_integer and s.group_size is not None}
    params: dict[str, Any] = {t.name: plan.scheme(t.name).precision for t in spec.tensors}
    params[GROUP_PARAM] = next(iter(groups)) if len(groups) == 1 else default_group
    return params


def score_plan(
    plan: Plan,
    spec: ModelSpec,
    target: DeviceTarget,
    profile: SensitivityProfile,
    fp32_accuracy: float,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    accuracy_per_disagreement: float = 1.0,
) -> TrialScore:
    """Estimate accuracy with the proxy, predict latency and memory with the cost model.

    Estimated accuracy = FP32 accuracy − k · estimated disagreement, k = 1 (every changed
    answer was right) unless a calibration from measured plans says otherwise.
    """
    disagreement = float(profile.estimate(plan, "disagreement"))
    agreement = max(0.0, 1.0 - disagreement)
    accuracy = max(0.0, fp32_accuracy - accuracy_per_disagreement * disagreement)
    cost = predict(spec, plan, target.device, batch=1, seq_len=seq_len, params=target.cost_params)
    unsupported = sum(1 for _, s in plan.schemes if not target.supports(s.precision))
    constraints = {
        "memory": cost.memory_bytes / target.budget - 1.0,
        "unsupported_precisions": float(unsupported),
        "accuracy_floor": (target.accuracy_floor - accuracy) if target.accuracy_floor is not None else -1.0,
        "latency_slo": (cost.latency_s / target.latency_slo_s - 1.0) if target.latency_slo_s else -1.0,
    }
    return TrialScore(
        plan, accuracy, agreement, cost.latency_s, cost.memory_bytes, cost.weight_bytes, constraints
    )


def greedy_path(
    spec: ModelSpec,
    profile: SensitivityProfile,
    allowed: Sequence[str],
    bytes_of: Callable[[Plan], int],
    *,
    group_size: int | None,
    method: str,
    start: str = "int8",
    max_steps: int = 200,
) -> list[Plan]:
    """Sensitivity-guided greedy: from uniform `start`, repeatedly move the one tensor whose next
    lower precision costs the least estimated disagreement per byte saved.

    Steps: keep a current precision per tensor; for every tensor with a lower allowed precision,
    the step's cost is Δ(profile loss) / Δ(bytes); take the cheapest; record the plan; stop when
    no tensor can go lower or after `max_steps`.  Returns the plans from widest to narrowest.
    """
    ladder = [p for p in sorted(allowed, key=lambda p: -PRECISION_BITS[p]) if p in profile.precisions]
    if start not in ladder:
        start = ladder[0]
    ladder = ladder[ladder.index(start) :]
    table = profile.losses["disagreement"] + 1e-3 * profile.losses["kl"]  # KL breaks ties
    col = {p: profile.precisions.index(p) for p in ladder}
    row = {n: i for i, n in enumerate(profile.tensors)}
    level = dict.fromkeys(spec.tensor_names, 0)

    def plan_at(levels: dict[str, int]) -> Plan:
        return Plan.build({n: scheme_for(ladder[k], group_size, method, spec, n) for n, k in levels.items()})

    def tensor_bytes(name: str, precision: str) -> int:
        return bytes_of(Plan.build({name: scheme_for(precision, group_size, method, spec, name)}))

    sizes = {(n, p): tensor_bytes(n, p) for n in spec.tensor_names for p in ladder}
    path = [plan_at(level)]
    for _ in range(max_steps):
        best: tuple[float, str] | None = None
        for name, k in level.items():
            if k + 1 >= len(ladder) or name not in row:
                continue
            here, there = ladder[k], ladder[k + 1]
            saved = sizes[(name, here)] - sizes[(name, there)]
            if saved <= 0:
                continue
            extra = table[row[name], col[there]] - table[row[name], col[here]]
            ratio = max(extra, 0.0) / saved
            if best is None or ratio < best[0]:
                best = (ratio, name)
        if best is None:
            break
        level[best[1]] += 1
        path.append(plan_at(level))
    return path


def warm_start_plans(
    spec: ModelSpec,
    profile: SensitivityProfile,
    target: DeviceTarget,
    settings: SearchSettings,
    bytes_of: Callable[[Plan], int],
    max_greedy: int = 24,
) -> list[Plan]:
    """Uniform plans at every allowed precision, plus evenly spaced points of the greedy path."""
    group = settings.group_sizes[0]
    plans = [
        Plan.build({t.name: scheme_for(p, group, settings.method, spec, t.name) for t in spec.tensors})
        for p in settings.precisions
        if target.supports(p)
    ]
    allowed = [p for p in settings.precisions if target.supports(p) and p != "fp32"]
    if allowed:
        path = greedy_path(spec, profile, allowed, bytes_of, group_size=group, method=settings.method)
        step = max(1, len(path) // max_greedy)
        plans.extend(path[::step])
        plans.append(path[-1])
    unique: dict[str, Plan] = {}
    for plan in plans:
        unique.setdefault(plan.hash(), plan)
    return list(unique.values())


def make_sampler(settings: SearchSettings, device_key: str) -> optuna.samplers.BaseSampler:
    seed = settings.seed * 1_000_003 + sum(ord(c) for c in device_key)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=settings.population_size, seed=seed)
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=20)
    return optuna.samplers.RandomSampler(seed=seed)


def run_device_search(
    storage: optuna.storages.BaseStorage | str,
    study_name: str,
    spec: ModelSpec,
    target: DeviceTarget,
    profile: SensitivityProfile,
    fp32_accuracy: float,
    settings: SearchSettings,
    bytes_of: Callable[[Plan], int],
    *,
    on_trial: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    accuracy_per_disagreement: float = 1.0,
) -> optuna.Study:
    """Run (or resume) the device's study until it holds `settings.trials` finished trials.

    Steps: open the study by name (`load_if_exists`); trials left RUNNING by a dead worker are
    marked FAIL (the caller guarantees one worker per device study at a time); on a new study,
    enqueue the warm starts; then ask → score → set constraints → tell, until the count of
    COMPLETE trials reaches the target or `should_stop()` says so.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=["maximize", "minimize", "minimize"],
        sampler=make_sampler(settings, target.key),
        load_if_exists=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy (estimated)", "latency_ms (predicted)", "memory_mib (predicted)"])
    existing = study.get_trials(deepcopy=False)
    for stale in existing:
        if stale.state == optuna.trial.TrialState.RUNNING:
            study._storage.set_trial_state_values(stale._trial_id, optuna.trial.TrialState.FAIL)
    if not existing:
        for plan in warm_start_plans(spec, profile, target, settings, bytes_of):
            study.enqueue_trial(
                _params_of(plan, spec, settings.group_sizes[0]), user_attrs={"warm_start": True}
            )
    choices = list(settings.precisions)
    done = sum(1 for t in existing if t.state == optuna.trial.TrialState.COMPLETE)
    while done < settings.trials:
        if should_stop is not None and should_stop():
            break
        trial = study.ask()
        params: dict[str, Any] = {t.name: trial.suggest_categorical(t.name, choices) for t in spec.tensors}
        params[GROUP_PARAM] = trial.suggest_categorical(GROUP_PARAM, list(settings.group_sizes))
        plan = plan_from_params(params, spec, settings.method)
        score = score_plan(
            plan,
            spec,
            target,
            profile,
            fp32_accuracy,
            seq_len=settings.seq_len,
            accuracy_per_disagreement=accuracy_per_disagreement,
        )
        for key, value in score.constraints.items():
            trial.set_constraint(key, value)
        study.tell(trial, [score.accuracy, score.latency_s * 1000, score.memory_bytes / 2**20])
        done += 1
        if on_trial is not None:
            on_trial(done)
    return study


def _constraints(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    prefix = "constraints:"
    return {k[len(prefix) :]: float(v) for k, v in trial.system_attrs.items() if k.startswith(prefix)}


def estimated_front(study: optuna.Study, spec: ModelSpec, method: str) -> list[tuple[int, Plan, TrialScore]]:
    """Feasible non-dominated trials of a study, deduplicated by plan, as (trial number, plan, score)."""
    rows: list[tuple[int, Plan, TrialScore]] = []
    seen: set[str] = set()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        constraints = _constraints(trial)
        if any(v > 0 for v in constraints.values()) or trial.values is None:
            continue
        plan = plan_from_params(trial.params, spec, method)
        if plan.hash() in seen:
            continue
        seen.add(plan.hash())
        accuracy, latency_ms, memory_mib = trial.values
        score = TrialScore(
            plan, accuracy, math.nan, latency_ms / 1000, int(memory_mib * 2**20), 0, constraints
        )
        rows.append((trial.number, plan, score))
    values = np.array([[-s.accuracy, s.latency_s, s.memory_bytes] for _, _, s in rows], dtype=float)
    keep = _non_dominated(values)
    return [rows[i] for i in sorted(keep, key=lambda i: rows[i][2].latency_s)]


def closest_misses(study: optuna.Study, spec: ModelSpec, method: str) -> list[TrialScore]:
    """When no trial is feasible: the most accurate, the fastest and the smallest trials, so a
    recommendation can say which constraint fails and by how much (figures estimated/predicted)."""
    trials = [
        t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.values
    ]
    picks: dict[int, optuna.trial.FrozenTrial] = {}
    for key in (lambda t: -t.values[0], lambda t: t.values[1], lambda t: t.values[2]):
        if trials:
            best = min(trials, key=key)
            picks[best.number] = best
    out = []
    for trial in picks.values():
        accuracy, latency_ms, memory_mib = trial.values
        plan = plan_from_params(trial.params, spec, method)
        out.append(
            TrialScore(
                plan, accuracy, math.nan, latency_ms / 1000, int(memory_mib * 2**20), 0, _constraints(trial)
            )
        )
    return out


def _non_dominated(values: np.ndarray) -> list[int]:
    """Indices of rows not dominated by any other (all objectives minimised)."""
    keep = []
    for i in range(len(values)):
        others = np.delete(values, i, axis=0)
        dominated = np.any(np.all(others <= values[i], axis=1) & np.any(others < values[i], axis=1))
        if not dominated:
            keep.append(i)
    return keep


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """`k` items evenly spaced along a sequence (ends included)."""
    if k >= len(items):
        return list(items)
    if k <= 0:
        return []
    if k == 1:
        return [items[len(items) // 2]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def ends_first(items: Sequence[Any]) -> list[Any]:
    """`items` reordered so that any prefix covers the whole sequence as evenly as it can: both
    ends first, then the middle, then the middles of the halves, breadth first.

    A front sorted by latency, confirmed in this order under a budget, gets its fastest and its
    most accurate point measured before anything in between (the hypervolume needs both)."""
    n = len(items)
    if n <= 2:
        return list(items)
    order = [0, n - 1]
    spans = deque([(0, n - 1)])
    while spans:
        lo, hi = spans.popleft()
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        spans.extend([(lo, mid), (mid, hi)])
    return [items[i] for i in order]


def hypervolume(
    candidates: Iterable[Candidate], *, accuracy_floor: float, latency_cap_s: float, memory_cap_bytes: float
) -> float:
    """Hypervolume of (accuracy up, latency down, memory down) against a reference point.

    Objectives are normalised (accuracy in points above the floor, latency and memory as
    fractions of their caps) so devices of any scale give comparable numbers; points outside
    the reference box add nothing.
    """
    from optuna._hypervolume import compute_hypervolume

    points = [
        [-(c.accuracy - accuracy_floor) * 100, c.latency_s / latency_cap_s, c.memory_bytes / memory_cap_bytes]
        for c in candidates
        if c.accuracy > accuracy_floor and c.latency_s < latency_cap_s and c.memory_bytes < memory_cap_bytes
    ]
    if not points:
        return 0.0
    return float(compute_hypervolume(np.array(points, dtype=float), np.array([0.0, 1.0, 1.0])))
