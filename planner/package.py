"""Signed packages: build, verify and load what a device runs (docs/delivery.md is the contract).

A package is three files in ``<root>/<digest>/``:

* ``model.safetensors`` — every tensor the runtime needs, laid out by `_layout` from the spec,
  the plan and a few sizes only (so `predict_package_bytes` is exact without writing):
  the packed weights in `planner.quant.packing`'s conventions (``<tensor>.codes`` uint8 bit
  stream, ``<tensor>.scales`` / ``.zeros`` fp16, ``<tensor>.values`` fp16/fp32, a table's hot
  rows as ``<tensor>.hot_index`` int32 / ``.hot_codes`` uint8 / ``.hot_scales`` fp16; the metadata's
  ``format`` / ``tensors`` entries let `read_packed_safetensors` read them back), the
  parameters the plan never quantizes (biases, norms) as ONE fp32 vector
  ``other_params.values`` in the module's parameter order (names and shapes are in the
  manifest), the exit heads ``exit_heads.{weight,bias,mean,std}`` and the check set
  ``check_set.{input_ids,attention_mask,labels,reference}`` (token ids padded to the model's
  max length, labels, and the FP32 model's top-1 answers);
* ``manifest.json`` — canonical JSON (sorted keys, no whitespace, UTF-8, no timestamps);
* ``manifest.sig`` — the raw 64-byte Ed25519 signature of the manifest bytes.

The digest is the SHA-256 of the manifest bytes; the manifest pins the blob's size and SHA-256,
so the digest covers everything.  The same plan, model and predictions always give the same
bytes.  Verification checks digest, signature, blob size and blob SHA-256 before a single tensor
is parsed; loading rebuilds the architecture from the manifest (never from the original FP32
weights file) and fills every parameter from the package.

This module imports only the standard library, PyNaCl and `planner.specs` at import time (the
server's signing-key endpoint uses it); torch, numpy and safetensors load on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planner.files import replacing
from planner.specs import ModelSpec, Plan, PlanError, TensorScheme

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from planner.builtin import Bundle
    from planner.exits.heads import ExitHeads
    from planner.models.base import Batch, ModelAdapter
    from planner.models.bert import BertAdapter
    from planner.quant.apply import QuantCache
    from planner.runtime import EarlyExitRunner, KernelReport

__all__ = [
    "BLOB_NAME",
    "CHECK_EXAMPLES",
    "CHECK_SPLIT",
    "FILE_NAMES",
    "MANIFEST_NAME",
    "PACKAGE_FORMAT",
    "REASONS",
    "SIGNATURE_NAME",
    "CheckSet",
    "LoadedPackage",
    "PackageError",
    "PackageInfo",
    "build_package",
    "canonical_json",
    "key_id",
    "load_package",
    "predict_bundle_package_bytes",
    "predict_package_bytes",
    "public_key_hex",
    "signing_key_info",
    "verify_manifest",
    "verify_package",
]

PACKAGE_FORMAT = 1
BLOB_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
FILE_NAMES: tuple[str, ...] = (MANIFEST_NAME, SIGNATURE_NAME, BLOB_NAME)
#: Why a package was refused (PackageError.reason), as listed in docs/delivery.md.
REASONS: tuple[str, ...] = (
    "digest-mismatch",
    "bad-signature",
    "blob-hash-mismatch",
    "blob-size-mismatch",
    "manifest-corrupt",
    "unknown-format",
    "missing-file",
)
CHECK_SPLIT = "test"
CHECK_EXAMPLES = 64
_MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few kB; refuse to read a runaway file
_SIG_BYTES = 64
_OTHER_KEY = "other_params.values"
_BLOB_MARK = f"edgefit-package/{PACKAGE_FORMAT}"
#: numpy dtype str → safetensors dtype name (only what packages hold).
_ST_DTYPES = {"|u1": "U8", "<f2": "F16", "<f4": "F32", "<i4": "I32"}
_CHUNK = 1 << 20


class PackageError(Exception):
    """A package was refused; `reason` is one of `REASONS`, the message says which file and why."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown package error reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


# --------------------------------------------------------------------------- keys and JSON


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, finite numbers only: one byte string per value."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"manifest value is not canonical JSON: {exc}") from exc
    return text.encode("utf-8")


def _key_bytes(key: str | bytes) -> bytes | None:
    """32 raw bytes of an Ed25519 `key` given as hex or bytes, or None when it is not one."""
    if isinstance(key, bytes):
        raw = key
    else:
        try:
            raw = bytes.fromhex(key.strip())
        except ValueError:
            return None
    return raw if len(raw) == 32 else None


def _seed_bytes(signing_key: str | bytes) -> bytes:
    seed = _key_bytes(signing_key)
    if seed is None:
        raise PlanError("signing key must be 64 hexadecimal characters (a 32-byte Ed25519 seed)")
    return seed


