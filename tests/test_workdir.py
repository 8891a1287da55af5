"""A run's workdir: which recorded config binds it, and the lock that keeps a second run out."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from vital_jax import checkpoint as ckpt_lib
from vital_jax import workdir as workdir_lib

CONFIG = {"data": {"batch_size": 8}, "vital": {"lora_rank": 64}, "checkpoint": {"keep": 2}}


def _with(**changes):
    config = json.loads(json.dumps(CONFIG))
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        config[section][field] = value
    return config


def test_a_recorded_config_without_checkpoints_binds_nothing(tmp_path):
    workdir = str(tmp_path)
    workdir_lib.record_workdir_config(workdir, _with(data__batch_size=0))  # a start that failed
    workdir_lib.check_workdir_config(workdir, CONFIG, record=False)  # the corrected command is accepted ...
    assert not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE))  # ... and records its own later
    workdir_lib.record_workdir_config(workdir, CONFIG)
    workdir_lib.record_workdir_config(workdir, _with(vital__lora_rank=2))  # recording never overwrites
    assert json.load(open(os.path.join(workdir, workdir_lib.CONFIG_FILE))) == CONFIG
    # Once a checkpoint exists, the recorded config binds: a different one is refused, a resumable field is not.
    os.makedirs(os.path.join(workdir, "phase_1", "4"))
    with pytest.raises(ckpt_lib.CheckpointError, match="different config.*vital.lora_rank"):
        workdir_lib.check_workdir_config(workdir, _with(vital__lora_rank=2), record=False)
    workdir_lib.check_workdir_config(workdir, _with(checkpoint__keep=5), record=False)


def test_the_study_records_and_binds_its_config_at_once(tmp_path):
    workdir = str(tmp_path)
    workdir_lib.check_workdir_config(workdir, CONFIG)
    with pytest.raises(ckpt_lib.CheckpointError, match="data.batch_size"):
        workdir_lib.check_workdir_config(workdir, _with(data__batch_size=4))


def _write_lock(workdir, **holder):
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:
        json.dump(holder, f)


def test_a_second_run_on_a_workdir_is_refused_while_the_first_runs(tmp_path):
    workdir = str(tmp_path)
    with workdir_lib.WorkdirLock(workdir):
        with pytest.raises(workdir_lib.WorkdirInUseError, match=rf"in use by another run \(pid {os.getpid()} "):
            workdir_lib.WorkdirLock(workdir).acquire()
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))  # released on the way out
    # A run in another process on this host, still running.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(workdir, host=socket.gethostname(), pid=other.pid,
                    process_start=workdir_lib._process_start(other.pid), since="2025-01-01 00:00:00")
        with pytest.raises(workdir_lib.WorkdirInUseError, match=f"pid {other.pid}.*still running"):
            workdir_lib.WorkdirLock(workdir).acquire()
    finally:
        other.kill()
        other.wait()


def test_a_killed_runs_lock_is_taken_over_and_another_hosts_lock_names_the_file(tmp_path, caplog):
    workdir = str(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid no longer runs: the lock of a run killed with -9
    _write_lock(workdir, host=socket.gethostname(), pid=gone.pid, process_start=1, since="2025-01-01 00:00:00")
    with workdir_lib.WorkdirLock(workdir):
        holder = json.load(open(os.path.join(workdir, workdir_lib.LOCK_FILE)))
        assert holder["pid"] == os.getpid()
    assert any("taking over the lock" in r.getMessage() for r in caplog.records)
    if workdir_lib._process_start(os.getpid()) is not None:  # /proc: a pid reused by a later process is told apart
        _write_lock(workdir, host=socket.gethostname(), pid=os.getpid(), process_start=-1,
                    since="2025-01-01 00:00:00")
        with workdir_lib.WorkdirLock(workdir):
            pass
    lock = os.path.join(workdir, workdir_lib.LOCK_FILE)
    _write_lock(workdir, host="elsewhere-" + socket.gethostname(), pid=1, since="2025-01-01 00:00:00")
    with pytest.raises(workdir_lib.WorkdirInUseError, match=f"on host elsewhere-.*delete {lock}"):
        workdir_lib.WorkdirLock(workdir).acquire()


def test_taking_the_lock_outside_a_distributed_run_does_not_start_jax(tmp_path, monkeypatch):
    """A dataset build takes the lock too: starting JAX's backends for it would, on a GPU, reserve most of the
    GPU's memory for as long as the build asks its teacher."""
    monkeypatch.setattr(workdir_lib.jax, "process_index", lambda: pytest.fail("jax.process_index() was called"))
    with workdir_lib.WorkdirLock(str(tmp_path)):
        assert os.path.exists(os.path.join(str(tmp_path), workdir_lib.LOCK_FILE))


