"""Training checkpoints: one orbax CheckpointManager per curriculum phase (`workdir/phase_<n>/`).

A checkpoint holds the trainable parameters, the optimizer state, the step, the RNG key and the grain iterator
state; the frozen backbone is never written (it comes from the converted base checkpoint). Trees are stored
flattened to `{dotted.path: array}` so the optimizer's MaskedNode placeholders (frozen leaves) need no special
handling, and restored into the structure of a freshly initialised template state (with its shardings, so a
checkpoint restores onto a different mesh).

Resuming reads the newest checkpoint that can be read: one that cannot (a truncated tensor file, a garbage
iterator state) is moved aside to `<step>.unreadable-<time>` with a warning, never deleted. A save that fails
raises one CheckpointError naming the cause, after waiting for the save's background work.

How a save becomes final is `config.checkpoint.atomicity` (`ATOMICITY`): "rename" writes each step into a
temporary directory and renames it into place (orbax's way on a POSIX filesystem); "commit_file" writes the step
in place and finishes it with a `commit_success.txt`, for a Cloud Storage bucket mounted with gcsfuse, which
renames no directory of a flat bucket unless mounted with `--rename-dir-limit`. A step without its commit file
is unfinished and not read. "commit_file" also reads the steps an earlier part of the run saved by renaming.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vital_jax.jsonio import atomic_write, read_json
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.model_dir import whole_on_this_process

DONE_FILE = "DONE.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incompatible with the model, or the workdir belongs to another run."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's files cannot be read back (truncated, corrupted, not written by orbax)."""


# Errors of a restore that say nothing about the checkpoint's files: memory ran out (the device's, while the
# template and the restored state are both held; the host's), the filesystem refused access or timed out (a network
# mount). Treated as unreadable, `restore_latest` would move every checkpoint aside in turn and train from step 0.
_NOT_ABOUT_THE_FILES = (MemoryError, PermissionError, TimeoutError)
_NOT_ABOUT_THE_FILES_CODES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                              "Out of memory", "out of memory")


def _about_the_files(error: BaseException) -> bool:
    """Whether a restore error (or one it was raised from) can mean damaged files, rather than memory or access."""
    while error is not None:
        if isinstance(error, _NOT_ABOUT_THE_FILES) or any(c in str(error) for c in _NOT_ABOUT_THE_FILES_CODES):
            return False
        error = error.__cause__ or error.__context__
    return True


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


# config.checkpoint.atomicity -> how orbax finalises a save (see the module docstring).
ATOMICITY = {"rename": ocp.options.AtomicityMode.ATOMIC_RENAME, "commit_file": ocp.options.AtomicityMode.COMMIT_FILE}


def check_atomicity(checkpoint_config) -> None:
    """A ConfigError unless `config.checkpoint.atomicity` names one of `ATOMICITY` (absent: "rename")."""
    value = checkpoint_config.get("atomicity", "rename")
    if value not in ATOMICITY:
        raise ConfigError(f"config.checkpoint.atomicity={value!r} must be one of {tuple(ATOMICITY)} (\"commit_file\" "
                          "for a workdir on a gcsfuse-mounted bucket)")


