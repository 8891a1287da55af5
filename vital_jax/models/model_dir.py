"""The converted-model directory: vital_jax's on-disk format for Flax weights of a HF model.

Layout of a directory written by `python -m conversion.hf_to_flax`:
  config.json           the HF config, verbatim (the architecture is always read from here)
  vital_jax.json        {"format": 1, "model_type": ..., "param_dtype": ...}
  params/               an orbax (OCDBT/zarr) checkpoint of the Flax 'params' tree
  tokenizer files etc.  every other small file of the HF directory (tokenizer.json, *_config.json, chat
                        template...), copied so a converted directory is self-contained.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from vital_jax.jsonio import atomic_write, read_json

FORMAT_VERSION = 1
META_FILE = "vital_jax.json"
PARAMS_DIR = "params"
# Weight files are converted, never copied.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


class ModelDirError(ValueError):
    """A converted-model directory is missing or malformed."""


def copy_side_files(src_dir: str, out_dir: str) -> list[str]:
    """Copy config.json, tokenizer and processor files (not weights) from `src_dir`; returns their names. A
    converted directory's record (META_FILE) is not a side file: it describes its own directory, and a copy
    would make the destination read as a converted one whose params/ are missing."""
    copied = []
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if (os.path.isfile(path) and not name.endswith(_SKIP_SUFFIXES) and name != META_FILE
                and os.path.getsize(path) < 64 * 2**20):
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def save(out_dir: str, params, hf_config: dict, param_dtype: str, side_files_from: str | None = None) -> list[str]:
    """Write `params` (a nested dict of arrays) and the HF config to `out_dir` (created; must be empty/new), with
    the side files of `side_files_from` (`copy_side_files`) copied before the record; returns their names."""
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, hf_config)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "config.json"), lambda f: json.dump(hf_config, f, indent=2))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, PARAMS_DIR), params)
        ckptr.wait_until_finished()
    copied = copy_side_files(side_files_from, out_dir) if side_files_from else []
    # Written last, after the side files: a directory without it is an unfinished conversion (`read_meta` says
    # so).
    atomic_write(os.path.join(out_dir, META_FILE),
                 lambda f: json.dump({"format": FORMAT_VERSION, "model_type": hf_config.get("model_type"),
                                      "param_dtype": param_dtype}, f, indent=2))
    return copied


def check_output_dir(out_dir: str, hf_config: dict) -> None:
    """Refuse to convert into `out_dir` when it holds converted params, weight files or another model's
    config.json: the conversion would overwrite that config.json and its record would hide the weights beside it
    (every loader reads a converted directory's params first). A conversion interrupted before its record (the
    same config.json, no params yet) may be run again into the same directory."""
    if os.path.exists(os.path.join(out_dir, PARAMS_DIR)):
        raise ModelDirError(f"{out_dir}: already holds converted params; choose a new output directory")
    if not os.path.isdir(out_dir):
        return
    weights = sorted(name for name in os.listdir(out_dir) if name.endswith(_SKIP_SUFFIXES))
    if weights:
        raise ModelDirError(f"{out_dir}: holds weights ({', '.join(weights[:3])}{', ...' if len(weights) > 3 else ''}"
                            "); convert into a new or empty directory")
    config = os.path.join(out_dir, "config.json")
    if os.path.exists(config) and read_json(config, ModelDirError) != hf_config:
        raise ModelDirError(f"{config}: the config of another model; convert into a new or empty directory")


def read_meta(model_dir: str) -> dict:
    path = os.path.join(model_dir, META_FILE)
    if not os.path.exists(path):
        unfinished = os.path.isdir(os.path.join(model_dir, PARAMS_DIR))
        raise ModelDirError(f"{model_dir}: no {META_FILE}; " + (
            "an unfinished conversion (params/ without its record): convert again into a new directory"
            if unfinished else "not a vital_jax converted-model directory (convert a HF checkpoint with "
                               "`python -m conversion.hf_to_flax`)"))
    meta = read_json(path, ModelDirError)
    if not isinstance(meta, dict):
        raise ModelDirError(f"{path}: not a converted-model record (a JSON object)")
    if meta.get("format") != FORMAT_VERSION:
        raise ModelDirError(f"{path}: format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    return meta


def _params_path(model_dir: str) -> str:
    read_meta(model_dir)
    path = os.path.abspath(os.path.join(model_dir, PARAMS_DIR))
    if not os.path.isdir(path):
        raise ModelDirError(f"{path}: missing; the converted-model directory has no parameters")
    return path


def _damaged(path: str, e: Exception) -> ModelDirError:
    return ModelDirError(f"{path}: the parameters cannot be read; the checkpoint is damaged "
                         f"({type(e).__name__}: {str(e)[:300]})")


def whole_on_this_process(tree):
    """ShapeDtypeStructs of `tree`'s leaves (arrays, ShapeDtypeStructs or orbax's array metadata), each placed
    whole on this process's first device: the restore target that reads an orbax checkpoint whatever mesh and
    processes saved it. Without one orbax restores "as saved" and refuses another topology (a conversion's one
    device read by the processes of a pod, a pod's checkpoint read by one evaluation process)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def load_params(model_dir: str, abstract_params) -> dict:
    """Restore the params tree, whole on this process's first device (`whole_on_this_process`);
    `abstract_params` (ShapeDtypeStructs) fixes structure, shapes and dtypes.

    A checkpoint whose tree or shapes differ from `abstract_params` raises a ModelDirError naming the directory;
    a missing or damaged one, a ModelDirError naming what is missing or damaged.
    """
    path = _params_path(model_dir)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            saved = ckptr.metadata(path)
            saved_tree = saved.item_metadata if hasattr(saved, "item_metadata") else saved
        except Exception as e:   # orbax raises its own and tensorstore's errors for a damaged checkpoint
            raise _damaged(path, e) from e
        if saved_tree is None:
            raise ModelDirError(f"{path}: unreadable orbax checkpoint (no metadata)")
        _check_same_shapes(saved_tree, abstract_params, model_dir)
        try:
            return ckptr.restore(path, whole_on_this_process(abstract_params))
        except Exception as e:   # the tree matched, so the data files are damaged (truncated, missing)
            raise _damaged(path, e) from e


def restore_saved(model_dir: str) -> dict:
    """The params tree as saved (its own structure and dtypes), whole on this process's first device, for readers
    that select from it (`hf_mapping.load_hf_params`); errors as `load_params`."""
    path = _params_path(model_dir)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, whole_on_this_process(ckptr.metadata(path).item_metadata))
        except Exception as e:
            raise _damaged(path, e) from e


def is_converted(directory: str) -> bool:
    """Whether `directory` is a converted-model directory (it has the record `save` writes last)."""
    return os.path.exists(os.path.join(directory, META_FILE))


def _check_same_shapes(saved_tree, abstract_params, model_dir: str) -> None:
    saved, want = _shapes(dict(saved_tree)), _shapes(dict(abstract_params))
    problems = [f"missing {k} {s}" for k, s in sorted(want.items()) if k not in saved]
    problems += [f"unexpected {k} {s}" for k, s in sorted(saved.items()) if k not in want]
    problems += [f"{k}: saved {saved[k]}, expected {s}" for k, s in sorted(want.items())
                 if k in saved and saved[k] != s]
    if problems:
        raise ModelDirError(f"{model_dir}: params do not match the config ({len(problems)} problem(s)):\n  "
                            + "\n  ".join(problems))


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} of a params tree's leaves (arrays, ShapeDtypeStructs or orbax's array metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def as_numpy(params):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
