"""Training checkpoints: one orbax CheckpointManager per curriculum phase (`workdir/phase_<n>/`).

A checkpoint holds the trainable parameters, the optimizer state, the step, the RNG key and the grain iterator
state; the frozen backbone is never written (it comes from the converted base checkpoint). Trees are stored
flattened to `{dotted.path: array}` so the optimizer's MaskedNode placeholders (frozen leaves) need no special
handling, and restored into the structure of a freshly initialised template state (with its shardings, so a
checkpoint restores onto a different mesh).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

DONE_FILE = "DONE.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incompatible with the model, or the workdir belongs to another run."""


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten_state(tree) -> dict[str, jax.Array]:
    """Pytree -> {'a.b.0.c': leaf}."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def unflatten_state(flat: dict, template):
    """Inverse of `flatten_state`, into `template`'s structure and dtypes (a checkpoint written with bf16 LoRA
    adapters restores into float32 master weights); shape mismatches are CheckpointErrors."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    problems = []
    for path, leaf in leaves:
        name = ".".join(_key_name(k) for k in path)
        if name not in flat:
            problems.append(f"missing {name}")
            continue
        value = flat[name]
        if tuple(np.shape(value)) != tuple(np.shape(leaf)):
            problems.append(f"{name}: checkpoint {tuple(np.shape(value))}, model {tuple(np.shape(leaf))}")
        elif hasattr(leaf, "dtype") and value.dtype != leaf.dtype:
            value = value.astype(leaf.dtype)
        out.append(value)
    extra = sorted(set(flat) - {".".join(_key_name(k) for k in p) for p, _ in leaves})
    problems += [f"unexpected {name}" for name in extra]
    if problems:
        raise CheckpointError("checkpoint does not match the model/optimizer (different config?): "
                              + "; ".join(problems[:12]) + (" ..." if len(problems) > 12 else ""))
    return jax.tree_util.tree_unflatten(treedef.treedef if hasattr(treedef, "treedef") else
                                        jax.tree_util.tree_structure(template), out)


class PhaseCheckpointer:
    """Save/restore the train state and data-iterator state of one curriculum phase."""

    def __init__(self, directory: str, save_every_steps: int, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every_steps, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Save (every `save_every_steps`, or now with `force`). Async: call `wait()` before relying on it."""
        flat = flatten_state(state)
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                               data=ocp.args.JsonSave(data_state)), force=force)

    def restore(self, step: int, template) -> tuple[object, dict]:
        """Restore into `template`'s structure, dtypes and shardings. Returns (state, data_state)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flatten_state(template))
        try:
            saved = self.manager.item_metadata(step)["state"]
            saved_shapes = {k: tuple(v.shape) for k, v in dict(saved).items()}
        except Exception as e:  # noqa: BLE001 - orbax raises several types for unreadable metadata
            raise CheckpointError(f"{self.directory}: cannot read checkpoint {step}: {e}") from e
        want = {k: tuple(v.shape) for k, v in abstract.items()}
        if saved_shapes != want:
            diff = [f"{k}: saved {saved_shapes.get(k)}, model {want.get(k)}"
                    for k in sorted(set(saved_shapes) | set(want)) if saved_shapes.get(k) != want.get(k)]
            raise CheckpointError(f"{self.directory}: checkpoint {step} does not match the model/optimizer "
                                  f"(different config?): " + "; ".join(diff[:12]))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      data=ocp.args.JsonRestore()))
        return unflatten_state(dict(restored["state"]), template), dict(restored["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def mark_done(self, final_step: int) -> None:
        """Record that the phase finished at `final_step` (written after its last checkpoint is durable)."""
        self.wait()
        tmp = os.path.join(self.directory, DONE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"final_step": int(final_step)}, f)
        os.replace(tmp, os.path.join(self.directory, DONE_FILE))

    def done_step(self) -> int | None:
        path = os.path.join(self.directory, DONE_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return int(json.load(f)["final_step"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# Fields that may differ between runs sharing a workdir (how long / how often, not what is trained).
RESUMABLE_FIELDS = ("checkpoint", "logging", "mesh", "demo.finish")


# Fields added to the config after workdirs were written, with the value the older code behaved as. A saved
# config without the field resumes only if the field has that value now (anything else would train differently).
ADDED_FIELDS = {"model.scan_layers": False, "vital.latent_input": "feedback", "data.blind_images": False}


def check_workdir_config(workdir: str, config_json: dict) -> None:
    """Save the resolved config beside the checkpoints, or refuse a workdir written by a different config."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        diffs = _diff(previous, config_json)
        diffs = [d for d in diffs if not any(d == f or d.startswith(f + ".") for f in RESUMABLE_FIELDS)]
        diffs = [d for d in diffs if not (d in ADDED_FIELDS and _lookup(previous, d) is _MISSING
                                          and _lookup(config_json, d) == ADDED_FIELDS[d])]
        if diffs:
            raise CheckpointError(f"{workdir} was written by a different config (fields differ: {', '.join(diffs)}); "
                                  "use a new --workdir or restore the original config")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


_MISSING = object()


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]
