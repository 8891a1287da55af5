"""PhaseCheckpointer on a small state: resuming past unreadable checkpoints, and a failed save reported once."""

import glob
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vital_jax import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed):
    rng = np.random.RandomState(seed)
    return {"params": {"w": jnp.asarray(rng.randn(64, 32), jnp.float32)}, "step": jnp.int32(seed)}


def _save_steps(directory, steps):
    with ckpt_lib.PhaseCheckpointer(directory, 1, keep=len(steps), async_save=False) as ckpt:
        for step in steps:
            ckpt.save(step, _state(step), {"next": step}, force=True)


def test_resume_skips_unreadable_checkpoints_and_moves_them_aside(tmp_path, caplog):
    directory = str(tmp_path / "phase_1")
    _save_steps(directory, (1, 2, 3))
    for path in glob.glob(os.path.join(directory, "3", "state", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:  # truncated tensor files (a disk that filled up, a copy cut short)
            f.truncate(os.path.getsize(path) // 2)
    with open(os.path.join(directory, "2", "data", "metadata"), "w") as f:
        f.write("\x00garbage{")  # an iterator state that is not JSON
    with ckpt_lib.PhaseCheckpointer(directory, 1, keep=3, async_save=False) as ckpt:
        step, state, data_state = ckpt.restore_latest(_state(0))
        assert ckpt.manager.all_steps() == [1]
    assert step == 1 and data_state == {"next": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(1)["params"]["w"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cannot read checkpoint 3" in w and "unreadable" in w for w in warnings), warnings
    assert any("cannot read checkpoint 2" in w for w in warnings), warnings
    # One readable line each: no TensorStore spec (a page of JSON) pasted in.
    assert not any("TensorStore(" in w or "tensorstore_spec" in w or "bound method" in w for w in warnings)
    # Nothing is deleted: the unreadable checkpoints are kept beside, under names orbax does not take for steps.
    aside = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.unreadable-*")))
    assert [name.split(".")[0] for name in aside] == ["2", "3"]
    assert os.path.exists(os.path.join(directory, aside[0], "data", "metadata"))


@pytest.mark.parametrize("error", [MemoryError(), PermissionError(13, "Permission denied"),
                                   RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.0GiB")],
                         ids=["host memory", "access", "device memory"])
def test_a_restore_that_fails_for_memory_or_access_moves_no_checkpoint_aside(tmp_path, monkeypatch, error):
    """Moved aside as unreadable, every checkpoint would go in turn and training would start again from step 0."""
    directory = str(tmp_path / "phase_1")
    _save_steps(directory, (1, 2))

    def fails(*args, **kwargs):
        raise error

    with ckpt_lib.PhaseCheckpointer(directory, 1, keep=2, async_save=False) as ckpt:
        monkeypatch.setattr(ckpt.manager, "restore", fails)
        with pytest.raises(ckpt_lib.CheckpointError, match="could not restore checkpoint 2 .*memory or access") as e:
            ckpt.restore_latest(_state(0))
        assert not isinstance(e.value, ckpt_lib.UnreadableCheckpointError)
    assert not glob.glob(os.path.join(directory, "*.unreadable-*"))
    assert os.path.isdir(os.path.join(directory, "1")) and os.path.isdir(os.path.join(directory, "2"))


def test_a_checkpoint_another_process_cannot_read_is_skipped_by_every_process(tmp_path, monkeypatch, caplog):
    """Each process reads its own shards; one that skipped to an older step alone would train on as a replica of
    another state. Here this process reads step 2, the other process cannot."""
    from jax.experimental import multihost_utils

    monkeypatch.setattr(ckpt_lib.jax, "process_count", lambda: 2)
    # Gathered: each process's "could not read" (`distributed.any_process`); the other one could not.
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([np.asarray(x), np.asarray(True)]))
    assert ckpt_lib._readable_everywhere(True) is False
    monkeypatch.undo()  # orbax asks jax for the process count too

    directory = str(tmp_path / "phase_1")
    _save_steps(directory, (1, 2))
    monkeypatch.setattr(ckpt_lib, "_readable_everywhere", lambda here, steps=iter((False, True)): here and next(steps))
    with ckpt_lib.PhaseCheckpointer(directory, 1, keep=2, async_save=False) as ckpt:
        step, _, data_state = ckpt.restore_latest(_state(0))
    assert step == 1 and data_state == {"next": 1}
    assert "checkpoint 2 is unreadable on another process" in caplog.text
    assert [os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(directory, "*.unreadable-*"))] == ["2"]


def test_no_readable_checkpoint_resumes_from_nothing_and_a_different_model_is_still_an_error(tmp_path):
    directory = str(tmp_path / "phase_1")
    _save_steps(directory, (1,))
    with ckpt_lib.PhaseCheckpointer(directory, 1, async_save=False) as ckpt:
        with pytest.raises(ckpt_lib.CheckpointError, match="does not match the model"):
            ckpt.restore_latest({"params": {"w": jnp.zeros((8, 8))}, "step": jnp.int32(0)})
    assert os.path.isdir(os.path.join(directory, "1"))  # a mismatch is not unreadable: nothing moved
    with open(os.path.join(directory, "1", "data", "metadata"), "w") as f:
        f.write("[1, 2")
    with ckpt_lib.PhaseCheckpointer(directory, 1, async_save=False) as ckpt:
        assert ckpt.restore_latest(_state(0)) is None


# A save that fails while TensorStore writes are in flight: a file-size limit makes every tensor file write fail
# (EFBIG), as a full disk does. Before, this printed one "Event loop is closed" traceback per write still in
# flight, plus orbax's thread tracebacks; now it is one error naming the cause.
_FAILING_SAVE = textwrap.dedent("""
    import resource, signal, sys
    import jax.numpy as jnp
    import numpy as np
    from vital_jax import checkpoint as ckpt_lib

    state = {f"w{i}": jnp.asarray(np.random.rand(256, 64).astype(np.float32)) for i in range(100)}
    ckpt = ckpt_lib.PhaseCheckpointer(sys.argv[1], 1, async_save=sys.argv[2] == "async")
    try:
        try:
            ckpt.save(1, state, {"next": 1})
            ckpt.wait()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (32768, resource.RLIM_INFINITY))
            for step in range(2, 5):
                ckpt.save(step, state, {"next": step})
        finally:
            ckpt.close()
    except ckpt_lib.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE/EFBIG behaviour is Linux's")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_save_is_one_error_naming_the_cause(tmp_path, mode):
    res = subprocess.run([sys.executable, "-c", _FAILING_SAVE, str(tmp_path / "phase_1"), mode], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    lines = res.stderr.splitlines()
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Event loop is closed" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "saving checkpoint 2 failed" in errors[0] and "File too large" in errors[0], lines
    assert len(lines) <= 3, lines


def test_only_process_0_writes_the_done_marker(tmp_path, monkeypatch):
    """Every process of a multi-process run called mark_done and renamed its own copy onto the shared file."""
    from vital_jax import distributed

    directory = str(tmp_path / "phase_1")
    _save_steps(directory, (1, 2))
    monkeypatch.setattr(distributed, "process_position", lambda: (1, 2))
    monkeypatch.setattr(distributed, "_primary_outcome", lambda ok: True)  # process 0 wrote it
    with ckpt_lib.PhaseCheckpointer(directory, 1, async_save=False) as ckpt:
        ckpt.mark_done(2)
        assert ckpt.done_step() is None and not os.path.exists(os.path.join(directory, ckpt_lib.DONE_FILE))
        monkeypatch.setattr(distributed, "process_position", lambda: (0, 2))
        ckpt.mark_done(2)
        assert ckpt.done_step() == 2


@pytest.mark.parametrize("torn", ["", '{"final_st', "[1]", '{"final_step": "x"}'])
def test_an_unreadable_done_marker_means_not_done_and_is_written_anew(tmp_path, caplog, torn):
    """A torn DONE.json (a crash mid-write) is warned about and read as 'not finished', so the phase is finished
    again from its last checkpoint, instead of a JSONDecodeError on every later run."""
    directory = str(tmp_path / "phase_1")
    _save_steps(directory, (1, 2))
    with ckpt_lib.PhaseCheckpointer(directory, 1, async_save=False) as ckpt:
        ckpt.mark_done(2)
        assert ckpt.done_step() == 2
        with open(os.path.join(directory, ckpt_lib.DONE_FILE), "w") as f:
            f.write(torn)
        assert ckpt.done_step() is None and ckpt_lib.done_step(directory) is None
        assert "unreadable completion marker" in caplog.text and ckpt_lib.DONE_FILE in caplog.text
        ckpt.mark_done(2)
        assert ckpt.done_step() == 2


def _no_directory_renames(monkeypatch):
    """A filesystem like a flat Cloud Storage bucket under gcsfuse (no --rename-dir-limit): files rename,
    directories do not."""
    import pathlib

    rename, path_rename = os.rename, pathlib.Path.rename

    def refuse(source):
        if os.path.isdir(source):
            raise OSError(95, "Operation not supported", str(source))

    monkeypatch.setattr(os, "rename", lambda a, b, *k, **kw: refuse(a) or rename(a, b, *k, **kw))
    monkeypatch.setattr(pathlib.Path, "rename", lambda self, target: refuse(self) or path_rename(self, target))


def test_commit_file_atomicity_saves_and_resumes_where_directories_cannot_be_renamed(tmp_path, monkeypatch):
    directory = str(tmp_path / "phase_1")
    _save_steps(directory, (1,))  # an earlier part of the run, saved by renaming
    _no_directory_renames(monkeypatch)
    monkeypatch.setattr(ckpt_lib, "_a_save_failed", False)  # the failed save below sets it for this process
    with pytest.raises(ckpt_lib.CheckpointError, match="saving checkpoint 2 failed.*not supported"):
        with ckpt_lib.PhaseCheckpointer(directory, 1, keep=3, async_save=False) as ckpt:
            ckpt.save(2, _state(2), {"next": 2}, force=True)
    for async_save in (False, True):
        with ckpt_lib.PhaseCheckpointer(directory, 1, keep=3, async_save=async_save, atomicity="commit_file") as ckpt:
            ckpt.save(3 + async_save, _state(3 + async_save), {"next": 3 + async_save}, force=True)
    assert os.path.exists(os.path.join(directory, "4", "commit_success.txt"))
    with ckpt_lib.PhaseCheckpointer(directory, 1, keep=3, atomicity="commit_file") as ckpt:
        assert ckpt.manager.all_steps() == [1, 3, 4]  # the renamed step 1 is read too
        step, state, data_state = ckpt.restore_latest(_state(0))
        assert (step, data_state) == (4, {"next": 4})
        np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(4)["params"]["w"]))
        assert ckpt.restore(1, _state(0))[1] == {"next": 1}
        # An unreadable step that cannot be moved aside there is an error naming it, not a loop or a deletion.
        with open(os.path.join(directory, "4", "data", "metadata"), "w") as f:
            f.write("\x00garbage{")
        with pytest.raises(ckpt_lib.CheckpointError, match=r"4: unreadable, and it could not be moved aside.*by hand"):
            ckpt.restore_latest(_state(0))


def test_an_unknown_atomicity_is_a_config_error_naming_the_choices():
    import ml_collections

    from vital_jax.models.hf_config import ConfigError

    with pytest.raises(ConfigError, match=r"config.checkpoint.atomicity='atomic'.*\('rename', 'commit_file'\)"):
        ckpt_lib.check_atomicity(ml_collections.ConfigDict(dict(atomicity="atomic")))
    ckpt_lib.check_atomicity(ml_collections.ConfigDict(dict(keep=1)))  # absent: "rename"


# Saved by a process of 2 devices, each array sharded over both (a mesh this test process does not have): a
# training checkpoint through PhaseCheckpointer and a converted-model directory through model_dir.save.
_SAVE_ON_TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from vital_jax import checkpoint as ckpt_lib
    from vital_jax.models import model_dir
    assert jax.device_count() == 2
    rows = NamedSharding(jax.make_mesh((2,), ("data",)), PartitionSpec("data"))
    w = jax.device_put(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), rows)
    with ckpt_lib.PhaseCheckpointer(sys.argv[1], 1, keep=1, async_save=False) as ckpt:
        ckpt.save(3, {"params": {"w": w}, "step": jnp.int32(3)}, {"next": 3}, force=True)
    model_dir.save(sys.argv[2], {"w": w}, {"model_type": "qwen3"}, "float32")
""")


def test_checkpoints_saved_on_another_topology_read_whole_on_this_process(tmp_path):
    """Restored "as saved", orbax refused a checkpoint written on other devices ("Topology mismatch"): a pod's run
    could not be evaluated by one process, nor a conversion (one device) loaded by the processes of a pod."""
    from vital_jax.models import model_dir

    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, "-c", _SAVE_ON_TWO_DEVICES, str(tmp_path / "phase_1"),
                          str(tmp_path / "converted")], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    want = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    state = ckpt_lib.restore_saved_state(str(tmp_path / "phase_1" / "3" / "state"))
    np.testing.assert_array_equal(np.asarray(state["params.w"]), want)
    assert int(state["step"]) == 3 and state["params.w"].sharding.num_devices == 1
    saved = model_dir.restore_saved(str(tmp_path / "converted"))
    np.testing.assert_array_equal(np.asarray(saved["w"]), want)
    loaded = model_dir.load_params(str(tmp_path / "converted"), {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(loaded["w"]), want)
