"""Exit heads: one linear classifier after every block, over mean-pooled block states.

The last block's head is the model's task head and reads the last block's state only.  An
intermediate head after block e reads the pooled states of blocks 0…e concatenated ("dense"
heads; `dense=False` trains the classic kind that reads block e alone): an early-exit run pools
each block for that block's own exit check anyway, and the earlier blocks' states carry what
block e's state has mixed away.
Heads are multinomial logistic regressions on standardised FP32 features, trained full-batch
with L-BFGS; intermediate heads are trained by self-distillation on the task head's predicted
distribution (`distill` = 1: only the teacher), because their job is to say early what the full
model would say.  How strongly each is regularised is chosen on the calibration split
(`select_heads`).

Measured on the built-in model (FP32, thresholds chosen on calibration for ≤ 4.0 of 6 blocks,
held-out figures): per-block heads with labels/teacher mixed half and half stop at 3.72 blocks
with 0.954 agreement with the full model; dense heads on the teacher alone stop at 3.72 blocks
with 0.972 agreement (and 0.736 vs 0.730 accuracy).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from planner.data.dataset import TextDataset, engine_data_dir
from planner.files import replacing
from planner.models.base import ModelAdapter, ModelFileError, TokenizedSplit

__all__ = [
    "L2_GRID",
    "ExitHeads",
    "HeadsChoice",
    "pooled_features",
    "prepare_heads",
    "select_heads",
    "train_exit_heads",
]

_FORMAT = "edgefit-exit-heads/1"


@dataclass(frozen=True)
class ExitHeads:
    """Per-block standardisation + one linear layer per exit; tensors indexed (exit, ...).

    mean (E, H), std (E, H) standardise block e's pooled state; bias (E, C).  weight is
    (E, C, H) when every head reads its own block, or (E, C, E·H) when heads read the
    concatenated states of all blocks, columns [j·H, (j+1)·H) belonging to block j — a head's
    columns for the blocks it does not read are exactly zero (`input_blocks` lists the ones it
    reads).  `key` identifies the heads in cache keys.
    """

    classes: tuple[str, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    model: str = ""
    dataset_sha256: str = ""

    def __post_init__(self) -> None:
        if self.mean.ndim != 2:
            raise ModelFileError(
                f"exit heads: mean has shape {tuple(self.mean.shape)}; it must be (exits, features)"
            )
        e, h = self.mean.shape
        c = len(self.classes)
        if self.weight.ndim != 3 or self.weight.shape[0] != e or self.weight.shape[2] not in (h, e * h):
            raise ModelFileError(
                f"exit heads: weight has shape {tuple(self.weight.shape)}; with {e} exits of {h} "
                f"features it must be ({e}, classes, {h}) or ({e}, classes, {e * h})"
            )
        # Broadcasting would accept a (C,) bias or an (H,) std and give every exit the same one.
        for label, tensor, want in (
            ("weight", self.weight, (e, c, self.weight.shape[2])),
            ("bias", self.bias, (e, c)),
            ("std", self.std, (e, h)),
        ):
            if tuple(tensor.shape) != want:
                raise ModelFileError(
                    f"exit heads: {label} has shape {tuple(tensor.shape)}; with {e} exits, {h} features "
                    f"and {c} classes it must be {want}"
                )

    @property
    def n_exits(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dense(self) -> bool:
        """Whether weights span every block's state (E·H columns) rather than one block's."""
        return self.n_exits > 1 and int(self.weight.shape[2]) == self.n_exits * int(self.mean.shape[1])

    def input_blocks(self, exit_index: int) -> tuple[int, ...]:
        """The blocks whose pooled states head `exit_index` reads, in order (always its own)."""
        if not self.dense:
            return (exit_index,)
        h = int(self.mean.shape[1])
        cols = self.weight[exit_index].reshape(self.weight.shape[1], self.n_exits, h)
        used = cols.abs().amax(dim=(0, 2)) > 0
        return tuple(j for j in range(self.n_exits) if bool(used[j]) or j == exit_index)

    @property
    def key(self) -> str:
        digest = hashlib.sha256()
        for t in (self.weight, self.bias, self.mean, self.std):
            digest.update(t.detach().contiguous().numpy().tobytes())
        digest.update(json.dumps(self.classes).encode())
        return digest.hexdigest()[:16]

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, E, H) pooled states of every block → (N, E, C) logits of every exit's head."""
        z = (pooled - self.mean) / self.std
        if self.dense:
            return torch.einsum("nk,eck->nec", z.reshape(z.shape[0], -1), self.weight) + self.bias
        return torch.einsum("neh,ech->nec", z, self.weight) + self.bias

    def folded(self, exit_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one plain Linear equal to standardise-then-classify, over the
        concatenated pooled states of `input_blocks(exit_index)` (the runtime's exit check)."""
        blocks = list(self.input_blocks(exit_index))
        h = int(self.mean.shape[1])
        if self.dense:
            w = torch.cat([self.weight[exit_index][:, j * h : (j + 1) * h] for j in blocks], dim=1)
        else:
            w = self.weight[exit_index]
        w = w / self.std[blocks].reshape(-1)
        b = self.bias[exit_index] - w @ self.mean[blocks].reshape(-1)
        return w.contiguous(), b.contiguous()

    def save(self, path: str | os.PathLike[str]) -> Path:
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "classes": json.dumps(list(self.classes)),
            "model": self.model,
            "dataset_sha256": self.dataset_sha256,
        }
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        with replacing(p) as tmp:  # a crash never leaves a half-written heads file behind
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExitHeads:
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise ModelFileError(f"exit heads file {p} is missing")
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in ("weight", "bias", "mean", "std")}
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise ModelFileError(f"exit heads file {p} is corrupt: {exc}") from exc
        if meta.get("format") != _FORMAT:
            raise ModelFileError(f"exit heads file {p} has format {meta.get('format')!r}, expected {_FORMAT}")
        try:
            classes = json.loads(meta["classes"])
        except (KeyError, ValueError) as exc:
            raise ModelFileError(
                f"exit heads file {p}: its classes metadata is missing or garbled ({exc})"
            ) from None
        if not isinstance(classes, list) or not all(isinstance(x, str) for x in classes):
            raise ModelFileError(f"exit heads file {p}: its classes metadata must be a list of names")
        try:
            return cls(
                classes=tuple(classes),
                model=meta.get("model", ""),
                dataset_sha256=meta.get("dataset_sha256", ""),
                **tensors,
            )
        except ModelFileError as exc:  # tensors of shapes that do not fit together
            raise ModelFileError(f"exit heads file {p}: {exc}") from None


