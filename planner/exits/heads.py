"""Exit heads: one linear classifier after every block, over the block's mean-pooled state.

The last block's head is the model's task head.  Heads are multinomial logistic regressions on
standardised FP32 features, trained full-batch with L-BFGS; intermediate heads are trained by
self-distillation (a mix of the labels and the task head's predicted distribution), so that
their confident answers agree with what the full model would have said.
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
from planner.models.base import ModelAdapter, ModelFileError, TokenizedSplit

__all__ = ["ExitHeads", "pooled_features", "prepare_heads", "train_exit_heads"]

_FORMAT = "edgefit-exit-heads/1"


@dataclass(frozen=True)
class ExitHeads:
    """Per-exit standardisation + linear layer; tensors indexed (exit, ...).

    weight (E, C, H), bias (E, C), mean (E, H), std (E, H).  `key` identifies the heads in cache keys.
    """

    classes: tuple[str, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    model: str = ""
    dataset_sha256: str = ""

    @property
    def n_exits(self) -> int:
        return int(self.weight.shape[0])

    @property
    def key(self) -> str:
        digest = hashlib.sha256()
        for t in (self.weight, self.bias, self.mean, self.std):
            digest.update(t.detach().contiguous().numpy().tobytes())
        digest.update(json.dumps(self.classes).encode())
        return digest.hexdigest()[:16]

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, E, H) pooled features → (N, E, C) logits, each exit with its own head."""
        z = (pooled - self.mean) / self.std
        return torch.einsum("neh,ech->nec", z, self.weight) + self.bias

    def folded(self, exit_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one plain Linear equal to standardise-then-classify (for packaging)."""
        w = self.weight[exit_index] / self.std[exit_index]
        b = self.bias[exit_index] - w @ self.mean[exit_index]
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
        tmp = p.with_suffix(p.suffix + ".tmp")
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(p)  # atomic: a crash never leaves a half-written heads file behind
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
        return cls(
            classes=tuple(json.loads(meta["classes"])),
            model=meta.get("model", ""),
            dataset_sha256=meta.get("dataset_sha256", ""),
            **tensors,
        )


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
    distill: float = 0.5,
    max_iter: int = 50,
) -> ExitHeads:
    """Train every exit head on FP32 features (N, E, H) of the train split.

    Steps:
      1. standardise each exit's features with its train mean / std;
      2. fit the last exit (task head) on the one-hot labels;
      3. fit every other exit on (1 - distill) · labels + distill · the task head's softmax
         (self-distillation);
    L-BFGS from zero weights uses no randomness: the same features give the same heads.
    """
    x = features.detach().float()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    onehot = F.one_hot(y, len(classes)).float()
    n_exits = x.shape[1]
    zt = z.transpose(0, 1).contiguous()  # (E, N, H)
    with torch.enable_grad():
        w_last, b_last = _fit_logreg(zt[-1:], onehot[None], l2, max_iter)
        teacher = F.softmax(zt[-1] @ w_last[0].T + b_last[0], dim=-1)
        target = (1 - distill) * onehot + distill * teacher
        if n_exits > 1:
            w_rest, b_rest = _fit_logreg(zt[:-1], target.expand(n_exits - 1, -1, -1), l2, max_iter)
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


def prepare_heads(
    adapter: ModelAdapter,
    dataset: TextDataset,
    data_dir: str | os.PathLike[str] | None = None,
    max_length: int | None = None,
    l2: float = 1e-2,
    distill: float = 0.5,
) -> ExitHeads:
    """Load the trained heads for (model, dataset, settings) from `data_dir`, or train and save them.

    Steps: compute the key from the model fingerprint, dataset hash and settings; load
    ``heads/<key>.safetensors`` if present; else compute the FP32 train features in one pass
    (cached as ``features/<key>-train.safetensors``), train, save atomically.  A damaged cache
    file is recomputed, never trusted.
    """
    from safetensors.torch import load_file, save_file

    root = engine_data_dir(data_dir)
    length = max_length or int(getattr(adapter, "max_length", 128))
    settings = f"{adapter.fingerprint}|{dataset.sha256}|L{length}|l2={l2}|d={distill}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:20]
    heads_path = root / "heads" / f"{key}.safetensors"
    if heads_path.is_file():
        try:
            return ExitHeads.load(heads_path)
        except ModelFileError:
            heads_path.unlink()  # a damaged cache entry: training is deterministic, redo it
    # Features depend only on model, data and length: retraining with other settings reuses them.
    feat_key = hashlib.sha256(f"{adapter.fingerprint}|{dataset.sha256}|L{length}".encode()).hexdigest()[:20]
    feat_path = root / "features" / f"{feat_key}-train.safetensors"
    train = dataset.split("train")
    feats: torch.Tensor | None = None
    if feat_path.is_file():
        try:
            feats = load_file(str(feat_path))["pooled"]
        except Exception:  # safetensors raises several types on a damaged file; recompute
            feat_path.unlink()
    if feats is None:
        feats = pooled_features(adapter, TokenizedSplit.build(adapter, train.texts, length))
        feat_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"pooled": feats.contiguous()}, str(feat_path))
    heads = train_exit_heads(feats, train.labels, dataset.classes, l2=l2, distill=distill)
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