def _public_bytes(public_key: str | bytes) -> bytes:
    raw = _key_bytes(public_key)
    if raw is None:
        raise ValueError("public key must be 64 hexadecimal characters (a 32-byte Ed25519 key)")
    return raw


def public_key_hex(signing_key: str | bytes) -> str:
    """The Ed25519 public key (hex) of a 32-byte seed given as hex or bytes."""
    from nacl.signing import SigningKey

    return bytes(SigningKey(_seed_bytes(signing_key)).verify_key).hex()


def key_id(public_key: str | bytes) -> str:
    """First 16 hex characters of the SHA-256 of the 32-byte public key."""
    return hashlib.sha256(_public_bytes(public_key)).hexdigest()[:16]


def signing_key_info(signing_key: str | bytes) -> dict[str, str]:
    """The body of ``GET /api/v1/signing-key``: algorithm, public key (hex) and key id."""
    public = public_key_hex(signing_key)
    return {"algorithm": "ed25519", "public_key": public, "key_id": key_id(public)}


def _sign(message: bytes, signing_key: str | bytes) -> bytes:
    from nacl.signing import SigningKey

    return bytes(SigningKey(_seed_bytes(signing_key)).sign(message).signature)


# --------------------------------------------------------------------------- blob layout


@dataclass(frozen=True)
class _Entry:
    key: str
    dtype: str  # numpy dtype str, little-endian
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return int(self.dtype[-1])

    @property
    def nbytes(self) -> int:
        return self.itemsize * math.prod(self.shape)


def _method_stored(kind: str, scheme: TensorScheme) -> str:
    # planner.quant.api.quantize: GPTQ on a lookup table falls back to round-to-nearest.
    return "gptq" if scheme.is_integer and scheme.method == "gptq" and kind == "linear" else "rtn"


