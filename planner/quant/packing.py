"""Real bytes: bit-packing of codes, the size prediction, and safetensors files of a plan.

Packed layout of one tensor (every array little-endian, row-major):

* integer precisions: ``codes`` uint8 (ceil(n·bits/8),) — the n = rows·cols codes as one dense
  little-endian bit stream (8-bit: one byte each; 4-bit: two per byte, low nibble first; 3-bit:
  eight codes in three bytes; 2-bit: four per byte); ``scales`` fp16 (rows, n_groups); for
  asymmetric schemes ``zeros`` fp16 (rows, n_groups); for a table with hot rows ``hot_index``
  int32 (k,), ``hot_codes`` uint8 (k, cols) and ``hot_scales`` fp16 (k, 1);
* fp16 / fp32: ``values`` in that dtype, shape (rows, cols).

`packed_nbytes` predicts these byte counts from shape and scheme alone and is what the planner
uses for model size; tests hold it equal to the bytes `pack` produces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from planner.files import replacing
from planner.quant.core import QuantizedTensor
from planner.quant.sizes import (
    codes_nbytes,
    n_groups,
    packed_nbytes,
    plan_nbytes,
    validate_scheme,
    weights_nbytes,
)
from planner.specs import PlanError, TensorScheme

__all__ = [
    "PACK_FORMAT_VERSION",
    "PARTS",
    "WriteReport",
    "pack",
    "pack_codes",
    "packed_nbytes",
    "plan_nbytes",
    "read_packed_safetensors",
    "unpack",
    "unpack_codes",
    "weights_nbytes",
    "write_packed_safetensors",
]

#: pack-2 added hot rows; a pack-1 file (none) still reads.
PACK_FORMAT_VERSION = "edgefit-pack-2"
_READABLE_FORMATS = ("edgefit-pack-1", PACK_FORMAT_VERSION)
#: Every array name `pack` may produce for one tensor.
PARTS: tuple[str, ...] = ("codes", "scales", "zeros", "values", "hot_index", "hot_codes", "hot_scales")
_CHUNK = 8  # codes per chunk: 8 codes of b bits always fill exactly b whole bytes


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) into a dense little-endian bit stream of uint8.

    Code i sits at bit offset i·b of the stream.  Steps: (1) flatten and pad to whole chunks
    (2-/4-bit: the codes of one byte; other widths: 8 codes, which fill exactly b bytes);
    (2) OR each chunk's codes in at offsets 0, b, 2b, … — in uint8 when a chunk is one byte,
    else in the narrowest word that holds b·8 bits; (3) split words into little-endian bytes;
    (4) drop the padding bytes beyond ceil(n·b/8).  Working in the narrowest integer keeps
    the temporaries small: the word embedding's 11.7 M codes went through 94 MB uint64 arrays
    before (~60 ms, more on first touch of the memory), ~10 ms now.
    """
    given = np.asarray(codes)
    if given.size and (int(given.min()) < 0 or int(given.max()) >= (1 << bits)):
        bad = int(given.min()) if int(given.min()) < 0 else int(given.max())
        raise PlanError(f"code {bad} does not fit in {bits} bits (codes are 0..{(1 << bits) - 1})")
    flat = np.ascontiguousarray(given, dtype=np.uint8).reshape(-1)
    n = flat.size
    if bits == 8:
        return flat.copy()
    per_chunk = 8 // bits if 8 % bits == 0 else _CHUNK
    pad = (-n) % per_chunk
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    word_type = _word_type(bits, per_chunk)
    chunks = flat.reshape(-1, per_chunk)
    words = chunks[:, 0].astype(word_type)
    for j in range(1, per_chunk):
        words |= chunks[:, j].astype(word_type) << word_type(j * bits)
    chunk_bytes = per_chunk * bits // 8
    little = np.dtype(word_type).newbyteorder("<")
    out = words.astype(little).view(np.uint8).reshape(-1, little.itemsize)
    return np.ascontiguousarray(out[:, :chunk_bytes].reshape(-1)[: codes_nbytes(n, bits)])


def _word_type(bits: int, per_chunk: int) -> type[np.unsignedinteger]:
    """The narrowest unsigned integer holding one chunk of `per_chunk` codes of `bits` bits."""
    width = bits * per_chunk
    return np.uint8 if width <= 8 else np.uint16 if width <= 16 else np.uint32 if width <= 32 else np.uint64