def test_a_lock_left_empty_by_a_run_killed_while_starting_is_taken_over_once_old(tmp_path, caplog):
    lock = os.path.join(str(tmp_path), workdir_lib.LOCK_FILE)
    open(lock, "w").close()  # created, never written: killed between the two
    old = time.time() - 2 * workdir_lib._UNWRITTEN_LOCK_SECONDS
    os.utime(lock, (old, old))
    with workdir_lib.WorkdirLock(str(tmp_path)):
        assert json.load(open(lock))["pid"] == os.getpid()
    assert any("left empty or unreadable" in r.getMessage() for r in caplog.records)


def test_two_runs_that_find_the_same_stale_lock_do_not_both_take_the_workdir(tmp_path, monkeypatch):
    """Run B finds a dead run's lock; before B removes it, run A takes it over. B must then find A's lock and
    refuse, not remove it (which left both training in one workdir)."""
    workdir = str(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(workdir, host=socket.gethostname(), pid=gone.pid, process_start=1, since="2025-01-01 00:00:00")
    first = workdir_lib.WorkdirLock(workdir)
    is_stale = workdir_lib._lock_is_stale
    interleaved = []

    def stale_then_a_takes_over(holder):
        if not interleaved:  # B has read the dead run's lock and judged it: A runs now
            interleaved.append(True)
            first.acquire()
        return is_stale(holder)

    monkeypatch.setattr(workdir_lib, "_lock_is_stale", stale_then_a_takes_over)
    with pytest.raises(workdir_lib.WorkdirInUseError, match="still running"):
        workdir_lib.WorkdirLock(workdir).acquire()  # B
    assert interleaved and json.load(open(os.path.join(workdir, workdir_lib.LOCK_FILE)))["pid"] == os.getpid()
    first.release()


def test_training_records_bind_a_workdir_only_once_a_checkpoint_holds_a_data_position(tmp_path, caplog):
    workdir = str(tmp_path)
    before, after = {"records": 12, "sha256": "a" * 64}, {"records": 11, "sha256": "b" * 64}
    workdir_lib.check_train_records(workdir, before, record=True)
    # Stopped before its first checkpoint (a record's NaN loss), the record fixed: the rerun starts afresh.
    workdir_lib.check_train_records(workdir, after, record=False)
    assert any("saved no checkpoint" in r.getMessage() for r in caplog.records)
    workdir_lib.check_train_records(workdir, after, record=True)
    assert json.load(open(os.path.join(workdir, workdir_lib.TRAIN_RECORDS_FILE))) == after
    os.makedirs(os.path.join(workdir, "phase_1", "4"))  # now it has a checkpoint to resume
    with pytest.raises(ckpt_lib.CheckpointError, match="the training records changed since this run started"):
        workdir_lib.check_train_records(workdir, before, record=False)


def test_a_run_resumes_on_another_number_of_processes_only_with_the_same_global_batch(tmp_path, caplog):
    workdir = str(tmp_path)
    workdir_lib.record_workdir_config(workdir, CONFIG)   # started on 2 processes x batch 8: 16 per step
    os.makedirs(os.path.join(workdir, "phase_1", "4"))
    # A workdir recorded before the global batch was: its per-process batch binds like any field.
    with pytest.raises(ckpt_lib.CheckpointError, match="fields differ: data.batch_size"):
        workdir_lib.check_workdir_config(workdir, _with(data__batch_size=16), record=False)
    workdir_lib.check_global_batch(workdir, {"data.batch_size": 8}, 2, record=True)
    assert json.load(open(os.path.join(workdir, workdir_lib.GLOBAL_BATCH_FILE))) == {
        "global_batch": {"data.batch_size": 16}}
    # One process with batch 16, four with 4: the same 16 records per step.
    for processes, batch in ((1, 16), (4, 4), (2, 8)):
        workdir_lib.check_workdir_config(workdir, _with(data__batch_size=batch), record=False)
        workdir_lib.check_global_batch(workdir, {"data.batch_size": batch}, processes, record=False)
    # One process with batch 8 would count steps of 8: refused, naming both, by the global batch check only.
    workdir_lib.check_workdir_config(workdir, CONFIG, record=False)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"data.batch_size = 16; this command gives 1 x 8 = 8.*"
                                                       r"global one / P"):
        workdir_lib.check_global_batch(workdir, {"data.batch_size": 8}, 1, record=False)
    # A field the record does not hold yet (a stage added later) is checked from its first step on.
    workdir_lib.check_global_batch(workdir, {"data.batch_size": 8, "medsynapse.ccr.rollout_prompts": 2}, 2,
                                   record=False)
    workdir_lib.check_global_batch(workdir, {"data.batch_size": 4, "medsynapse.ccr.rollout_prompts": 1}, 4,
                                   record=True)
    assert json.load(open(os.path.join(workdir, workdir_lib.GLOBAL_BATCH_FILE)))["global_batch"] == {
        "data.batch_size": 16, "medsynapse.ccr.rollout_prompts": 4}
    with pytest.raises(ckpt_lib.CheckpointError, match="medsynapse.ccr.rollout_prompts = 4"):
        workdir_lib.check_global_batch(workdir, {"data.batch_size": 16, "medsynapse.ccr.rollout_prompts": 2}, 1,
                                       record=False)
    # Without a checkpoint the record binds nothing: replaced, with a warning.
    os.rmdir(os.path.join(workdir, "phase_1", "4"))
    workdir_lib.check_global_batch(workdir, {"data.batch_size": 8}, 1, record=False)
    assert not os.path.exists(os.path.join(workdir, workdir_lib.GLOBAL_BATCH_FILE))
    assert any("saved no checkpoint" in r.getMessage() for r in caplog.records)