class PhaseCheckpointer:
    """Save/restore the train state and data-iterator state of one curriculum phase.

    Use it as a context manager (or call `close`): leaving on an exception waits for the in-flight save without
    raising again, so the process does not exit while orbax's threads are still writing."""

    def __init__(self, directory: str, save_every_steps: int, keep: int = 2, async_save: bool = True,
                 atomicity: str = "rename"):
        if atomicity not in ATOMICITY:
            raise CheckpointError(f"checkpoint atomicity {atomicity!r} must be one of {tuple(ATOMICITY)}")
        _quiet_orbax_failure_aftermath()
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every_steps, max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True, atomicity_options=ocp.options.AtomicityOptions(
                mode=ATOMICITY[atomicity], allow_legacy_atomic_rename=atomicity == "commit_file"))
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
        self._saving: int | None = None  # the step of the last save started (async: maybe still in flight)
        self._closed = False

    @classmethod
    def from_config(cls, directory: str, checkpoint_config) -> PhaseCheckpointer:
        """The checkpointer a trainer's `config.checkpoint` section describes."""
        c = checkpoint_config
        return cls(directory, c.save_every_steps, c.keep, c.async_save, c.get("atomicity", "rename"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Save (every `save_every_steps`, or now with `force`). Async: call `wait()` before relying on it.
        A failed save (this one, or an async one before it) raises CheckpointError."""
        flat = flatten_state(state)
        if self._saving is not None and (force or self.manager.should_save(step)):
            self.wait()  # orbax would wait for the previous save here too, but then blame this step for its error
        previous, self._saving = self._saving, step
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                                    data=ocp.args.JsonSave(data_state)), force=force)
        except Exception as e:  # noqa: BLE001 - OSError, TensorStore's ValueError, orbax's own errors
            raise self._save_failed(step, e) from e
        if not saved:
            self._saving = previous
        return saved

    def restore(self, step: int, template) -> tuple[object, dict]:
        """Restore into `template`'s structure, dtypes and shardings. Returns (state, data_state).

        UnreadableCheckpointError when the checkpoint's files cannot be read, CheckpointError when they hold a
        different model/optimizer or the restore failed for want of memory or access (`_about_the_files`)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flatten_state(template))
        try:
            saved = self.manager.item_metadata(step)["state"]
            saved_shapes = {k: tuple(v.shape) for k, v in dict(saved).items()}
        except Exception as e:  # noqa: BLE001 - orbax raises several types for unreadable metadata
            raise self._restore_failed(step, e) from e
        want = {k: tuple(v.shape) for k, v in abstract.items()}
        if saved_shapes != want:
            diff = [f"{k}: saved {saved_shapes.get(k)}, model {want.get(k)}"
                    for k in sorted(set(saved_shapes) | set(want)) if saved_shapes.get(k) != want.get(k)]
            raise CheckpointError(f"{self.directory}: checkpoint {step} does not match the model/optimizer "
                                  f"(different config?): " + "; ".join(diff[:12]))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            data_state = restored["data"]
            if not isinstance(data_state, dict):
                raise ValueError(f"the data item holds {type(data_state).__name__}, not an iterator state")
        except Exception as e:  # noqa: BLE001 - TensorStore's ValueError, JSONDecodeError, OSError, ...
            raise self._restore_failed(step, e) from e
        return unflatten_state(dict(restored["state"]), template), dict(data_state)

    def _restore_failed(self, step: int, error: Exception) -> CheckpointError:
        if _about_the_files(error):
            return UnreadableCheckpointError(f"{self.directory}: cannot read checkpoint {step}: {_first_line(error)}")
        return CheckpointError(f"{self.directory}: could not restore checkpoint {step} ({_first_line(error)}); "
                               "left where it is, since the error is about memory or access, not its files: free "
                               "memory (or fix the filesystem's access) and rerun")

    def restore_latest(self, template) -> tuple[int, object, dict] | None:
        """The newest checkpoint that can be read, as (step, state, data_state); None when there is none.

        Each unreadable checkpoint on the way is moved aside to `<step>.unreadable-<time>` (never deleted) with a
        warning naming it and why. A checkpoint of a different model/optimizer is a CheckpointError: the older
        ones would differ as well."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                found, problem = self.restore(step, template), None
            except UnreadableCheckpointError as e:
                found, problem = None, e
            if not _readable_everywhere(problem is None):
                aside = self._move_aside(step)
                logging.warning("%s; skipped it (moved to %s) and trying the checkpoint before it",
                                problem or f"{self.directory}: checkpoint {step} is unreadable on another process",
                                aside)
                continue
            return step, *found
        return None

    def _move_aside(self, step: int) -> str:
        """Rename `step` to `<step>.unreadable-<time>` (process 0 only; every process reaches here for the same
        step, `_readable_everywhere`) and reload the manager's list of steps."""
        path = os.path.join(self.directory, str(step))
        aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:  # one process renames; the others skip the same unreadable step
            try:
                os.rename(path, aside)
            except OSError as e:  # gcsfuse: no directory renames in a flat bucket without --rename-dir-limit
                raise CheckpointError(f"{path}: unreadable, and it could not be moved aside to {aside} ({e}); move "
                                      "or delete it by hand, then rerun") from e
        if jax.process_count() > 1:  # no process may list the step after the rename: orbax would save on some only
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"vital_jax.checkpoint: {path} moved aside")
        self.manager.reload()
        return aside

    def wait(self) -> None:
        """Block until the last save is durable; a failed save raises CheckpointError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._saving, e) from e

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointError:
        global _a_save_failed
        _a_save_failed = True
        # The failed save leaves orbax coroutines that were never started; Python would warn about each at exit.
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
        return CheckpointError(f"{self.directory}: saving checkpoint {step if step is not None else '?'} failed: "
                               f"{_first_line(error)}")

    def mark_done(self, final_step: int) -> None:
        """Record that the phase finished at `final_step` (written after its last checkpoint is durable). Process 0
        writes it while the others wait: every process renaming onto one file of a shared workdir raced (gcsfuse
        does not make such renames atomic), and none may go on before the marker is there."""
        from vital_jax.distributed import on_primary

        self.wait()
        path = os.path.join(self.directory, DONE_FILE)
        on_primary(lambda: atomic_write(path, lambda f: json.dump({"final_step": int(final_step)}, f)),
                   f"write {path}")

    def done_step(self) -> int | None:
        return done_step(self.directory)

    def close(self) -> None:
        """Wait for the last save (CheckpointError if it failed) and release the manager; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except CheckpointError:
            self._release()
            raise
        self.manager.close()

    def abort(self) -> None:
        """`close` after an error: wait for the save in flight and release the manager, raising nothing (the
        error being handled is the one to report)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - a failed save is what brought us here, or is reported by then
            pass
        self._release()

    def _release(self) -> None:
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 - close() re-raises a failed save's error before releasing
            pass

    def __enter__(self) -> PhaseCheckpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def restore_saved_state(path: str) -> dict:
    """The flat {name: array} state of the checkpoint at `path` (<phase dir>/<step>/state), whole on this process's
    first device (`model_dir.whole_on_this_process`: whatever mesh and processes saved it; every process of a
    multi-process reader gets its own copy), for readers of a finished run (evaluation, export).
    UnreadableCheckpointError naming it when its files cannot be read."""
    try:
        # The item's own metadata: the checkpointer's would look for the step's metadata file in this item
        # directory (the manager keeps it one level up) and warn that it is missing on every read.
        target = whole_on_this_process(ocp.StandardCheckpointHandler().metadata(epath.Path(path)))
        with ocp.StandardCheckpointer() as c:
            return c.restore(path, target)
    except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise several types for damaged files
        raise UnreadableCheckpointError(
            f"{path}: cannot read the checkpoint ({_first_line(e)}); rerunning the training command moves it aside "
            "and trains again from the checkpoint before it") from e


def done_step(directory: str) -> int | None:
    """The final step a phase's DONE marker in `directory` records, or None: no marker, or one that cannot be read
    (a torn write), which is warned about and treated as not done, so that the run finishes the phase again from
    its last checkpoint and writes the marker anew."""
    path = os.path.join(directory, DONE_FILE)
    if not os.path.exists(path):
        return None
    try:
        record = read_json(path, CheckpointError)
        return int(record["final_step"])
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        logging.warning("%s: unreadable completion marker (%s); treating the phase as not finished", path,
                        _first_line(e))
        return None


def _readable_everywhere(readable_here: bool) -> bool:
    """Whether every process could read the checkpoint. Each process reads its own shards: one that fails would
    skip to an older step while the others resume from this one, and the processes would train on as replicas of
    different states. So a checkpoint any process cannot read is skipped by all."""
    if jax.process_count() == 1:
        return readable_here
    from vital_jax import distributed  # here: it imports the model packages, which a checkpoint does not need

    return not distributed.any_process(not readable_here)


def _first_line(error: BaseException) -> str:
    """The error's first line, without the TensorStore spec that orbax and TensorStore append (a page of JSON, as
    " [tensorstore_spec=..." or the repr of a bound `spec` method)."""
    text = str(error).strip() or type(error).__name__
    line = text.splitlines()[0]
    for tail in (" [tensorstore_spec=", "<bound method", "TensorStore({"):
        line = line.split(tail)[0]
    return line.rstrip(" :,(") or type(error).__name__


_quiet_installed = False
_a_save_failed = False


def _quiet_orbax_failure_aftermath() -> None:
    """Keep a failed save to the one CheckpointError that PhaseCheckpointer raises.

    When one tensor write of a save fails, orbax (`asyncio_utils._run_sync_via_new_loop`) closes its event loop
    while the save's other TensorStore writes are still in flight; as each completes, TensorStore's asyncio
    callback finds the loop closed and Python prints an unraisable `RuntimeError: Event loop is closed`
    traceback, hundreds for a real model's state. Those are dropped, as are the loop's coroutines finalised late
    and asyncio's reports of its abandoned futures ("Future exception was never retrieved": those that name
    orbax, and after a failed save all of them, as the process is ending with that error). Orbax's threads also
    each log the failure with a traceback: those are dropped unless logging is at DEBUG (`--verbosity=1`)."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _orbax_aftermath(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.get_absl_logger().addFilter(_drop_orbax_tracebacks)
    py_logging.getLogger("asyncio").addFilter(_drop_orbax_abandoned_tasks)


def _orbax_aftermath(unraisable) -> bool:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        tb = unraisable.exc_traceback
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
                return True
            tb = tb.tb_next
        return False
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine of a closed loop, finalised late
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _drop_orbax_tracebacks(record: py_logging.LogRecord) -> bool:
    if (record.levelno >= py_logging.ERROR and record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname
            and not logging.get_absl_logger().isEnabledFor(py_logging.DEBUG)):
        return False
    return True


def _drop_orbax_abandoned_tasks(record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR:
        return True
    if _a_save_failed or f"{os.sep}orbax{os.sep}" in record.getMessage():
        return False
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True