def pooled_features(adapter: ModelAdapter, split: TokenizedSplit) -> torch.Tensor:
    """FP32 mean-pooled state after every block for every row, one pass: (N, E, H)."""
    outs = []
    with torch.inference_mode():
        for batch in split:
            outs.append(torch.stack(adapter.forward_exits(batch), dim=1))
    return split.unsort(outs).clone()


def _fit_logreg(
    x: torch.Tensor, target: torch.Tensor, l2: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent multinomial logistic regressions, one per exit, fitted jointly.

    `x` (E, N, H) features, `target` (E, N, C) distributions.  The objective is a sum of
    independent convex terms, so one L-BFGS run over all of them converges to the same optima
    as E separate runs, at 1/E of the Python overhead.
    """
    e, _, h = x.shape
    c = target.shape[-1]
    w = torch.zeros(e, c, h, requires_grad=True)
    b = torch.zeros(e, 1, c, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-7,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logp = F.log_softmax(torch.bmm(x, w.transpose(1, 2)) + b, dim=-1)
        loss = -(target * logp).sum(-1).mean(-1).sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().clone(), b.detach()[:, 0].clone()


def train_exit_heads(
    features: torch.Tensor,
    labels: Sequence[int],
    classes: Sequence[str],
    l2: float = 1e-2,
    distill: float = 1.0,
    max_iter: int = 100,
    dense: bool = True,
    exit_l2: float | None = None,
) -> ExitHeads:
    """Train every exit head on FP32 features (N, E, H) of the train split.

    `l2` regularises the task head, `exit_l2` (default: `l2`) the other exits' heads.

    Steps:
      1. standardise each block's features with its train mean / std;
      2. fit the last exit (task head) on the one-hot labels, from the last block alone;
      3. fit every other exit e on (1 - distill) · labels + distill · the task head's softmax
         (self-distillation), from blocks 0…e concatenated (`dense`) or block e alone; the
         dense fits run jointly on zero-masked copies of all blocks' features, and the masked
         columns — zero features, zero initial weights, so zero gradient — are set to exactly
         zero afterwards so no head ever reads a block after its own.
    L-BFGS from zero weights uses no randomness: the same features give the same heads.
    """
    x = features.detach().float()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    onehot = F.one_hot(y, len(classes)).float()
    rest_l2 = l2 if exit_l2 is None else exit_l2
    n, n_exits, h = z.shape
    zt = z.transpose(0, 1).contiguous()  # (E, N, H)
    with torch.enable_grad():
        w_last, b_last = _fit_logreg(zt[-1:], onehot[None], l2, max_iter)
        teacher = F.softmax(zt[-1] @ w_last[0].T + b_last[0], dim=-1)
        target = (1 - distill) * onehot + distill * teacher
        if n_exits > 1 and dense:
            # (E-1, E·H) column masks: head e reads blocks 0…e
            keep = (torch.arange(n_exits * h)[None] < (torch.arange(1, n_exits)[:, None] * h)).float()
            inputs = z.reshape(n, n_exits * h)[None] * keep[:, None, :]
            w_rest, b_rest = _fit_logreg(inputs, target.expand(n_exits - 1, -1, -1), rest_l2, max_iter)
            w_rest = w_rest * keep[:, None, :]
            w_task = torch.zeros(1, w_last.shape[1], n_exits * h)
            w_task[..., (n_exits - 1) * h :] = w_last
            weight, bias = torch.cat([w_rest, w_task]), torch.cat([b_rest, b_last])
        elif n_exits > 1:
            w_rest, b_rest = _fit_logreg(zt[:-1], target.expand(n_exits - 1, -1, -1), rest_l2, max_iter)
            weight, bias = torch.cat([w_rest, w_last]), torch.cat([b_rest, b_last])
        else:
            weight, bias = w_last, b_last
    return ExitHeads(
        classes=tuple(classes),
        weight=weight,
        bias=bias,
        mean=mean,
        std=std,
    )


#: Regularisation strengths `prepare_heads` chooses from (on the calibration split).
L2_GRID: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)


@dataclass(frozen=True)
class HeadsChoice:
    """The regularisation `select_heads` chose, with the calibration figure of every candidate:
    task head → NLL of the labels; exit heads → mean KL(task head ‖ exit head) over exits."""

    task_l2: float
    exit_l2: float
    task_nll: dict[float, float]
    exit_kl: dict[float, float]


def select_heads(
    train_features: torch.Tensor,
    train_labels: Sequence[int],
    calibration_features: torch.Tensor,
    calibration_labels: Sequence[int],
    classes: Sequence[str],
    grid: Sequence[float] = L2_GRID,
    distill: float = 1.0,
    dense: bool = True,
    max_iter: int = 100,
) -> tuple[ExitHeads, HeadsChoice]:
    """Train the heads with the regularisation that does best on the CALIBRATION split.

    Steps: (1) the task head alone (the last block's features) for every l2 of `grid`; keep
    the one with the lowest calibration NLL of the labels; (2) with that task head, every exit
    head for every l2 of `grid`; keep the set whose heads' distributions are closest to the task
    head's on calibration (mean KL).  Measured on the built-in task: the task head's calibration
    NLL is lowest at l2 = 0.03 (1.063, against 1.112 at the earlier fixed 0.01), and held-out
    accuracy went from 73.2 % to 74.0 %.
    """
    y_cal = torch.as_tensor(list(calibration_labels), dtype=torch.long)
    task_nll: dict[float, float] = {}
    for l2 in grid:
        head = train_exit_heads(train_features[:, -1:], train_labels, classes, l2=l2, max_iter=max_iter)
        task_nll[l2] = float(F.cross_entropy(head.logits(calibration_features[:, -1:])[:, -1], y_cal))
    task_l2 = min(grid, key=lambda v: (task_nll[v], v))
    if train_features.shape[1] == 1:
        heads = train_exit_heads(train_features, train_labels, classes, l2=task_l2, max_iter=max_iter)
        return heads, HeadsChoice(task_l2, task_l2, task_nll, {})
    exit_kl: dict[float, float] = {}
    trained: dict[float, ExitHeads] = {}
    for l2 in grid:
        trained[l2] = train_exit_heads(
            train_features, train_labels, classes, task_l2, distill, max_iter, dense, exit_l2=l2
        )
        logp = F.log_softmax(trained[l2].logits(calibration_features), dim=-1)
        teacher = logp[:, -1:].exp()
        exit_kl[l2] = float((teacher * (logp[:, -1:] - logp[:, :-1])).sum(-1).mean())
    exit_l2 = min(grid, key=lambda v: (exit_kl[v], v))
    return trained[exit_l2], HeadsChoice(task_l2, exit_l2, task_nll, exit_kl)


def _cached_features(
    adapter: ModelAdapter, dataset: TextDataset, split: str, length: int, root: Path
) -> torch.Tensor:
    """FP32 pooled features of `split` (one pass), cached by model, data and length: retraining
    with other settings reuses them.  A damaged file is recomputed, never trusted."""
    from safetensors.torch import load_file, save_file

    feat_key = hashlib.sha256(f"{adapter.fingerprint}|{dataset.sha256}|L{length}".encode()).hexdigest()[:20]
    feat_path = root / "features" / f"{feat_key}-{split}.safetensors"
    if feat_path.is_file():
        try:
            cached: torch.Tensor = load_file(str(feat_path))["pooled"]
            return cached
        except Exception:  # safetensors raises several types on a damaged file; recompute
            feat_path.unlink(missing_ok=True)  # another worker may have removed it first
    feats = pooled_features(adapter, TokenizedSplit.build(adapter, dataset.split(split).texts, length))
    feat_path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(feat_path, ".tmp.safetensors") as tmp:  # workers share the cache directory
        save_file({"pooled": feats.contiguous()}, str(tmp))
    return feats


def prepare_heads(
    adapter: ModelAdapter,
    dataset: TextDataset,
    data_dir: str | os.PathLike[str] | None = None,
    max_length: int | None = None,
    l2: float | None = None,
    distill: float = 1.0,
    dense: bool = True,
) -> ExitHeads:
    """Load the trained heads for (model, dataset, settings) from `data_dir`, or train and save them.

    Steps: compute the key from the model fingerprint, dataset hash and settings; load
    ``heads/<key>.safetensors`` if present; else compute the FP32 train (and calibration)
    features in one pass each (cached under ``features/``), train — with `l2` for every head,
    or, when `l2` is None, with the regularisation `select_heads` chooses on the calibration
    split — and save atomically.  A damaged cache file is recomputed, never trusted.
    """
    root = engine_data_dir(data_dir)
    length = max_length or int(getattr(adapter, "max_length", 128))
    chosen = f"l2={l2}" if l2 is not None else f"l2=calibration-of-{','.join(map(str, L2_GRID))}"
    settings = f"{adapter.fingerprint}|{dataset.sha256}|L{length}|{chosen}|d={distill}" + (
        "|dense" if dense else ""
    )
    key = hashlib.sha256(settings.encode()).hexdigest()[:20]
    heads_path = root / "heads" / f"{key}.safetensors"
    if heads_path.is_file():
        try:
            return ExitHeads.load(heads_path)
        except ModelFileError:
            heads_path.unlink(missing_ok=True)  # a damaged cache entry: training is deterministic, redo it
    train = dataset.split("train")
    feats = _cached_features(adapter, dataset, "train", length, root)
    if l2 is not None:
        heads = train_exit_heads(feats, train.labels, dataset.classes, l2=l2, distill=distill, dense=dense)
    else:
        cal = _cached_features(adapter, dataset, "calibration", length, root)
        heads, _ = select_heads(
            feats,
            train.labels,
            cal,
            dataset.split("calibration").labels,
            dataset.classes,
            distill=distill,
            dense=dense,
        )
    heads = ExitHeads(
        classes=heads.classes,
        weight=heads.weight,
        bias=heads.bias,
        mean=heads.mean,
        std=heads.std,
        model=adapter.fingerprint,
        dataset_sha256=dataset.sha256,
    )
    heads.save(heads_path)

    return heads
