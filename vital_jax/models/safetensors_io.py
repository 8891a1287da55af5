"""HF safetensors checkpoint directories (one `model.safetensors` or shards with an index), read and written
through the `safetensors` library's numpy API (bf16 as ml_dtypes' bfloat16), without torch.

Reading opens each file once to list its tensors and reads one tensor at a time, so converting a checkpoint
never holds two full copies of the weights. Writing produces one shard's tensors at a time (at most
`max_shard_bytes` in memory beside the source), writes the shard to a temporary file and renames it; the index
is written last, atomically. An export directory is marked unfinished while it is written (`writing_export`), so
that an export killed midway is redone by the next one instead of refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from vital_jax.jsonio import atomic_write, fsync_directory, read_json

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{:05d}-of-{:05d}.safetensors"
# Present while an export writes its directory (`writing_export`): what the directory held before it began.
UNFINISHED_FILE = ".vital_jax_export_unfinished.json"


class SafetensorsError(ValueError):
    """A safetensors file or index is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its file, its name there, dtype and shape."""

    path: str
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def _file_tensors(path: str) -> dict[str, TensorRef]:
    try:
        with safe_open(path, framework="numpy") as f:
            refs = {}
            for key in f.keys():
                view = f.get_slice(key)
                dtype = view.get_dtype()
                if dtype not in _DTYPES:
                    raise SafetensorsError(f"{path}: tensor {key} has unsupported dtype {dtype}")
                refs[key] = TensorRef(path, key, _DTYPES[dtype], tuple(view.get_shape()))
            return refs
    except SafetensorError as e:
        raise SafetensorsError(f"{path}: not a readable safetensors file ({e})") from e


def index_tensors(model_dir: str) -> dict[str, TensorRef]:
    """All tensors of a HF checkpoint directory (single `model.safetensors` or a sharded index)."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(name, str) for name in files):
                raise TypeError(f"weight_map values must be file names, got {files}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SafetensorsError(f"{index_path}: malformed safetensors index: {e!r}") from e
    elif os.path.exists(os.path.join(model_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        found = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else "directory does not exist"
        raise SafetensorsError(
            f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found (contents: {found}). "
            "Expected a HuggingFace checkpoint directory saved with safetensors.")
    refs: dict[str, TensorRef] = {}
    for name in files:
        if os.path.basename(name) != name or name in (".", ".."):
            # Shards live beside their index: a path would read (or probe) files outside the checkpoint.
            raise SafetensorsError(f"{index_path}: shard {name!r} is not a file name in {model_dir}")
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            raise SafetensorsError(f"{path}: listed in {INDEX_FILE} but missing")
        for key, ref in _file_tensors(path).items():
            if key in refs:  # which copy is the weight would depend on the order the shards are read
                raise SafetensorsError(f"{path}: tensor {key} is also in {refs[key].path}")
            refs[key] = ref
    if len(files) > 1 or os.path.exists(index_path):
        wrong = [f"{key} (index: {shard}, found: {os.path.basename(refs[key].path) if key in refs else 'nowhere'})"
                 for key, shard in sorted(weight_map.items())
                 if key not in refs or os.path.basename(refs[key].path) != shard]
        if wrong:
            raise SafetensorsError(f"{index_path}: {len(wrong)} tensor(s) not where the index says: "
                                   f"{', '.join(wrong[:5])}")
    return refs


def read_tensor(ref: TensorRef) -> np.ndarray:
    """One tensor as a numpy array."""
    try:
        with safe_open(ref.path, framework="numpy") as f:
            return f.get_tensor(ref.name)
    except SafetensorError as e:
        raise SafetensorsError(f"{ref.path}: cannot read tensor {ref.name} ({e})") from e


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape, dtype and a thunk producing it (called once, when its shard is written)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]


def _nbytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize


# One shard is produced in memory before it is written: 2 GiB keeps an 8B export (16 GiB of bf16 weights held)
# inside a 24 GiB machine.
DEFAULT_SHARD_BYTES = 2 * 2**30


def write_safetensors(model_dir: str, specs: Iterable[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors as HF safetensors, sharded with an index when larger than `max_shard_bytes`.

    Each shard's tensors are produced when it is written (and released after), so memory holds one shard.
    Returns the written file names.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + _nbytes(spec) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += _nbytes(spec)
    os.makedirs(model_dir, exist_ok=True)
    names = [SINGLE_FILE] if len(shards) == 1 else [SHARD_PATTERN.format(i + 1, len(shards))
                                                    for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        _write_file(os.path.join(model_dir, fname), shard, metadata or {"format": "pt"})
        weight_map.update((spec.name, fname) for spec in shard)
        total += sum(_nbytes(spec) for spec in shard)
    if len(shards) > 1:
        atomic_write(os.path.join(model_dir, INDEX_FILE),
                     lambda f: json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2))
    return names


def _write_file(path: str, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
    tensors = {}
    for spec in specs:
        array = np.ascontiguousarray(spec.produce(), dtype=spec.dtype)
        if tuple(array.shape) != tuple(spec.shape):
            raise SafetensorsError(f"{path}: tensor {spec.name} produced shape {array.shape}, declared {spec.shape}")
        tensors[spec.name] = array
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors writes 0600: the weights would be unreadable to other users
        # Durable before the rename: after a power loss the name must not point at a file whose data never landed.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_export_dir(out_dir: str, *sources: str) -> None:
    """Refuse to export into `out_dir` when it is one of `sources` (the directories the export reads) or already
    holds safetensors weights anywhere below it: a second export's files would mix with the first's (a sharded
    index beside a single file: transformers and vital_jax would load different weights). A converted-model
    directory is refused too: the export would replace its config.json and remove its record. A directory marked
    by an interrupted export (`writing_export`) is accepted: the next export redoes it."""
    from vital_jax.models import model_dir

    real = os.path.realpath(out_dir)
    for source in sources:
        if real == os.path.realpath(source):
            raise SafetensorsError(f"{out_dir}: the export would overwrite its own source; give another --out")
    if not os.path.isdir(out_dir):
        return
    if model_dir.is_converted(out_dir) or os.path.isdir(os.path.join(out_dir, model_dir.PARAMS_DIR)):
        raise SafetensorsError(f"{out_dir}: holds a converted model ({model_dir.PARAMS_DIR}/); export into a new or "
                               "empty directory")
    if os.path.isfile(os.path.join(out_dir, UNFINISHED_FILE)):
        return   # an interrupted export: its weights are its own, and `writing_export` writes them again
    weights = sorted(os.path.relpath(os.path.join(root, name), out_dir)
                     for root, _, names in os.walk(out_dir) for name in names
                     if name.endswith(".safetensors") or name == INDEX_FILE)
    if weights:
        raise SafetensorsError(f"{out_dir}: already holds weights ({', '.join(weights[:3])}"
                               f"{', ...' if len(weights) > 3 else ''}); export into a new or empty directory")


@contextlib.contextmanager
def writing_export(out_dir: str) -> Iterator[None]:
    """Mark `out_dir` (checked by `check_export_dir`) as an unfinished export while the body writes it.

    The mark, written before anything else, lists the files and folders `out_dir` held then (no weights: the check
    refused them). An export killed midway (a kill mid-shard leaves shards, `*.safetensors.tmp` files) leaves the
    mark; the next export into `out_dir` removes the weights and temporary files that the list does not name (the
    interrupted export's own) and writes everything again. Nothing the list names, and no other file, is removed:
    the rest of what an export writes (config.json, tokenizer files, its record) is written over. The mark is
    removed last, so a directory without it is a finished export, refused by `check_export_dir` as before.
    """
    mark = os.path.join(out_dir, UNFINISHED_FILE)
    if os.path.isfile(mark):
        _remove_unfinished(out_dir, mark)
    else:
        os.makedirs(out_dir, exist_ok=True)
        held = _entries(out_dir)
        atomic_write(mark, lambda f: json.dump({"held_before": held}, f, indent=2))
    yield
    os.remove(mark)


def _entries(root: str) -> list[str]:
    """Files and folders below `root`, relative to it (symlinked folders are listed, not followed)."""
    out = []
    for parent, dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(parent, name), root) for name in dirs + files]
    return sorted(out)


def _is_partial_output(name: str) -> bool:
    # Weights and shards, their temporary files (`_write_file`) and jsonio.atomic_write's (the index, records).
    return (name.endswith((".safetensors", ".safetensors.tmp")) or name == INDEX_FILE
            or name.startswith(".tmp-"))


def _remove_unfinished(out_dir: str, mark: str) -> None:
    record = read_json(mark, SafetensorsError)
    if not isinstance(record, dict) or not isinstance(record.get("held_before"), list):
        raise SafetensorsError(f"{mark}: not the record of an unfinished export (no 'held_before' list); delete "
                               f"{out_dir} by hand if it holds only that export's files")
    held = set(record["held_before"])
    for parent, dirs, files in os.walk(out_dir, topdown=False):
        for name in files:
            if os.path.relpath(os.path.join(parent, name), out_dir) not in held and _is_partial_output(name):
                os.unlink(os.path.join(parent, name))
        for name in dirs:
            path = os.path.join(parent, name)
            if os.path.relpath(path, out_dir) not in held and not os.path.islink(path) and not os.listdir(path):
                os.rmdir(path)   # a folder the interrupted export made (scaffolding/decoder), left empty


def read_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file (a missing or unreadable file is a SafetensorsError naming it)."""
    if not os.path.isfile(path):
        raise SafetensorsError(f"{path}: no such file")
    return {name: read_tensor(ref) for name, ref in _file_tensors(path).items()}


def iter_tensors(model_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a checkpoint directory, in name order."""
    refs = index_tensors(model_dir)
    for name in sorted(refs):
        yield name, read_tensor(refs[name])