def test_a_recorded_config_reads_back_with_the_fields_added_since_at_their_old_values(tmp_path):
    """`run.read_config` fills every field of ADDED_FIELDS / ADDED_RESUMABLE_FIELDS that a workdir written before it
    lacks, with the value older code behaved as; sections the run never had (a VITAL run's medsynapse) stay absent,
    and recorded values are kept."""
    from vital_jax.run import read_config

    from configs import demo

    recorded = json.loads(demo.get_config().to_json())
    for dotted in {**workdir_lib.ADDED_FIELDS, **workdir_lib.ADDED_RESUMABLE_FIELDS}:
        section, *rest = dotted.split(".")
        if section in recorded and len(rest) == 1:
            recorded[section].pop(rest[0], None)
    recorded.pop("medsynapse", None)
    recorded["model"]["attention_impl"] = "dot_product"
    (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(recorded))
    config = read_config(str(tmp_path))
    assert config.model.attention_impl == "dot_product"  # recorded: kept
    assert config.model.remat_policy == "full" and config.model.scan_layers is False
    assert config.vital.latent_input == "feedback" and config.data.blind_images is False
    assert config.curriculum.max_steps == 0
    assert "medsynapse" not in config
    for dotted, value in {**workdir_lib.ADDED_FIELDS, **workdir_lib.ADDED_RESUMABLE_FIELDS}.items():
        if not dotted.startswith("medsynapse.") and dotted != "model.attention_impl":
            section, name = dotted.split(".")
            assert config[section][name] == value, dotted

    # A MedSynapse-V run recorded before the IMT options existed gets them at their old values.
    recorded["medsynapse"] = {"imt": {"lr": 1e-4}}
    (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(recorded))
    config = read_config(str(tmp_path))
    assert config.medsynapse.imt.memory_match == 0.0 and config.medsynapse.imt.init == "random"
    assert config.medsynapse.memory_position == "assistant_turn"  # older code wrote the memory after the prompt
    assert config.medsynapse.rollout_relayout is False  # older code decoded rollouts in the layout held
    assert config.medsynapse.imt.lr == 1e-4


def test_a_url_workdir_is_refused_by_the_library_entry_points_too(tmp_path, monkeypatch):
    """train(), pretrain() and MedSynapse-V's trainer take workdirs from Python as well as from the command line:
    a URL is a ConfigError before anything is written (abspath would make gs://b/run a local ./gs:/b/run)."""
    from vital_jax.models.hf_config import ConfigError

    monkeypatch.chdir(tmp_path)
    for url in ("gs://bucket/run", "s3://b/r", "file:///tmp/x"):
        with pytest.raises(ConfigError, match=f"workdir {url} is a URL"):
            workdir_lib.local_workdir(url)
    assert workdir_lib.local_workdir("runs/gs_like:name") == str(tmp_path / "runs" / "gs_like:name")
    from configs import demo
    from vital_jax import train as train_lib

    with pytest.raises(ConfigError, match="is a URL"):
        train_lib.train(demo.get_config(), "gs://bucket/run")
    assert os.listdir(tmp_path) == []
