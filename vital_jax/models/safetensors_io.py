"""Streaming safetensors reader/writer on numpy + ml_dtypes (bf16 included), without torch.

Reading memory-maps each file and hands out one tensor at a time, so converting a checkpoint never holds two
full copies of the weights. The format is 8 bytes (little-endian u64 header size), a JSON header
`{name: {dtype, shape, data_offsets}}`, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A safetensors file or index is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file path, dtype, shape and byte range inside the data section."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(path: str) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{path}: truncated safetensors file (no header size)")
            (size,) = struct.unpack("<Q", raw)
            if size > 100 * 2**20:
                raise SafetensorsError(f"{path}: implausible safetensors header size {size}")
            header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: malformed safetensors header: {e}") from e
    return header, 8 + size


def index_tensors(model_dir: str) -> dict[str, TensorRef]:
    """All tensors of a HF checkpoint directory (single `model.safetensors` or a sharded index)."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise SafetensorsError(f"{index_path}: malformed safetensors index: {e!r}") from e
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(model_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        found = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else "directory does not exist"
        raise SafetensorsError(
            f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found (contents: {found}). "
            "Expected a HuggingFace checkpoint directory saved with safetensors.")
    refs: dict[str, TensorRef] = {}
    for name in files:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            raise SafetensorsError(f"{path}: listed in {INDEX_FILE} but missing")
        header, data_start = _read_header(path)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            refs[key] = TensorRef(path, _DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin,
                                  data_start + end)
    return refs


def read_tensor(ref: TensorRef) -> np.ndarray:
    """One tensor as a read-only memory-mapped numpy array (no copy until it is transformed)."""
    count = int(np.prod(ref.shape)) if ref.shape else 1
    if ref.end - ref.start != count * ref.dtype.itemsize:
        raise SafetensorsError(f"{ref.path}: byte range of a {ref.shape} {ref.dtype} tensor is inconsistent")
    mm = np.memmap(ref.path, dtype=np.uint8, mode="r", offset=ref.start, shape=(ref.end - ref.start,))
    return mm.view(ref.dtype).reshape(ref.shape)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape, dtype and a thunk producing it (called once, when written)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]


def write_safetensors(model_dir: str, specs: Iterable[TensorSpec], max_shard_bytes: int = 5 * 2**30,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors as HF safetensors, sharded with an index when larger than `max_shard_bytes`.

    Tensors are produced and written one at a time. Returns the written file names.
    """
    specs = list(specs)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    os.makedirs(model_dir, exist_ok=True)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards):
        _write_file(os.path.join(model_dir, fname), shard, metadata or {"format": "pt"})
        for spec in shard:
            weight_map[spec.name] = fname
            total += int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
    if len(shards) > 1:
        with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def _write_file(path: str, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        nbytes = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        header[spec.name] = {"dtype": _NAMES[np.dtype(spec.dtype)], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec in specs:
            array = np.ascontiguousarray(spec.produce(), dtype=spec.dtype)
            if tuple(array.shape) != tuple(spec.shape):
                raise SafetensorsError(f"{path}: tensor {spec.name} produced shape {array.shape}, "
                                       f"declared {spec.shape}")
            f.write(array.tobytes())
    os.replace(tmp, path)


def iter_tensors(model_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, memory-mapped array) for every tensor of a checkpoint directory, in name order."""
    refs = index_tensors(model_dir)
    for name in sorted(refs):
        yield name, read_tensor(refs[name])