def unpack_codes(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_codes`: the first `n` codes as uint8."""
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if raw.size != codes_nbytes(n, bits):
        raise PlanError(f"packed codes hold {raw.size} bytes, {codes_nbytes(n, bits)} expected for {n} codes")
    if bits == 8:
        return raw.copy()
    per_chunk = 8 // bits if 8 % bits == 0 else _CHUNK
    chunk_bytes = per_chunk * bits // 8
    word_type = _word_type(bits, per_chunk)
    itemsize = np.dtype(word_type).itemsize
    n_chunks = -(-n // per_chunk)
    padded = np.zeros((n_chunks, itemsize), dtype=np.uint8)
    full = np.zeros(n_chunks * chunk_bytes, dtype=np.uint8)
    full[: raw.size] = raw
    padded[:, :chunk_bytes] = full.reshape(n_chunks, chunk_bytes)
    words = padded.view(np.dtype(word_type).newbyteorder("<")).reshape(n_chunks).astype(word_type)
    mask = word_type((1 << bits) - 1)
    codes = np.empty((n_chunks, per_chunk), dtype=np.uint8)
    for j in range(per_chunk):
        codes[:, j] = (words >> word_type(j * bits)) & mask
    return codes.reshape(-1)[:n]


def _parts_for(scheme: TensorScheme) -> set[str]:
    """The arrays `pack` writes for a tensor under `scheme`."""
    if not scheme.is_integer:
        return {"values"}
    parts = {"codes", "scales"} | (set() if scheme.symmetric else {"zeros"})
    return parts | ({"hot_index", "hot_codes", "hot_scales"} if scheme.hot_rows else set())


def pack(qt: QuantizedTensor) -> dict[str, np.ndarray]:
    """The arrays that store `qt`: see the module docstring for the layout."""
    if qt.values is not None:
        return {"values": qt.values.detach().cpu().contiguous().numpy().copy()}
    assert qt.codes is not None and qt.scales is not None
    out = {
        "codes": pack_codes(qt.codes.cpu().numpy(), qt.scheme.bits),
        "scales": qt.scales.detach().cpu().to(torch.float16).contiguous().numpy().copy(),
    }
    if qt.zeros is not None:
        out["zeros"] = qt.zeros.detach().cpu().to(torch.float16).contiguous().numpy().copy()
    if qt.hot_index is not None:
        assert qt.hot_codes is not None and qt.hot_scales is not None
        out["hot_index"] = qt.hot_index.detach().cpu().to(torch.int32).contiguous().numpy().copy()
        out["hot_codes"] = qt.hot_codes.detach().cpu().to(torch.uint8).contiguous().numpy().copy()
        out["hot_scales"] = qt.hot_scales.detach().cpu().to(torch.float16).contiguous().numpy().copy()
    return out


def unpack(
    packed: Mapping[str, np.ndarray | torch.Tensor],
    shape: tuple[int, int],
    scheme: TensorScheme,
    method: str = "rtn",
    name: str = "weight",
) -> QuantizedTensor:
    """Rebuild the QuantizedTensor that `pack` stored (bit-exact).

    Every part the scheme needs must be present with the dtype and shape `pack` writes, and no
    other part may be: a PlanError names the tensor, the part and what was expected."""
    rows, cols = validate_scheme(shape, scheme, name)
    arrays = {
        k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        for k, v in packed.items()
    }

    def part(key: str, dtype: type, want_shape: tuple[int, ...]) -> np.ndarray:
        arr = arrays.get(key)
        if arr is None or arr.dtype != dtype or tuple(arr.shape) != want_shape:
            got = "missing" if arr is None else f"{arr.dtype} {tuple(arr.shape)}"
            raise PlanError(
                f"tensor {name!r}: packed {key} is {got}, expected {np.dtype(dtype)} {want_shape} "
                f"for {scheme.precision} {(rows, cols)}"
            )
        return arr

    needed = _parts_for(scheme)
    extra = sorted(set(arrays) - needed)
    if extra:
        raise PlanError(
            f"tensor {name!r}: packed parts {extra} do not belong to its scheme {scheme} "
            f"(expected {sorted(needed)})"
        )
    if not scheme.is_integer:
        want = np.float16 if scheme.precision == "fp16" else np.float32
        values = part("values", want, (rows, cols))
        return QuantizedTensor(shape=(rows, cols), scheme=scheme, values=torch.from_numpy(values.copy()))
    ng = n_groups(cols, scheme)
    raw_codes = part("codes", np.uint8, (codes_nbytes(rows * cols, scheme.bits),))
    codes = unpack_codes(raw_codes, scheme.bits, rows * cols).reshape(rows, cols)
    scales = part("scales", np.float16, (rows, ng))
    zeros = None
    if not scheme.symmetric:
        zeros = torch.from_numpy(part("zeros", np.float16, (rows, ng)).copy())
    hot: dict[str, torch.Tensor] = {}
    k = scheme.hot_rows
    if k:
        want_hot: dict[str, tuple[type, tuple[int, ...]]] = {
            "hot_index": (np.int32, (k,)),
            "hot_codes": (np.uint8, (k, cols)),
            "hot_scales": (np.float16, (k, 1)),
        }
        for key, (dtype, want_shape) in want_hot.items():
            hot[key] = torch.from_numpy(part(key, dtype, want_shape).copy())
        index = hot["hot_index"]
        if int(index.min()) < 0 or int(index.max()) >= rows or bool((index[1:] <= index[:-1]).any()):
            raise PlanError(
                f"tensor {name!r}: packed hot_index must hold {k} ascending row ids in 0..{rows - 1}"
            )
    return QuantizedTensor(
        shape=(rows, cols),
        scheme=scheme,
        codes=torch.from_numpy(codes),
        scales=torch.from_numpy(scales.copy()),
        zeros=zeros,
        method=method,
        hot_index=hot.get("hot_index"),
        hot_codes=hot.get("hot_codes"),
        hot_scales=hot.get("hot_scales"),
    )


@dataclass(frozen=True)
class WriteReport:
    """What a safetensors write produced.

    `payload_bytes` is the sum of the tensors' data bytes (what `plan_nbytes` predicts);
    `file_bytes` the size on disk, i.e. payload plus the safetensors JSON header
    (`header_bytes`, including its 8-byte length prefix).
    """

    path: str
    payload_bytes: int
    file_bytes: int
    header_bytes: int
    n_tensors: int


def write_packed_safetensors(
    path: str | os.PathLike[str],
    quantized: Mapping[str, QuantizedTensor],
    other_params: Mapping[str, torch.Tensor] | None = None,
) -> WriteReport:
    """Write packed tensors (and fp32 `other_params`) to one safetensors file.

    Keys are ``<tensor name>.<part>`` (part: one of `PARTS`) and, for other
    parameters, ``<name>.values`` in fp32.  The file's metadata records each tensor's shape,
    scheme and method so `read_packed_safetensors` can rebuild it without the plan.
    """
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, object]] = {}
    for name, qt in quantized.items():
        for part, arr in pack(qt).items():
            arrays[f"{name}.{part}"] = arr
        meta[name] = qt.describe()
    others = dict(other_params or {})
    for name, tensor in others.items():
        if name in quantized:
            raise PlanError(f"tensor {name!r} given both as quantized and as an other parameter")
        arrays[f"{name}.values"] = tensor.detach().cpu().float().contiguous().numpy().copy()
    metadata = {
        "format": PACK_FORMAT_VERSION,
        "tensors": json.dumps(meta, sort_keys=True),
        "other": json.dumps(sorted(others)),
    }
    with replacing(Path(path)) as tmp:  # a failed write leaves no file, or the previous one
        save_file(arrays, str(tmp), metadata=metadata)
    payload = sum(int(a.nbytes) for a in arrays.values())
    file_bytes = Path(path).stat().st_size
    return WriteReport(
        path=str(path),
        payload_bytes=payload,
        file_bytes=file_bytes,
        header_bytes=file_bytes - payload,
        n_tensors=len(arrays),
    )


def read_packed_safetensors(
    path: str | os.PathLike[str],
) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
    """Read a file written by `write_packed_safetensors`: (quantized tensors, other params)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") not in _READABLE_FORMATS:
            raise PlanError(f"not an EdgeFit packed file (format {metadata.get('format')!r})")
        arrays = load_file(str(path))
        quantized: dict[str, QuantizedTensor] = {}
        for name, desc in json.loads(metadata["tensors"]).items():
            scheme = TensorScheme.from_dict(desc["scheme"])
            shape = (int(desc["shape"][0]), int(desc["shape"][1]))
            parts = {p: arrays[f"{name}.{p}"] for p in PARTS if f"{name}.{p}" in arrays}
            quantized[name] = unpack(parts, shape, scheme, desc.get("method", "rtn"), name=name)
        others = {}
        for name in json.loads(metadata["other"]):
            if f"{name}.values" not in arrays:
                raise PlanError(f"parameter {name!r}: no {name}.values array")
            others[name] = torch.from_numpy(arrays[f"{name}.values"].copy())
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, IndexError) as exc:
        # A truncated or garbled file: safetensors' own error, or metadata that is not ours.
        raise PlanError(f"{path}: unreadable or corrupt packed file ({type(exc).__name__}: {exc})") from None
    return quantized, others