def _layout(
    spec: ModelSpec,
    plan: Plan,
    n_classes: int,
    check_examples: int,
    check_seq_len: int,
    head_width: int | None = None,
) -> tuple[list[_Entry], dict[str, str]]:
    """Every tensor of the blob (data order) and the safetensors metadata, from sizes alone.

    `head_width` is the number of features an exit head's weight spans: the hidden size
    (heads reading their own block) or blocks × hidden size (dense heads); default the former.

    Data order: 4-byte dtypes, then 2-byte, then 1-byte (stable within a size), so with the
    header padded to 8 bytes every tensor starts aligned to its element size.
    """
    from planner.quant.core import n_groups, validate_scheme

    plan.validate(spec)
    if n_classes < 1 or check_examples < 1 or check_seq_len < 1:
        raise PlanError("a package needs ≥ 1 class, ≥ 1 check example and a check length ≥ 1")
    entries: list[_Entry] = []
    described: dict[str, dict[str, Any]] = {}
    for t in spec.tensors:
        scheme = plan.scheme(t.name)
        rows, cols = validate_scheme(t.shape, scheme, t.name)
        if scheme.is_integer:
            entries.append(_Entry(f"{t.name}.codes", "|u1", (-(-rows * cols * scheme.bits // 8),)))
            side = (rows, n_groups(cols, scheme))
            entries.append(_Entry(f"{t.name}.scales", "<f2", side))
            if not scheme.symmetric:
                entries.append(_Entry(f"{t.name}.zeros", "<f2", side))
            if scheme.hot_rows:
                k = scheme.hot_rows
                entries.append(_Entry(f"{t.name}.hot_index", "<i4", (k,)))
                entries.append(_Entry(f"{t.name}.hot_codes", "|u1", (k, cols)))
                entries.append(_Entry(f"{t.name}.hot_scales", "<f2", (k, 1)))
        else:
            entries.append(
                _Entry(f"{t.name}.values", "<f2" if scheme.precision == "fp16" else "<f4", (rows, cols))
            )
        described[t.name] = {
            "shape": [rows, cols],
            "scheme": scheme.to_dict(),
            "method": _method_stored(t.kind, scheme),
        }
    if spec.other_params:
        entries.append(_Entry(_OTHER_KEY, "<f4", (spec.other_params,)))
    e, h = spec.n_blocks, spec.hidden_size
    if head_width is None:
        head_width = h
    if head_width not in (h, e * h):
        raise PlanError(f"exit heads span {head_width} features; {h} or {e * h} expected")
    entries += [
        _Entry("exit_heads.weight", "<f4", (e, n_classes, head_width)),
        _Entry("exit_heads.bias", "<f4", (e, n_classes)),
        _Entry("exit_heads.mean", "<f4", (e, h)),
        _Entry("exit_heads.std", "<f4", (e, h)),
        _Entry("check_set.input_ids", "<i4", (check_examples, check_seq_len)),
        _Entry("check_set.attention_mask", "|u1", (check_examples, check_seq_len)),
        _Entry("check_set.labels", "<i4", (check_examples,)),
        _Entry("check_set.reference", "<i4", (check_examples,)),
    ]
    entries.sort(key=lambda x: -x.itemsize)  # stable: keeps spec order within a size
    from planner.quant.packing import PACK_FORMAT_VERSION

    metadata = {
        "format": PACK_FORMAT_VERSION,
        "package": _BLOB_MARK,
        "tensors": json.dumps(described, sort_keys=True),
        "other": "[]",  # other parameters travel as one vector (`other_params.values`)
    }
    return entries, metadata


def _header(entries: list[_Entry], metadata: Mapping[str, str]) -> bytes:
    """The safetensors header (8-byte little-endian length + JSON padded with spaces to 8)."""
    body: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        body[e.key] = {
            "dtype": _ST_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def predict_package_bytes(
    spec: ModelSpec,
    plan: Plan,
    *,
    n_classes: int,
    check_examples: int = CHECK_EXAMPLES,
    check_seq_len: int = 128,
    head_width: int | None = None,
) -> int:
    """Exact size of ``model.safetensors`` for `plan`: header + packed weights (`plan_nbytes`) +
    exit heads + check set.  `check_examples` is the number actually shipped (min(64, size of
    the held-out split), `check_seq_len` the model's max length and `head_width` the features
    an exit head spans (see `_layout`; `predict_bundle_package_bytes` fills all three from a
    bundle)."""
    entries, metadata = _layout(spec, plan, n_classes, check_examples, check_seq_len, head_width)
    return len(_header(entries, metadata)) + sum(e.nbytes for e in entries)


def _check_shape(bundle: Bundle, check_examples: int) -> tuple[int, int]:
    n = min(check_examples, len(bundle.dataset.split(CHECK_SPLIT)))
    return n, int(bundle.evaluator.max_length)


def predict_bundle_package_bytes(bundle: Bundle, plan: Plan, check_examples: int = CHECK_EXAMPLES) -> int:
    """`predict_package_bytes` for a built-in bundle (classes, check-set size and length from it)."""
    n, length = _check_shape(bundle, check_examples)
    return predict_package_bytes(
        bundle.adapter.spec(),
        plan,
        n_classes=len(bundle.heads.classes),
        check_examples=n,
        check_seq_len=length,
        head_width=int(bundle.heads.weight.shape[2]),
    )


# --------------------------------------------------------------------------- check set


@dataclass(frozen=True)
class CheckSet:
    """Held-out texts shipped in a package: token ids padded to `seq_len`, real-token masks,
    labels and the FP32 model's final-exit top-1 answers (the agreement reference)."""

    input_ids: np.ndarray  # (n, seq_len) int32
    attention_mask: np.ndarray  # (n, seq_len) uint8
    labels: np.ndarray  # (n,) int32
    reference: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def lengths(self) -> list[int]:
        return [int(x) for x in self.attention_mask.sum(axis=1)]

    def batch(self, index: int) -> Batch:
        """Text `index` alone (batch 1), cut to its real tokens: what a device runs per request."""
        import torch

        from planner.models.base import Batch

        n = int(self.attention_mask[index].sum())
        ids = torch.from_numpy(self.input_ids[index : index + 1, :n].astype("int64"))
        mask = torch.from_numpy(self.attention_mask[index : index + 1, :n].astype("int64"))
        return Batch(ids, mask, torch.zeros_like(ids))

    def batches(self) -> list[Batch]:
        return [self.batch(i) for i in range(len(self))]


def _check_indices(n_split: int, n: int) -> list[int]:
    if n >= n_split:
        return list(range(n_split))
    return [round(i * (n_split - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build_check_set(bundle: Bundle, check_examples: int, threads: int) -> tuple[CheckSet, dict[str, Any]]:
    """Pick evenly spaced held-out texts, tokenize them, and get the FP32 model's answers.

    The FP32 answers come from one length-bucketed pass at a fixed thread count and are kept in
    the engine data dir, so every later build — in any process — ships the same bytes.
    """
    import numpy as np
    import torch

    from planner.models.base import TokenizedSplit

    adapter: ModelAdapter = bundle.adapter
    split = bundle.dataset.split(CHECK_SPLIT)
    n, length = _check_shape(bundle, check_examples)
    idx = _check_indices(len(split), n)
    texts = [split.texts[i] for i in idx]
    tokens = adapter.tokenize(texts, length)
    width = int(tokens.input_ids.shape[1])
    ids = np.zeros((n, length), dtype=np.int32)
    mask = np.zeros((n, length), dtype=np.uint8)
    ids[:, :width] = tokens.input_ids.numpy()
    mask[:, :width] = tokens.attention_mask.numpy()
    labels = np.asarray([split.labels[i] for i in idx], dtype=np.int32)
    info = {
        "n": n,
        "split": CHECK_SPLIT,
        "dataset": bundle.dataset.name,
        "dataset_sha256": bundle.dataset.sha256,
        "indices": idx,
        "seq_len": length,
        "reference": "FP32 model, final exit, top-1",
    }
    key = hashlib.sha256(canonical_json([adapter.fingerprint, bundle.heads.key, info, threads])).hexdigest()[
        :20
    ]
    cache = Path(bundle.evaluator.cache_dir) / "check_sets" / f"{key}.npy"
    reference: np.ndarray | None = None
    if cache.is_file():
        try:
            got = np.load(cache)
            if got.shape == (n,) and got.dtype == np.int32:
                reference = got
        except (OSError, ValueError):
            reference = None  # damaged cache entry: recompute
    if reference is None:
        split_tokens = TokenizedSplit.build(adapter, texts, length)
        with _threads(threads), torch.inference_mode():
            pooled = split_tokens.unsort([torch.stack(adapter.forward_exits(b), dim=1) for b in split_tokens])
            reference = bundle.heads.logits(pooled)[:, -1].argmax(-1).numpy().astype(np.int32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with replacing(cache, ".tmp.npy") as tmp:
            np.save(tmp, reference)
    return CheckSet(ids, mask, labels, reference), info


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class PackageInfo:
    """What `build_package` produced (or found already built: `created` False)."""

    digest: str
    path: Path
    manifest: dict[str, Any]
    signature_hex: str
    key_id: str
    blob_bytes: int
    blob_sha256: str
    predicted_bytes: int
    total_bytes: int
    seconds: float
    created: bool

    def file(self, name: str) -> Path:
        if name not in FILE_NAMES:
            raise KeyError(name)
        return self.path / name

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, path=str(self.path))


def _architecture(adapter: ModelAdapter) -> dict[str, Any]:
    from planner.models.bert import BertAdapter

    if not isinstance(adapter, BertAdapter):
        raise PlanError(
            f"model {adapter.name!r}: only BERT-family adapters can be packaged "
            f"(got {type(adapter).__name__})"
        )
    return {
        "type": "bert",
        "config": dataclasses.asdict(adapter.config),
        "max_length": int(adapter.max_length),
    }


def _other_parameters(module: nn.Module, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    listed = set(spec.tensor_names)
    return [(n, p) for n, p in module.named_parameters() if n not in listed]


def _predicted_block(predicted: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for slug, entry in (predicted or {}).items():
        if not isinstance(slug, str) or not isinstance(entry, Mapping):
            raise PlanError(
                f"predicted[{slug!r}]: expected {{profile slug: {{latency_ms, memory_bytes, …}}}}"
            )
        block = dict(entry, kind="predicted")
        canonical_json(block)  # finite numbers and JSON types only; raises PlanError naming the problem
        out[slug] = block
    return out


def _write_blob(
    path: Path, entries: list[_Entry], metadata: Mapping[str, str], arrays: Mapping[str, np.ndarray]
) -> tuple[str, int]:
    """Write the blob (header, then each tensor's bytes in layout order); (sha256, bytes)."""
    import numpy as np

    missing = sorted({e.key for e in entries} - set(arrays))
    extra = sorted(set(arrays) - {e.key for e in entries})
    if missing or extra:
        raise PlanError(f"{path.name}: tensors missing {missing[:3]} / unexpected {extra[:3]}")
    digest = hashlib.sha256()
    total = 0
    with path.open("xb") as fh:
        for e in entries:
            arr = arrays[e.key]
            if arr.dtype.str != e.dtype or tuple(arr.shape) != e.shape:
                raise PlanError(
                    f"{path.name}: tensor {e.key!r} is {arr.dtype.str} {tuple(arr.shape)}, "
                    f"layout says {e.dtype} {e.shape}"
                )
        head = _header(entries, metadata)
        fh.write(head)
        digest.update(head)
        total += len(head)
        for e in entries:
            data = np.ascontiguousarray(arrays[e.key]).data.cast("B")
            fh.write(data)
            digest.update(data)
            total += len(data)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest(), total


def _write_file(path: Path, data: bytes) -> None:
    with path.open("xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _resign(package_dir: Path, signature: bytes) -> None:
    """Make an existing package's signature the one this build made.

    The manifest names no key, so a build after a key rotation has the digest of the package
    already on disk; its `manifest.sig` is the old key's (Ed25519 signs deterministically: the
    same key gives the same bytes, which are then left alone).  The new one replaces it
    atomically: a reader sees the old signature or the new one, never part of either."""
    path = package_dir / SIGNATURE_NAME
    try:
        if path.read_bytes() == signature:
            return
    except OSError:
        pass  # missing or unreadable: write it
    with replacing(path) as tmp:
        _write_file(tmp, signature)
    _fsync_dir(package_dir)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_package(
    bundle: Bundle,
    plan: Plan,
    root: str | os.PathLike[str],
    *,
    signing_key: str | bytes,
    predicted: Mapping[str, Mapping[str, Any]] | None = None,
    created_from: str | None = None,
    calib_inputs_by_tensor: Mapping[str, torch.Tensor] | None = None,
    cache: QuantCache | None = None,
    check_examples: int = CHECK_EXAMPLES,
    threads: int = 2,
) -> PackageInfo:
    """Write the signed package of `plan` for `bundle` under ``root/<digest>/``.

    Steps: (1) validate the plan against the model (PlanError names the tensor and rule) and
    the signing key; (2) quantize every tensor (GPTQ tensors take `calib_inputs_by_tensor`,
    else the bundle evaluator's own calibration inputs, so shipped codes equal evaluated
    codes; a shared `cache` reuses work); (3) pick the check set and its FP32 answers;
    (4) in a temporary directory under `root`, write the blob from the layout, the canonical
    manifest pinning its size and SHA-256, and the signature; (5) rename the directory to
    ``root/<digest>`` — atomic, so a reader sees a whole package or none; when that digest
    already exists (same plan built before) the new copy is dropped.  Any error removes the
    temporary directory.  `predicted` maps profile slugs to {latency_ms, memory_bytes,
    cost_model_version}; it is part of the manifest, hence of the digest.
    """
    import numpy as np

    from planner.quant.apply import quantize_plan
    from planner.quant.packing import pack, plan_nbytes

    started = time.perf_counter()
    adapter, heads, dataset = bundle.adapter, bundle.heads, bundle.dataset
    spec = adapter.spec()
    plan.validate(spec)
    _seed_bytes(signing_key)
    architecture = _architecture(adapter)
    if heads.n_exits != spec.n_blocks or tuple(heads.classes) != tuple(dataset.classes):
        raise PlanError(f"model {bundle.info.name!r}: exit heads do not match the model and dataset")
    predicted_block = _predicted_block(predicted)

    calib = calib_inputs_by_tensor
    needs_calib = any(
        _method_stored(t.kind, plan.scheme(t.name)) == "gptq" or plan.scheme(t.name).hot_rows
        for t in spec.tensors
    )
    if needs_calib and calib is None:
        # The evaluator's own GPTQ inputs and lookup statistics: the package then holds the very
        # codes (and hot rows) that were evaluated.
        calib = bundle.evaluator.calibration_inputs()
    with _threads(threads):
        quantized = quantize_plan(adapter.module, spec, plan, calib, cache)
    check, check_info = _build_check_set(bundle, check_examples, threads)

    arrays: dict[str, np.ndarray] = {}
    for name, qt in quantized.items():
        for part, arr in pack(qt).items():
            arrays[f"{name}.{part}"] = arr
    others = _other_parameters(adapter.module, spec)
    if sum(p.numel() for _, p in others) != spec.other_params:
        raise PlanError(f"model {spec.name!r}: other parameters do not add up to spec.other_params")
    if others:
        arrays[_OTHER_KEY] = np.concatenate(
            [p.detach().cpu().float().reshape(-1).numpy() for _, p in others]
        ).astype("<f4")
    for part in ("weight", "bias", "mean", "std"):
        arrays[f"exit_heads.{part}"] = getattr(heads, part).detach().cpu().float().contiguous().numpy()
    arrays["check_set.input_ids"] = check.input_ids
    arrays["check_set.attention_mask"] = check.attention_mask
    arrays["check_set.labels"] = check.labels
    arrays["check_set.reference"] = check.reference

    entries, metadata = _layout(
        spec, plan, len(heads.classes), len(check), check_info["seq_len"], int(heads.weight.shape[2])
    )
    for name, qt in quantized.items():
        want = _method_stored(spec.tensor(name).kind, plan.scheme(name))
        if qt.method != want:
            raise PlanError(f"tensor {name!r}: quantized with method {qt.method!r}, layout expects {want!r}")
    predicted_bytes = len(_header(entries, metadata)) + sum(e.nbytes for e in entries)
    precisions = {t.name: plan.scheme(t.name).precision for t in spec.tensors}
    summary: dict[str, int] = {}
    for p in precisions.values():
        summary[p] = summary.get(p, 0) + 1

    out_root = Path(root)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out_root))
    try:
        blob_sha, blob_bytes = _write_blob(tmp / BLOB_NAME, entries, metadata, arrays)
        if blob_bytes != predicted_bytes:
            raise PlanError(f"{BLOB_NAME}: wrote {blob_bytes} bytes, layout predicted {predicted_bytes}")
        manifest: dict[str, Any] = {
            "format": PACKAGE_FORMAT,
            "model": {
                "name": bundle.info.name,
                "adapter": adapter.name,
                "version": adapter.fingerprint,
                "architecture": architecture,
            },
            "plan": plan.to_dict(),
            "plan_hash": plan.hash(),
            "precisions": precisions,
            "precision_summary": summary,
            "exit_threshold": plan.exit_threshold,
            "exit_heads": {
                "n_exits": heads.n_exits,
                "input_width": int(heads.weight.shape[2]),
                "classes": list(heads.classes),
                "key": heads.key,
                "dataset_sha256": dataset.sha256,
            },
            "predicted": predicted_block,
            "files": {BLOB_NAME: {"sha256": blob_sha, "bytes": blob_bytes}},
            "sizes": {
                "packed_weights_bytes": plan_nbytes(spec, plan),
                "blob_bytes": blob_bytes,
            },
            "other_params": [[n, list(p.shape)] for n, p in others],
            "check_set": check_info,
            "created_from": created_from or plan.hash(),
            "runtime": {"w8a8": True},
        }
        manifest_bytes = canonical_json(manifest)
        signature = _sign(manifest_bytes, signing_key)
        _write_file(tmp / MANIFEST_NAME, manifest_bytes)
        _write_file(tmp / SIGNATURE_NAME, signature)
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        final = out_root / digest
        created = True
        if final.exists():
            created = False
        else:
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not a concurrent build of the same digest: a real error
                    raise
                created = False
        if not created:
            _resign(final, signature)
        _fsync_dir(out_root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum((final / name).stat().st_size for name in FILE_NAMES)
    return PackageInfo(
        digest=digest,
        path=final,
        manifest=manifest,
        signature_hex=signature.hex(),
        key_id=key_id(public_key_hex(signing_key)),
        blob_bytes=blob_bytes,
        blob_sha256=blob_sha,
        predicted_bytes=predicted_bytes,
        total_bytes=total,
        seconds=time.perf_counter() - started,
        created=created,
    )


# --------------------------------------------------------------------------- verify


def verify_manifest(
    manifest_bytes: bytes,
    signature: bytes,
    public_key: str | bytes,
    expected_digest: str | None = None,
) -> dict[str, Any]:
    """Check a manifest's digest and signature, then parse it; the parsed manifest.

    Order: digest (SHA-256 of the bytes) against `expected_digest`; Ed25519 signature with
    `public_key`; only then JSON parsing (canonical form required), format, and the blob
    entry.  Raises PackageError with the reason.
    """
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    key = VerifyKey(_public_bytes(public_key))
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if expected_digest is not None and digest != expected_digest.strip().lower():
        raise PackageError(
            "digest-mismatch", f"{MANIFEST_NAME} has SHA-256 {digest[:16]}…, expected {expected_digest[:16]}…"
        )
    if len(signature) != _SIG_BYTES:
        raise PackageError("bad-signature", f"{SIGNATURE_NAME} holds {len(signature)} bytes, expected 64")
    try:
        key.verify(manifest_bytes, signature)
    except BadSignatureError:
        raise PackageError(
            "bad-signature", f"{SIGNATURE_NAME} does not verify {MANIFEST_NAME} with key {key_id(public_key)}"
        ) from None
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackageError("manifest-corrupt", f"{MANIFEST_NAME} is not UTF-8 JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise PackageError("manifest-corrupt", f"{MANIFEST_NAME} is not a JSON object")
    if manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(
            "unknown-format",
            f"{MANIFEST_NAME} has format {manifest.get('format')!r}, this agent reads {PACKAGE_FORMAT}",
        )
    try:
        if canonical_json(manifest) != manifest_bytes:
            raise PackageError("manifest-corrupt", f"{MANIFEST_NAME} is not in canonical form")
    except PlanError:
        raise PackageError("manifest-corrupt", f"{MANIFEST_NAME} holds non-finite numbers") from None
    files = manifest.get("files")
    blob = files.get(BLOB_NAME) if isinstance(files, dict) else None
    if (
        not isinstance(blob, dict)
        or not isinstance(blob.get("bytes"), int)
        or blob["bytes"] < 0
        or not isinstance(blob.get("sha256"), str)
        or len(blob["sha256"]) != 64
    ):
        raise PackageError("manifest-corrupt", f"{MANIFEST_NAME} lacks a valid files.{BLOB_NAME} entry")
    return manifest


def _source_paths(source: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]]) -> dict[str, Path]:
    if isinstance(source, Mapping):
        unknown = set(source) - set(FILE_NAMES)
        if unknown:
            raise ValueError(f"unknown package file name(s): {', '.join(sorted(unknown))}")
        return {name: Path(source[name]) for name in FILE_NAMES if name in source}
    root = Path(source)
    return {name: root / name for name in FILE_NAMES}


def _dir_digest(source: object) -> str | None:
    if isinstance(source, Mapping):
        return None
    name = Path(str(source)).name
    return name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None


def _read_small(path: Path, limit: int, reason: str) -> bytes:
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise PackageError(reason, f"{path.name} is larger than {limit} bytes")
    return data


def _read_header(paths: Mapping[str, Path]) -> tuple[bytes, bytes]:
    for name in FILE_NAMES:
        path = paths.get(name)
        if path is None or not path.is_file():
            raise PackageError("missing-file", f"{name} is missing ({path})")
    return (
        _read_small(paths[MANIFEST_NAME], _MAX_MANIFEST_BYTES, "manifest-corrupt"),
        # No valid Ed25519 signature is that long: the signature's fault, not the manifest's.
        _read_small(paths[SIGNATURE_NAME], 4096, "bad-signature"),
    )


def _check_blob_size(manifest: Mapping[str, Any], size: int) -> None:
    want = int(manifest["files"][BLOB_NAME]["bytes"])
    if size != want:
        raise PackageError("blob-size-mismatch", f"{BLOB_NAME} holds {size} bytes, the manifest says {want}")


def _check_blob_hash(manifest: Mapping[str, Any], sha: str) -> None:
    want = str(manifest["files"][BLOB_NAME]["sha256"]).lower()
    if sha != want:
        raise PackageError(
            "blob-hash-mismatch", f"{BLOB_NAME} has SHA-256 {sha[:16]}…, the manifest says {want[:16]}…"
        )


def verify_package(
    source: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    public_key: str | bytes,
    expected_digest: str | None = None,
) -> dict[str, Any]:
    """Verify a package directory (or {file name: path}) and return its manifest; loads nothing.

    Checks, in order: every file present; the manifest's digest (against `expected_digest`, or
    the directory name when that is a digest); its signature; its format; the blob's size and
    then its SHA-256 (streamed).  Raises PackageError(reason) at the first failure.
    """
    paths = _source_paths(source)
    manifest_bytes, signature = _read_header(paths)
    manifest = verify_manifest(manifest_bytes, signature, public_key, expected_digest or _dir_digest(source))
    blob = paths[BLOB_NAME]
    _check_blob_size(manifest, blob.stat().st_size)
    digest = hashlib.sha256()
    with blob.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    _check_blob_hash(manifest, digest.hexdigest())
    return manifest


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadedPackage:
    """A verified package, rebuilt into a runnable model with real kernels."""

    digest: str
    manifest: dict[str, Any]
    plan: Plan
    spec: ModelSpec
    adapter: ModelAdapter
    module: nn.Module
    heads: ExitHeads
    runner: EarlyExitRunner
    kernels: KernelReport
    check_set: CheckSet
    blob_bytes: int
    load_seconds: float
    #: Why the integer Linears run as they do (`planner.runtime.w8a8_pays_off`, or the caller).
    w8a8_reason: str = ""


def _packaged_adapter(architecture: Mapping[str, Any], name: str) -> BertAdapter:
    """An adapter of the packaged architecture; the caller overwrites every weight."""
    from planner.models.bert import BertAdapter, BertConfig, BertModule

    if architecture.get("type") != "bert":
        raise PackageError(
            "unknown-format", f"architecture {architecture.get('type')!r} is not known to this runtime"
        )

    class _PackagedBert(BertAdapter):
        def _token_ids(self, texts: list[str], max_length: int) -> list[list[int]]:
            raise PlanError("a packaged model has no tokenizer: run it on token ids (e.g. the check set)")

    try:
        cfg = BertConfig.from_dict(dict(architecture["config"]))
        max_length = int(architecture.get("max_length", 128))
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError("unknown-format", f"architecture config is not readable: {exc}") from None
    # Plain CPU construction (its random init is overwritten): ~0.1 s for MiniLM, whereas the meta
    # device + to_empty route imports torch._dynamo (2.5 s measured here) for normal_.
    return _PackagedBert(name, BertModule(cfg), max_length)


def load_package(
    source: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    public_key: str | bytes,
    expected_digest: str | None = None,
    *,
    w8a8: bool | None = None,
) -> LoadedPackage:
    """Verify, then load a package into a runnable early-exit model (no FP32 weights file needed).

    Steps: (1) read manifest, signature and blob into memory and verify them exactly as
    `verify_package` does (the bytes checked are the bytes parsed); (2) rebuild the
    architecture from the manifest with empty weights; (3) check the blob's tensor table
    against the layout the plan implies; (4) fill biases and norms from the other-parameter
    vector, unpack the quantized tensors and swap in the runtime's kernels: W8A8 when `w8a8`
    is True, fp32 on weights dequantized at load when False, and when None (the default) as
    `planner.runtime.w8a8_pays_off` decides for this host (its reason is kept in
    `LoadedPackage.w8a8_reason`); (5) rebuild the exit heads and the check set and wrap
    everything in an `EarlyExitRunner` at the plan's exit threshold.
    """
    import numpy as np
    import torch
    from safetensors.numpy import load as load_arrays

    from planner.exits.heads import ExitHeads
    from planner.quant.core import QuantizedTensor
    from planner.quant.packing import PARTS, unpack
    from planner.runtime import EarlyExitRunner, build_runtime_model, w8a8_pays_off

    started = time.perf_counter()
    if w8a8 is None:
        w8a8, w8a8_reason = w8a8_pays_off()
    else:
        w8a8_reason = f"W8A8 {'on' if w8a8 else 'off'} as the caller asked"
    paths = _source_paths(source)
    manifest_bytes, signature = _read_header(paths)
    manifest = verify_manifest(manifest_bytes, signature, public_key, expected_digest or _dir_digest(source))
    blob_path = paths[BLOB_NAME]
    _check_blob_size(manifest, blob_path.stat().st_size)
    blob = blob_path.read_bytes()
    _check_blob_size(manifest, len(blob))
    _check_blob_hash(manifest, hashlib.sha256(blob).hexdigest())
    digest = hashlib.sha256(manifest_bytes).hexdigest()

    # ---- everything below reads signed, hash-checked bytes only
    try:
        model = manifest["model"]
        plan = Plan.from_dict(manifest["plan"])
        check_info = manifest["check_set"]
        classes = tuple(str(c) for c in manifest["exit_heads"]["classes"])
        # Packages written before dense heads have no input_width: their heads read one block.
        head_width = manifest["exit_heads"].get("input_width")
        head_width = None if head_width is None else int(head_width)
        other_list = [(str(n), tuple(int(x) for x in s)) for n, s in manifest["other_params"]]
        adapter = _packaged_adapter(model["architecture"], str(model.get("adapter", model.get("name", ""))))
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError("unknown-format", f"{MANIFEST_NAME} lacks or garbles a field: {exc}") from None
    spec = adapter.spec()
    try:
        plan.validate(spec)
    except PlanError as exc:
        raise PackageError(
            "unknown-format", f"the plan does not fit the packaged architecture: {exc}"
        ) from None
    try:
        entries, metadata = _layout(
            spec, plan, len(classes), int(check_info["n"]), int(check_info["seq_len"]), head_width
        )
    except PlanError as exc:
        raise PackageError("unknown-format", f"{MANIFEST_NAME}: {exc}") from None
    head_len = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else -1
    if blob[: 8 + max(head_len, 0)] != _header(entries, metadata):
        raise PackageError("unknown-format", f"{BLOB_NAME}'s tensor table is not the one its plan implies")
    arrays = load_arrays(blob)
    del blob

    module = adapter.module
    others = _other_parameters(module, spec)
    if [(n, tuple(p.shape)) for n, p in others] != other_list:
        raise PackageError("unknown-format", "the packaged parameters do not match the architecture")
    if any(True for _ in module.buffers()):
        raise PackageError("unknown-format", "the architecture has buffers a package cannot fill")
    with torch.no_grad():
        flat = torch.from_numpy(arrays.pop(_OTHER_KEY)) if others else torch.zeros(0)
        offset = 0
        for _, param in others:
            n = param.numel()
            param.copy_(flat[offset : offset + n].reshape(param.shape))
            offset += n
    quantized: dict[str, QuantizedTensor] = {}
    for t in spec.tensors:
        scheme = plan.scheme(t.name)
        parts = {p: arrays.pop(f"{t.name}.{p}") for p in PARTS if f"{t.name}.{p}" in arrays}
        quantized[t.name] = unpack(parts, t.shape, scheme, _method_stored(t.kind, scheme))
    runtime_module, kernels = build_runtime_model(
        module, spec, plan, quantized=quantized, inplace=True, w8a8=w8a8, dequant_all=not w8a8
    )
    heads = ExitHeads(
        classes=classes,
        weight=torch.from_numpy(arrays["exit_heads.weight"]),
        bias=torch.from_numpy(arrays["exit_heads.bias"]),
        mean=torch.from_numpy(arrays["exit_heads.mean"]),
        std=torch.from_numpy(arrays["exit_heads.std"]),
        model=str(model.get("version", "")),
        dataset_sha256=str(manifest["exit_heads"].get("dataset_sha256", "")),
    )
    check = CheckSet(
        input_ids=np.asarray(arrays["check_set.input_ids"]),
        attention_mask=np.asarray(arrays["check_set.attention_mask"]),
        labels=np.asarray(arrays["check_set.labels"]),
        reference=np.asarray(arrays["check_set.reference"]),
    )
    runner = EarlyExitRunner(adapter, runtime_module, heads, plan.exit_threshold)
    return LoadedPackage(
        digest=digest,
        manifest=manifest,
        plan=plan,
        spec=spec,
        adapter=adapter,
        module=runtime_module,
        heads=heads,
        runner=runner,
        kernels=kernels,
        check_set=check,
        blob_bytes=int(manifest["files"][BLOB_NAME]["bytes"]),
        load_seconds=time.perf_counter() - started,
        w8a8_reason=w8a8_reason,
    )
