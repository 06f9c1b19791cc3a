"""Exit heads and threshold curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from planner.data import TextDataset
from planner.exits import (
    L2_GRID,
    ExitHeads,
    choose_threshold,
    pooled_features,
    prepare_heads,
    select_heads,
    threshold_curve,
    threshold_for_layers,
    train_exit_heads,
    worst_of,
)
from planner.models import ModelFileError, TinyAdapter, TokenizedSplit

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits_from_probs(p: list[list[list[float]]]) -> np.ndarray:
    return np.log(np.asarray(p, dtype=np.float64))


# Three examples, three exits, two classes.  Confidences per exit:
#   ex0: 0.9, 0.6, 0.7   ex1: 0.55, 0.8, 0.95   ex2: 0.6, 0.65, 0.99
_HAND = _logits_from_probs(
    [
        [[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]],
        [[0.55, 0.45], [0.2, 0.8], [0.05, 0.95]],
        [[0.6, 0.4], [0.65, 0.35], [0.99, 0.01]],
    ]
)


def test_curve_stops_at_first_confident_exit() -> None:
    labels = [0, 1, 0]
    reference = [1, 1, 0]  # final predictions of the FP32 model
    curve = threshold_curve(_HAND, labels, reference, thresholds=[0.5, 0.75, 0.85, 0.999])
    # t=0.5: all stop at exit 0 → preds 0,0,0
    assert curve.mean_layers[0] == 1.0
    assert curve.accuracy[0] == pytest.approx(2 / 3)
    # t=0.75: ex0 exit0 (pred 0), ex1 exit1 (pred 1), ex2 exit2 (pred 0)
    assert curve.mean_layers[1] == pytest.approx((1 + 2 + 3) / 3)
    assert curve.accuracy[1] == 1.0
    assert curve.agreement[1] == pytest.approx(2 / 3)
    np.testing.assert_allclose(curve.exit_fraction[1], [1 / 3, 1 / 3, 1 / 3])
    # t=0.999: nobody confident → last exit
    assert curve.mean_layers[3] == 3.0
    assert curve.accuracy[3] == curve.full_accuracy == pytest.approx(2 / 3)
    assert curve.agreement[3] == curve.full_agreement == 1.0
    np.testing.assert_allclose(curve.exit_fraction.sum(1), 1.0)


def test_vectorised_curve_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4, 5)) * 3
    labels = rng.integers(0, 5, 200)
    ref = logits[:, -1].argmax(-1)
    ts = np.linspace(0.2, 0.99, 17)
    curve = threshold_curve(logits, labels, ref, thresholds=ts)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for k, t in enumerate(ts):
        correct, layers = 0, 0
        for n in range(200):
            e = next((i for i in range(4) if probs[n, i].max() >= t), 3)
            correct += int(probs[n, e].argmax() == labels[n])
            layers += e + 1
        assert curve.accuracy[k] == pytest.approx(correct / 200)
        assert curve.mean_layers[k] == pytest.approx(layers / 200)


def test_whole_curve_covers_the_default_grid() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 6, 10)).astype(np.float32) * 4
    labels = rng.integers(0, 10, 500)
    curve = threshold_curve(logits, labels, labels)
    assert len(curve.thresholds) >= 50
    assert curve.exit_fraction.shape == (len(curve.thresholds), 6)


def test_choose_threshold_takes_cheapest_within_bound() -> None:
    labels, reference = [0, 1, 0], [1, 1, 0]
    curve = threshold_curve(_HAND, labels, reference, thresholds=[0.5, 0.75, 0.85, 0.999])
    # Without exit accuracy is 2/3; t=0.5 keeps 2/3 at 1 layer: cheapest, no loss.
    assert choose_threshold(curve, 0.0) == 0.5
    # Agreement: full 1.0, t=0.5 → 1/3 (−66.7 pts), t=0.75 → 2/3, t=0.85 → ?
    chosen = choose_threshold(curve, 40.0, metric="agreement")
    assert chosen is not None
    i = list(curve.thresholds).index(chosen)
    assert (curve.full_agreement - curve.agreement[i]) * 100 <= 40.0
    assert choose_threshold(curve, 0.0, metric="agreement") is None
    with pytest.raises(ValueError):
        choose_threshold(curve, 1.0, metric="f1")


def test_threshold_for_layers_takes_the_most_faithful_within_the_budget() -> None:
    labels, reference = [0, 1, 0], [1, 1, 0]
    curve = threshold_curve(_HAND, labels, reference, thresholds=[0.5, 0.75, 0.85, 0.999])
    # Agreement per threshold: 1/3 (1 layer), 2/3 (2 layers), 2/3 (7/3 layers), 1 (3 layers).
    assert threshold_for_layers(curve, 2.5, 100.0) == 0.75  # 2/3 twice: the fewer layers
    assert threshold_for_layers(curve, 1.0, 100.0) == 0.5
    assert threshold_for_layers(curve, 3.0, 100.0) == 0.999
    assert threshold_for_layers(curve, 2.5, 100.0, min_agreement=0.9) is None
    assert threshold_for_layers(curve, 0.5, 100.0) is None
    # Accuracy: 2/3 without exit; 2/3, 1, 1, 2/3 at the thresholds: none loses any.
    assert threshold_for_layers(curve, 2.5, 0.0) == 0.75
    # Labels = FP32 answers: accuracy 1 without exit, 1/3 and 2/3 at t = 0.5 and 0.75.
    strict = threshold_curve(_HAND, reference, reference, thresholds=[0.5, 0.75, 0.85, 0.999])
    assert threshold_for_layers(strict, 2.5, 40.0) == 0.75
    assert threshold_for_layers(strict, 2.5, 10.0) is None


def test_worst_of_takes_per_threshold_the_lower_figures_and_the_costlier_exit() -> None:
    grid = [0.5, 0.75, 0.85, 0.999]
    labels, reference = [0, 1, 0], [1, 1, 0]
    a = threshold_curve(_HAND, labels, reference, thresholds=grid)
    # The same plan measured another way: every confidence a little lower (later exits).
    b = threshold_curve(_HAND * 0.7, labels, reference, thresholds=grid)
    w = worst_of(a, b)
    np.testing.assert_array_equal(w.agreement, np.minimum(a.agreement, b.agreement))
    np.testing.assert_array_equal(w.accuracy, np.minimum(a.accuracy, b.accuracy))
    np.testing.assert_array_equal(w.mean_layers, np.maximum(a.mean_layers, b.mean_layers))
    for t in range(len(grid)):
        costlier = a if a.mean_layers[t] >= b.mean_layers[t] else b
        np.testing.assert_array_equal(w.exit_fraction[t], costlier.exit_fraction[t])
    assert w.full_agreement == min(a.full_agreement, b.full_agreement)
    assert not np.array_equal(a.mean_layers, b.mean_layers)  # the two really differ
    assert worst_of(a).agreement.tolist() == a.agreement.tolist()
    with pytest.raises(ValueError, match="same thresholds"):
        worst_of(a, threshold_curve(_HAND, labels, reference, thresholds=[0.5]))
    with pytest.raises(ValueError):
        worst_of()


def test_choose_threshold_honours_an_agreement_floor() -> None:
    labels, reference = [0, 1, 0], [1, 1, 0]
    curve = threshold_curve(_HAND, labels, reference, thresholds=[0.5, 0.75, 0.85, 0.999])
    # Agreement per threshold: 1/3 (1 layer), 2/3 (2 layers), 2/3 (7/3 layers), 1 (3 layers).
    assert choose_threshold(curve, 100.0) == 0.5
    assert choose_threshold(curve, 100.0, min_agreement=0.6) == 0.75
    # Only full depth keeps agreement at 1: nothing is saved, so no threshold.
    assert choose_threshold(curve, 100.0, min_agreement=1.0) is None


def test_curve_round_trips_through_dict() -> None:
    curve = threshold_curve(_HAND, [0, 1, 0], [1, 1, 0])
    again = type(curve).from_dict(curve.to_dict())
    np.testing.assert_allclose(again.accuracy, curve.accuracy)
    assert again.n_blocks == 3
    assert curve.at(None)["mean_layers"] == 3.0


def test_heads_learn_the_tiny_task(tiny_adapter: TinyAdapter, tiny_dataset: TextDataset) -> None:
    train = tiny_dataset.split("train")
    feats = pooled_features(tiny_adapter, TokenizedSplit.build(tiny_adapter, train.texts, 32))
    assert feats.shape == (len(train), 2, 32)
    heads = train_exit_heads(feats, train.labels, tiny_dataset.classes)
    acc = (heads.logits(feats).argmax(-1) == torch.as_tensor(train.labels)[:, None]).float().mean(0)
    assert (acc > 0.6).all(), acc  # chance is 1/3
    again = train_exit_heads(feats, train.labels, tiny_dataset.classes)
    assert torch.equal(again.weight, heads.weight)  # deterministic


def test_folded_head_equals_standardise_then_classify(tiny_heads: ExitHeads) -> None:
    x = torch.randn(7, tiny_heads.n_exits, tiny_heads.mean.shape[-1])
    w, b = tiny_heads.folded(1)
    torch.testing.assert_close(x[:, 1] @ w.T + b, tiny_heads.logits(x)[:, 1], atol=1e-4, rtol=1e-4)


def _three_block_features(n: int = 120, h: int = 8) -> tuple[torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(n, 3, h, generator=gen)
    labels = ((feats[:, 0, 0] > 0).long() + (feats[:, 1, 1] > 0).long()).tolist()  # 3 classes
    return feats, labels


def test_dense_heads_read_every_block_up_to_their_exit_and_none_after() -> None:
    feats, labels = _three_block_features()
    heads = train_exit_heads(feats, labels, ["a", "b", "c"])
    assert heads.dense and heads.weight.shape == (3, 3, 3 * 8)
    # the task head (last exit) reads its own block only; the others every block up to theirs
    assert [heads.input_blocks(e) for e in range(3)] == [(0,), (0, 1), (2,)]
    base = heads.logits(feats)
    later = feats.clone()
    later[:, 2] += 5.0  # block 2 changes: exits 0 and 1 must not move
    torch.testing.assert_close(heads.logits(later)[:, :2], base[:, :2], rtol=0, atol=0)
    middle = feats.clone()
    middle[:, 1] += 5.0  # block 1 changes: exit 0 must not move, exit 1 must
    moved = heads.logits(middle)
    torch.testing.assert_close(moved[:, 0], base[:, 0], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 1], base[:, 1])
    # the folded Linear over the concatenated states it reads is the same head
    for e in range(3):
        w, b = heads.folded(e)
        x = torch.cat([feats[:, j] for j in heads.input_blocks(e)], dim=-1)
        torch.testing.assert_close(x @ w.T + b, base[:, e], atol=1e-4, rtol=1e-4)


def test_dense_heads_agree_more_with_the_task_head_than_one_block_heads() -> None:
    # Block 1's own state hides what block 0 knew (the label needs both): a head reading blocks
    # 0 and 1 can follow the task head, one reading block 1 alone cannot.
    feats, labels = _three_block_features(n=400)
    feats[:, 2, :2] = feats[:, 0, :1].sign() + feats[:, 1, 1:2].sign()  # the last block knows
    dense = train_exit_heads(feats, labels, ["a", "b", "c"])
    single = train_exit_heads(feats, labels, ["a", "b", "c"], dense=False)
    assert not single.dense and single.weight.shape == (3, 3, 8)
    assert [single.input_blocks(e) for e in range(3)] == [(0,), (1,), (2,)]
    teacher = dense.logits(feats)[:, -1].argmax(-1)
    agree_dense = (dense.logits(feats)[:, 1].argmax(-1) == teacher).float().mean()
    agree_single = (single.logits(feats)[:, 1].argmax(-1) == teacher).float().mean()
    assert agree_dense > agree_single + 0.1, (agree_dense, agree_single)
    # the task heads are the same fit either way
    torch.testing.assert_close(dense.logits(feats)[:, -1], single.logits(feats)[:, -1])


def test_heads_with_a_weight_of_the_wrong_width_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"must be \(2, classes, 4\) or \(2, classes, 8\)"):
        ExitHeads(("a",), torch.zeros(2, 1, 5), torch.zeros(2, 1), torch.zeros(2, 4), torch.ones(2, 4))
    # a heads file whose tensors do not fit together names the file and the rule
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    tensors = {"weight": torch.zeros(2, 1, 5), "bias": torch.zeros(2, 1), "mean": torch.zeros(2, 4)}
    save_file(
        {**tensors, "std": torch.ones(2, 4)},
        str(path),
        metadata={"format": "edgefit-exit-heads/1", "classes": '["a"]'},
    )
    with pytest.raises(ModelFileError, match=r"odd\.safetensors.*must be \(2, classes, 4\)"):
        ExitHeads.load(path)


def test_heads_whose_bias_std_or_classes_do_not_fit_are_refused_not_broadcast(tmp_path: Path) -> None:
    w, b, mean, std = torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 4)
    classes = ("a", "b", "c")
    ExitHeads(classes, w, b, mean, std)  # fits
    with pytest.raises(ModelFileError, match=r"bias has shape \(3,\).* must be \(2, 3\)"):
        ExitHeads(classes, w, torch.zeros(3), mean, std)
    with pytest.raises(ModelFileError, match=r"std has shape \(4,\).* must be \(2, 4\)"):
        ExitHeads(classes, w, b, mean, torch.ones(4))
    with pytest.raises(ModelFileError, match=r"weight has shape \(2, 3, 4\).*2 classes"):
        ExitHeads(("a", "b"), w, b, mean, std)
    with pytest.raises(ModelFileError, match=r"mean has shape \(4,\)"):
        ExitHeads(classes, w, b, torch.zeros(4), std)
    # in a file: the error names it; missing classes metadata too
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    tensors = {"weight": w, "bias": b, "mean": torch.zeros(4), "std": std}
    save_file(tensors, str(path), metadata={"format": "edgefit-exit-heads/1", "classes": '["a", "b", "c"]'})
    with pytest.raises(ModelFileError, match=r"bad\.safetensors: exit heads: mean has shape"):
        ExitHeads.load(path)
    save_file({**tensors, "mean": mean}, str(path), metadata={"format": "edgefit-exit-heads/1"})
    with pytest.raises(ModelFileError, match=r"bad\.safetensors: its classes metadata is missing"):
        ExitHeads.load(path)


def test_heads_save_and_load(tiny_heads: ExitHeads, tmp_path: Path) -> None:
    path = tiny_heads.save(tmp_path / "h.safetensors")
    loaded = ExitHeads.load(path)
    assert loaded.classes == tiny_heads.classes
    assert loaded.key == tiny_heads.key
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ModelFileError, match=r"h\.safetensors"):
        ExitHeads.load(path)
    with pytest.raises(ModelFileError, match="missing"):
        ExitHeads.load(tmp_path / "absent.safetensors")


def test_prepare_heads_trains_once_then_loads(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tmp_path: Path
) -> None:
    first = prepare_heads(tiny_adapter, tiny_dataset, data_dir=tmp_path)
    files = sorted((tmp_path / "heads").glob("*.safetensors"))
    assert len(files) == 1
    assert (tmp_path / "features").is_dir()
    second = prepare_heads(tiny_adapter, tiny_dataset, data_dir=tmp_path)
    assert second.key == first.key
    assert second.model == tiny_adapter.fingerprint
    assert second.dataset_sha256 == tiny_dataset.sha256


def test_engine_dir_comes_from_env(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFIT_DATA_DIR", str(tmp_path / "env-dir"))
    prepare_heads(tiny_adapter, tiny_dataset)
    assert list((tmp_path / "env-dir" / "heads").glob("*.safetensors"))


def test_prepare_heads_recovers_from_damaged_cache_files(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tmp_path: Path
) -> None:
    first = prepare_heads(tiny_adapter, tiny_dataset, data_dir=tmp_path)
    for f in [*(tmp_path / "heads").glob("*"), *(tmp_path / "features").glob("*")]:
        f.write_bytes(b"garbage")
    again = prepare_heads(tiny_adapter, tiny_dataset, data_dir=tmp_path)
    assert again.key == first.key


def test_regularisation_is_chosen_on_the_calibration_split(
    tiny_adapter: TinyAdapter, tiny_dataset: TextDataset, tmp_path: Path
) -> None:
    feats = {
        split: pooled_features(
            tiny_adapter, TokenizedSplit.build(tiny_adapter, tiny_dataset.split(split).texts, 32)
        )
        for split in ("train", "calibration")
    }
    labels = {split: tiny_dataset.split(split).labels for split in feats}
    heads, choice = select_heads(
        feats["train"], labels["train"], feats["calibration"], labels["calibration"], tiny_dataset.classes
    )
    assert set(choice.task_nll) == set(choice.exit_kl) == set(L2_GRID)
    assert choice.task_l2 == min(L2_GRID, key=lambda v: choice.task_nll[v])
    assert choice.exit_l2 == min(L2_GRID, key=lambda v: choice.exit_kl[v])
    same = train_exit_heads(
        feats["train"], labels["train"], tiny_dataset.classes, l2=choice.task_l2, exit_l2=choice.exit_l2
    )
    assert same.key == heads.key
    # prepare_heads without an l2 trains exactly these, and keeps them apart from fixed-l2 heads.
    chosen = prepare_heads(tiny_adapter, tiny_dataset, data_dir=tmp_path, max_length=32)
    prepare_heads(tiny_adapter, tiny_dataset, data_dir=tmp_path, max_length=32, l2=0.01)
    assert chosen.key == heads.key
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 2
