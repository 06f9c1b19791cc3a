"""Signed packages: exact sizes, determinism, atomic content-addressed layout, verification
before loading, and a loaded package that runs like the model it came from."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from planner import package as pkg
from planner.builtin import Bundle, load_bundle
from planner.package import PackageError, build_package, load_package, verify_package
from planner.quant import quantize_plan, read_packed_safetensors
from planner.runtime import (
    KERNEL_DEQUANT_AT_LOAD,
    KERNEL_W8A8,
    KERNEL_W8A8_FROM_INT4,
    KERNEL_W8A8_FUSED,
    KERNEL_W8A16_FUSED,
    EarlyExitRunner,
    build_runtime_model,
)
from planner.specs import Plan, PlanError, TensorScheme

KEY = "11" * 32
OTHER_KEY = "22" * 32
PUBLIC = pkg.public_key_hex(KEY)


@pytest.fixture(scope="session")
def bundle(engine_dir: Path) -> Bundle:
    return load_bundle("tiny-topics", data_dir=engine_dir)


def _uniform(bundle: Bundle, scheme: TensorScheme, threshold: float | None = None) -> Plan:
    return Plan.uniform(bundle.adapter.spec(), scheme, threshold)


def _mixed(bundle: Bundle) -> Plan:
    """int4 g32 attention, int8 asymmetric FFN, int3 embeddings (the word table with 16 int8
    hot rows, the token-type table fp16), GPTQ on the FFN input."""
    schemes = {}
    for t in bundle.adapter.spec().tensors:
        if t.kind == "embedding":
            if "token_type" in t.name:
                schemes[t.name] = TensorScheme("fp16")
            else:
                schemes[t.name] = TensorScheme("int3", hot_rows=16 if "word" in t.name else 0)
        elif "intermediate" in t.name:
            schemes[t.name] = TensorScheme("int4", 32, True, "gptq")
        elif "attention" in t.name:
            schemes[t.name] = TensorScheme("int4", 32)
        else:
            schemes[t.name] = TensorScheme("int8", None, False)
    return Plan.build(schemes, exit_threshold=0.7)


@pytest.fixture(scope="session")
def built(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> pkg.PackageInfo:
    root = tmp_path_factory.mktemp("packages")
    return build_package(bundle, _mixed(bundle), root, signing_key=KEY, predicted=_PREDICTED)


_PREDICTED = {"pixel-9": {"latency_ms": 12.5, "memory_bytes": 1234567, "cost_model_version": "roofline-4"}}


def _copy(info: pkg.PackageInfo, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in pkg.FILE_NAMES:
        (dest / name).write_bytes(info.file(name).read_bytes())
    return dest


# --------------------------------------------------------------------------- build


def test_the_same_plan_gives_the_same_bytes_and_digest(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _mixed(bundle)
    a = build_package(bundle, plan, tmp_path / "a", signing_key=KEY, predicted=_PREDICTED)
    # The second build must not reuse the first's check-set answers (kept under the engine's
    # cache dir): with a fresh one it recomputes them, so non-deterministic answers would show.
    fresh = tmp_path / "fresh-cache"
    fresh.mkdir()
    monkeypatch.setattr(type(bundle.evaluator), "cache_dir", property(lambda self: fresh))
    b = build_package(bundle, plan, tmp_path / "b", signing_key=KEY, predicted=_PREDICTED)
    assert any((fresh / "check_sets").iterdir())  # the answers were recomputed
    assert a.digest == b.digest
    for name in pkg.FILE_NAMES:
        assert a.file(name).read_bytes() == b.file(name).read_bytes()
    assert a.digest == hashlib.sha256(a.file(pkg.MANIFEST_NAME).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "make",
    [
        lambda b: Plan(),
        lambda b: _uniform(b, TensorScheme("fp16")),
        lambda b: _uniform(b, TensorScheme("int8")),
        lambda b: _uniform(b, TensorScheme("int4", 32)),
        lambda b: _uniform(b, TensorScheme("int3", None, False), 0.8),
        lambda b: _uniform(b, TensorScheme("int2", 32)),
        _mixed,
    ],
    ids=["fp32", "fp16", "int8", "int4-g32", "int3-asym-exit", "int2-g32", "mixed-gptq"],
)
def test_predicted_bytes_equal_the_file_size(
    bundle: Bundle, tmp_path: Path, make: Callable[[Bundle], Plan]
) -> None:
    plan = make(bundle)
    info = build_package(bundle, plan, tmp_path, signing_key=KEY)
    size = os.path.getsize(info.file(pkg.BLOB_NAME))
    assert size == info.blob_bytes == info.predicted_bytes == pkg.predict_bundle_package_bytes(bundle, plan)
    spec = bundle.adapter.spec()
    n, length = min(64, len(bundle.dataset.split("test"))), bundle.evaluator.max_length
    assert size == pkg.predict_package_bytes(
        spec,
        plan,
        n_classes=len(bundle.heads.classes),
        check_examples=n,
        check_seq_len=length,
        head_width=int(bundle.heads.weight.shape[2]),
    )


def test_the_blob_follows_the_packing_conventions(bundle: Bundle, built: pkg.PackageInfo) -> None:
    """read_packed_safetensors reads the weights back bit-exactly (codes, scales, zeros, values)."""
    plan = Plan.from_dict(built.manifest["plan"])
    spec = bundle.adapter.spec()
    expected = quantize_plan(bundle.adapter.module, spec, plan, bundle.evaluator.calibration_inputs())
    got, _ = read_packed_safetensors(built.file(pkg.BLOB_NAME))
    assert set(got) == set(spec.tensor_names)
    for name, qt in expected.items():
        for field in ("codes", "scales", "zeros", "values"):
            a, b = getattr(qt, field), getattr(got[name], field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                assert torch.equal(a, b), (name, field)
        assert got[name].method == qt.method


def test_the_manifest_is_canonical_signed_and_complete(bundle: Bundle, built: pkg.PackageInfo) -> None:
    raw = built.file(pkg.MANIFEST_NAME).read_bytes()
    manifest = json.loads(raw)
    assert raw == pkg.canonical_json(manifest)
    assert manifest["format"] == pkg.PACKAGE_FORMAT
    assert manifest["model"]["name"] == "tiny-topics"
    assert manifest["model"]["architecture"]["type"] == "bert"
    assert manifest["plan"] == _mixed(bundle).to_dict()
    assert manifest["exit_threshold"] == 0.7
    assert sum(manifest["precision_summary"].values()) == len(bundle.adapter.spec().tensors)
    assert manifest["precision_summary"] == {"fp16": 1, "int3": 2, "int4": 10, "int8": 2}
    assert manifest["predicted"]["pixel-9"]["kind"] == "predicted"
    blob = built.file(pkg.BLOB_NAME).read_bytes()
    assert manifest["files"][pkg.BLOB_NAME] == {
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
    }
    assert manifest["check_set"]["n"] == 24 and manifest["check_set"]["split"] == "test"
    assert manifest["check_set"]["dataset_sha256"] == bundle.dataset.sha256
    assert not re.search(r"\d{4}-\d{2}-\d{2}|_at\b|timestamp", raw.decode())  # no timestamps
    assert manifest["created_from"] == _mixed(bundle).hash()
    signature = built.file(pkg.SIGNATURE_NAME).read_bytes()
    assert len(signature) == 64 and signature.hex() == built.signature_hex
    info = pkg.signing_key_info(KEY)
    assert info == {"algorithm": "ed25519", "public_key": PUBLIC, "key_id": built.key_id}
    assert built.key_id == hashlib.sha256(bytes.fromhex(PUBLIC)).hexdigest()[:16]


def test_packages_are_content_addressed_and_nothing_else_is_left(bundle: Bundle, tmp_path: Path) -> None:
    a = build_package(bundle, _uniform(bundle, TensorScheme("int8")), tmp_path, signing_key=KEY)
    again = build_package(bundle, _uniform(bundle, TensorScheme("int8")), tmp_path, signing_key=KEY)
    b = build_package(bundle, _uniform(bundle, TensorScheme("int4", 32)), tmp_path, signing_key=KEY)
    assert a.created and not again.created and again.digest == a.digest
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.digest, b.digest])
    assert sorted(p.name for p in a.path.iterdir()) == sorted(pkg.FILE_NAMES)


def test_a_rebuild_after_a_key_rotation_carries_the_new_signature(bundle: Bundle, tmp_path: Path) -> None:
    plan = _uniform(bundle, TensorScheme("int8"))
    old = build_package(bundle, plan, tmp_path, signing_key=KEY)
    new = build_package(bundle, plan, tmp_path, signing_key=OTHER_KEY)
    assert not new.created and new.digest == old.digest  # the manifest names no key
    assert (new.path / pkg.SIGNATURE_NAME).read_bytes().hex() == new.signature_hex != old.signature_hex
    verify_package(new.path, pkg.public_key_hex(OTHER_KEY))
    with pytest.raises(PackageError, match="signature"):
        verify_package(new.path, PUBLIC)
    assert sorted(p.name for p in new.path.iterdir()) == sorted(pkg.FILE_NAMES)


@pytest.mark.parametrize(
    ("schemes", "message"),
    [
        (
            {"encoder.layer.9.output.dense.weight": TensorScheme("int8")},
            "encoder.layer.9.output.dense.weight",
        ),
        (
            {"encoder.layer.0.attention.self.query.weight": TensorScheme("int4", 64)},
            "attention.self.query.weight",
        ),
    ],
    ids=["unknown-tensor", "group-size"],
)
def test_a_bad_plan_names_the_tensor_and_writes_nothing(
    bundle: Bundle, tmp_path: Path, schemes: dict[str, TensorScheme], message: str
) -> None:
    with pytest.raises(PlanError, match=message.replace(".", r"\.")):
        build_package(bundle, Plan.build(schemes), tmp_path / "root", signing_key=KEY)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())


def test_an_unsupported_precision_is_refused_by_the_plan() -> None:
    with pytest.raises(PlanError, match="int5"):
        Plan.from_dict({"schemes": {"embeddings.word_embeddings.weight": {"precision": "int5"}}})


def test_a_bad_signing_key_is_refused_before_any_work(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="64 hexadecimal"):
        build_package(bundle, Plan(), tmp_path, signing_key="abc")
    assert not any(tmp_path.iterdir())


def test_a_failure_while_writing_leaves_nothing_behind(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(path: Path, data: bytes) -> None:
        raise OSError(f"disk full writing {path.name}")

    monkeypatch.setattr(pkg, "_write_file", boom)
    with pytest.raises(OSError, match="disk full"):
        build_package(bundle, _uniform(bundle, TensorScheme("int8")), tmp_path, signing_key=KEY)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- verify


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _tamper_blob(d: Path) -> None:
    _flip(d / pkg.BLOB_NAME, os.path.getsize(d / pkg.BLOB_NAME) // 2)


def _truncate_blob(d: Path) -> None:
    blob = d / pkg.BLOB_NAME
    blob.write_bytes(blob.read_bytes()[:-1])


def _tamper_manifest(d: Path) -> None:
    _flip(d / pkg.MANIFEST_NAME, 40)


def _resign(d: Path, manifest: dict[str, object] | bytes) -> None:
    raw = manifest if isinstance(manifest, bytes) else pkg.canonical_json(manifest)
    (d / pkg.MANIFEST_NAME).write_bytes(raw)
    (d / pkg.SIGNATURE_NAME).write_bytes(pkg._sign(raw, KEY))


@pytest.mark.parametrize(
    ("tamper", "use_digest", "reason"),
    [
        (_tamper_blob, True, "blob-hash-mismatch"),
        (_truncate_blob, True, "blob-size-mismatch"),
        (_tamper_manifest, True, "digest-mismatch"),
        (_tamper_manifest, False, "bad-signature"),
        (lambda d: (d / pkg.SIGNATURE_NAME).write_bytes(pkg._sign(b"other", KEY)), True, "bad-signature"),
        (
            lambda d: (d / pkg.SIGNATURE_NAME).write_bytes(
                pkg._sign((d / pkg.MANIFEST_NAME).read_bytes(), OTHER_KEY)
            ),
            True,
            "bad-signature",
        ),
        (lambda d: (d / pkg.SIGNATURE_NAME).write_bytes(b"\0" * 5000), True, "bad-signature"),
        (lambda d: (d / pkg.SIGNATURE_NAME).unlink(), True, "missing-file"),
        (lambda d: (d / pkg.BLOB_NAME).unlink(), True, "missing-file"),
        (lambda d: _resign(d, b'{"format": 1}'), False, "manifest-corrupt"),
        (lambda d: _resign(d, b"not json"), False, "manifest-corrupt"),
        (lambda d: _resign(d, {"format": 99}), False, "unknown-format"),
        (lambda d: _resign(d, {"format": 1, "files": {}}), False, "manifest-corrupt"),
    ],
    ids=[
        "blob-byte",
        "blob-short",
        "manifest-byte",
        "manifest-byte-no-digest",
        "signature-of-other-bytes",
        "signature-by-other-key",
        "signature-too-long",
        "no-signature",
        "no-blob",
        "not-canonical",
        "not-json",
        "format-99",
        "no-files-entry",
    ],
)
def test_verify_refuses_with_the_reason(
    built: pkg.PackageInfo,
    tmp_path: Path,
    tamper: Callable[[Path], None],
    use_digest: bool,
    reason: str,
) -> None:
    d = _copy(built, tmp_path / "pkg")  # a name that is not a digest: nothing implied
    assert verify_package(d, PUBLIC, built.digest)["files"] == built.manifest["files"]
    tamper(d)
    with pytest.raises(PackageError) as err:
        verify_package(d, PUBLIC, built.digest if use_digest else None)
    assert err.value.reason == reason
    with pytest.raises(PackageError) as err2:
        load_package(d, PUBLIC, built.digest if use_digest else None)
    assert err2.value.reason == reason


def test_a_directory_named_by_digest_is_checked_against_its_name(
    built: pkg.PackageInfo, tmp_path: Path
) -> None:
    other = "0" * 64
    d = _copy(built, tmp_path / other)
    with pytest.raises(PackageError) as err:
        verify_package(d, PUBLIC)
    assert err.value.reason == "digest-mismatch"
    assert verify_package({n: d / n for n in pkg.FILE_NAMES}, PUBLIC)["format"] == 1


def test_nothing_is_parsed_before_verification(
    built: pkg.PackageInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.numpy

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor was parsed before the package was verified")

    d = _copy(built, tmp_path / "pkg")
    _tamper_blob(d)
    monkeypatch.setattr(safetensors.numpy, "load", no_parsing)
    with pytest.raises(PackageError, match="blob-hash-mismatch"):
        load_package(d, PUBLIC, built.digest)


# --------------------------------------------------------------------------- load


def test_a_loaded_package_runs_exactly_like_the_runtime_model_it_came_from(
    bundle: Bundle, built: pkg.PackageInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFIT_W8A8", "1")  # W8A8 whatever this host's int8 speed
    spec = bundle.adapter.spec()
    plan = Plan.from_dict(built.manifest["plan"])
    calib = bundle.evaluator.calibration_inputs()
    original, _ = build_runtime_model(
        bundle.adapter.module, spec, plan, calib_inputs_by_tensor=calib, w8a8=True
    )
    reference = EarlyExitRunner(bundle.adapter, original, bundle.heads, plan.exit_threshold)

    # Loading must not touch the original model or its weights: only the package.
    import planner.builtin
    import planner.models.tiny

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_package reached for the original model")

    monkeypatch.setattr(planner.models.tiny.TinyAdapter, "__init__", forbidden)
    monkeypatch.setattr(planner.builtin, "load_bundle", forbidden)
    loaded = load_package(built.path, PUBLIC)
    assert loaded.digest == built.digest and loaded.plan == plan
    # both blocks' Linears are all integer: they run as fused W8A8 blocks, Q/K/V on two-digit
    # inputs (the note keeps how each weight got to int8)
    assert loaded.kernels.by_kernel() == {
        "fp16-storage upcast-per-call fp32": 1,
        "packed-row-gather dequant": 2,
        KERNEL_W8A8_FUSED: 6,
        KERNEL_W8A16_FUSED: 6,
    }
    fused = (KERNEL_W8A8_FUSED, KERNEL_W8A16_FUSED)
    notes = [c.note.split(";")[0] for c in loaded.kernels.choices if c.kernel in fused]
    assert notes.count(KERNEL_W8A8_FROM_INT4) == 10 and notes.count(KERNEL_W8A8) == 2
    check = loaded.check_set
    assert len(check) == 24
    with torch.inference_mode():
        for i in range(len(check)):
            batch = check.batch(i)
            assert torch.equal(loaded.runner.exit_logits(batch), reference.exit_logits(batch))
            assert loaded.runner.run(batch) == reference.run(batch)
    assert not any(p.requires_grad for p in loaded.module.parameters())


def test_loading_picks_w8a8_only_where_int8_gemms_are_faster(
    bundle: Bundle, built: pkg.PackageInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    import planner.runtime

    def probe(int8_ms: float) -> None:
        got = planner.runtime.Int8MatmulProbe(64, 384, 1536, int8_s=int8_ms / 1e3, fp32_s=0.5e-3, threads=2)
        monkeypatch.setattr(planner.runtime, "probe_int8_matmul", lambda *a, **k: got)

    probe(0.15)  # a host with VNNI: int8 ~3× faster
    fast = load_package(built.path, PUBLIC)
    assert fast.w8a8_reason.startswith("W8A8: _int_mm 0.150 ms vs fp32 0.500 ms")
    assert KERNEL_DEQUANT_AT_LOAD not in fast.kernels.by_kernel()
    probe(13.0)  # x86 without VNNI: _int_mm is a slow generic path
    slow = load_package(built.path, PUBLIC)
    assert "int8 GEMMs are not faster here" in slow.w8a8_reason
    assert slow.kernels.by_kernel()[
        KERNEL_DEQUANT_AT_LOAD
    ] == 12 and slow.kernels.by_kernel().keys().isdisjoint({KERNEL_W8A8_FUSED, KERNEL_W8A16_FUSED})
    # The environment overrides the probe either way, and a bad value is refused by name.
    monkeypatch.setenv("EDGEFIT_W8A8", "1")
    assert KERNEL_W8A16_FUSED in load_package(built.path, PUBLIC).kernels.by_kernel()
    monkeypatch.setenv("EDGEFIT_W8A8", "0")
    assert load_package(built.path, PUBLIC).w8a8_reason == "EDGEFIT_W8A8=0: W8A8 off"
    monkeypatch.setenv("EDGEFIT_W8A8", "yes")
    with pytest.raises(PlanError, match="EDGEFIT_W8A8 must be 1, 0 or auto, got 'yes'"):
        load_package(built.path, PUBLIC)
    # Passed explicitly, the caller's choice stands.
    assert load_package(built.path, PUBLIC, w8a8=False).kernels.by_kernel()[KERNEL_DEQUANT_AT_LOAD] == 12


def test_the_check_set_holds_fp32_answers_on_held_out_texts(bundle: Bundle, built: pkg.PackageInfo) -> None:
    loaded = load_package(built.path, PUBLIC)
    check = loaded.check_set
    test = bundle.dataset.split("test")
    assert check.labels.tolist() == list(test.labels)
    fp32 = EarlyExitRunner(bundle.adapter, bundle.adapter.module, bundle.heads, None)
    with torch.inference_mode():
        answers = [fp32.run(check.batch(i))[0].prediction for i in range(len(check))]
    assert np.array_equal(check.reference, np.asarray(answers))
    first = bundle.adapter.tokenize([test.texts[0]], bundle.evaluator.max_length)
    assert torch.equal(check.batch(0).input_ids, first.input_ids)


def test_importing_the_module_loads_no_torch() -> None:
    code = "import sys, planner.package; print([m for m in ('torch', 'numpy', 'django') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_package_of_one_block_heads_says_so_and_loads(bundle: Bundle, tmp_path: Path) -> None:
    # Heads that read their own block only (the format before dense heads) still package: the
    # manifest records the heads' input width and the reader lays the blob out by it.
    from dataclasses import replace

    from planner.exits import pooled_features, train_exit_heads
    from planner.models import TokenizedSplit

    train = bundle.dataset.split("train")
    feats = pooled_features(bundle.adapter, TokenizedSplit.build(bundle.adapter, train.texts, 32))
    single = train_exit_heads(feats, train.labels, bundle.dataset.classes, dense=False)
    one_block = replace(bundle, heads=single)
    plan = _uniform(one_block, TensorScheme("int8"))
    info = build_package(one_block, plan, tmp_path, signing_key=KEY)
    assert info.manifest["exit_heads"]["input_width"] == bundle.adapter.spec().hidden_size
    assert info.blob_bytes == pkg.predict_bundle_package_bytes(one_block, plan)
    loaded = load_package(info.path, PUBLIC)
    assert not loaded.heads.dense and torch.equal(loaded.heads.weight, single.weight)
