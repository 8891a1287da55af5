"""The training entry point end to end on the demo assets: curriculum checkpoints, falling losses, kill -9 and
resume, SIGTERM, non-finite loss, config errors, failed starts, a workdir in use, unreadable checkpoints."""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import DEMO_TEST_OVERRIDES, demo_test_config, record_batch_preparation
from vital_jax import checkpoint as ckpt_lib
from vital_jax import sharding, train
from vital_jax.models.hf_config import ConfigError

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = DEMO_TEST_OVERRIDES


def _config(**changes):
    c = demo_test_config()
    for dotted, value in changes.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def assets(demo_assets):
    return demo_assets


def _workdir(tmp_path, assets, name):
    workdir = tmp_path / name
    shutil.copytree(assets, workdir / "demo")
    return str(workdir)


def _final_state(workdir, phase: int = 3):
    phase = os.path.join(workdir, f"phase_{phase}")
    step = json.load(open(os.path.join(phase, ckpt_lib.DONE_FILE)))["final_step"]
    with ocp.StandardCheckpointer() as c:
        return step, c.restore(os.path.join(phase, str(step), "state"))


def _run(workdir, *extra, wait=True):
    cmd = [sys.executable, "-m", "vital_jax.train", "--config=configs/demo.py", f"--workdir={workdir}", *OVERRIDES,
           *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_demo_curriculum_trains_every_phase_and_losses_fall(trained_demo_run):
    workdir = trained_demo_run
    for phase in (1, 2, 3):
        assert ckpt_lib.PhaseCheckpointer(os.path.join(workdir, f"phase_{phase}"), 4).done_step() is not None
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    first, last = lines[0], lines[-1]
    for term in ("task_loss", "text_loss", "visual_loss"):
        assert last[term] < first[term], (term, first[term], last[term])
    # Estimated MFU from the step's model FLOPs and the configured peak (0.01 TFLOP/s per device).
    assert all(0 < line["perf/mfu"] < 1e3 for line in lines[1:]), [line.get("perf/mfu") for line in lines]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["vital"]["k_max"] == 4
    # The frozen backbone is not in the training checkpoints: only trainable leaves are.
    _, state = _final_state(workdir)
    assert not any(k.startswith("params.backbone") and not k.rsplit(".", 1)[-1].startswith("lora_") for k in state)
    # Running again finds every phase done and trains nothing.
    step, _ = _final_state(workdir)
    again = train.train(_config(), workdir)
    assert again["step"] == step


def test_kill_minus_9_and_resume_equals_an_uninterrupted_run(tmp_path, assets, trained_demo_run):
    ref_step, ref_state = _final_state(trained_demo_run)

    workdir = _workdir(tmp_path, assets, "killed")
    proc = _run(workdir, wait=False)
    deadline = time.time() + 300
    # Kill as soon as phase 2 has a checkpoint (mid-curriculum, mid-phase).
    while time.time() < deadline and proc.poll() is None:
        phase2 = os.path.join(workdir, "phase_2")
        if os.path.isdir(phase2) and any(d.isdigit() for d in os.listdir(phase2)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not os.path.exists(os.path.join(workdir, "phase_3", ckpt_lib.DONE_FILE))
    res = _run(workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    # What the user reads: progress lines on stderr, a short summary on stdout (the JSON is in its file), and no
    # absl INFO lines (orbax logs each restore and save at INFO).
    assert f"training finished at step {ref_step}" in res.stdout and '"preempted"' not in res.stdout
    assert json.load(open(os.path.join(workdir, train.SUMMARY_FILE)))["step"] == ref_step
    assert "resuming from step" in res.stderr and "compiling the train step" in res.stderr
    # Resumed in phase 2, it compiled phase 3's train step while phase 2 trained (and got the same parameters).
    assert "phase 3: its train step was compiled ahead" in res.stderr, res.stderr[-3000:]
    assert not re.search(r"^I\d{4} ", res.stderr, re.M), res.stderr[-3000:]
    step, state = _final_state(workdir)
    assert step == ref_step and sorted(state) == sorted(ref_state)
    for name in ref_state:
        np.testing.assert_allclose(np.asarray(state[name]), np.asarray(ref_state[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_a_phase_scoped_schedule_restarts_each_phase_and_resumes_at_a_phase_boundary(tmp_path, assets):
    """optimizer.schedule_scope="phase": each phase warms up from lr 0 again and starts from fresh AdamW moments
    (separate runs warm-started from each other); a run resumed from phase 1's final checkpoint restarts phase
    2's moments as the uninterrupted run did, and ends with the same parameters."""
    # Two phases (K = 1, then K <= 2): one boundary is what is tested, and phase 3's K = 4 steps cost the most.
    c = _config(optimizer__schedule_scope="phase", logging__every_steps=1, curriculum__max_k=(1, 2),
                curriculum__epochs=(1, 1))
    workdir = _workdir(tmp_path, assets, "per_phase")
    train.train(c, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    starts = [row for prev, row in zip(rows, rows[1:]) if row["phase"] != prev["phase"]]
    assert len(starts) == 1 and all(row["learning_rate"] == 0.0 for row in [rows[0], *starts])
    assert all(row["learning_rate"] > 0 for row in rows if row not in starts and row is not rows[0])
    ref_step, ref_state = _final_state(workdir, phase=2)
    # Adam's bias-correction count restarted with phase 2's moments; the schedule's count is the global step.
    counts = sorted(int(np.asarray(v)) for k, v in ref_state.items() if "count" in k)
    assert counts == sorted([sum(row["phase"] == 2 for row in rows), ref_step]), (counts, sorted(ref_state))

    resumed = _workdir(tmp_path, assets, "per_phase_resumed")
    shutil.copytree(os.path.join(workdir, "phase_1"), os.path.join(resumed, "phase_1"))
    for name in ("config.json", "train_records.json"):
        shutil.copy(os.path.join(workdir, name), os.path.join(resumed, name))
    train.train(c, resumed)
    step, state = _final_state(resumed, phase=2)
    assert step == ref_step
    for name in ref_state:
        np.testing.assert_allclose(np.asarray(state[name]), np.asarray(ref_state[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, assets):
    workdir = _workdir(tmp_path, assets, "preempted")
    proc = _run(workdir, "--config.checkpoint.save_every_steps=1000", wait=False)
    deadline = time.time() + 300
    # The phase directory appears before the first step compiles; SIGTERM then lands during compilation or
    # training, and the loop must save after its current step.
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(workdir, "phase_1")):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "preempted at step" in out
    assert json.load(open(os.path.join(workdir, train.SUMMARY_FILE)))["preempted"] is True
    phase1 = os.path.join(workdir, "phase_1")
    assert any(d.isdigit() for d in os.listdir(phase1))


def test_non_finite_loss_names_step_and_records_and_keeps_the_last_checkpoint(tmp_path, assets):
    workdir = _workdir(tmp_path, assets, "nan")
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss .* at step \d+ .*batch records: \['") as e:
        train.train(_config(optimizer__lr=1e12), workdir)
    phase = os.path.join(workdir, "phase_1")
    newest = max((int(d) for d in os.listdir(phase) if d.isdigit()), default=None)
    # What a rerun does: resume from the newest checkpoint (the parameters the loss came from) or start again.
    assert (f"A rerun resumes from {phase}/{newest}, the parameters this loss was computed from" if newest is not None
            else "a rerun starts it again") in str(e.value)
    for step in (d for d in os.listdir(phase) if d.isdigit()):
        with ocp.StandardCheckpointer() as c:
            state = c.restore(os.path.join(phase, step, "state"))
        assert all(np.all(np.isfinite(np.asarray(v))) for v in state.values())


def test_per_step_visual_targets_train_from_the_demo_global_features(tmp_path, assets):
    """Appendix C.5's ablation end to end: the demo writes global_features.npy, the pipeline batches f_global and
    the interpolated targets train (one all-K phase, so K > 1 examples mix f_global in)."""
    workdir = _workdir(tmp_path, assets, "per_step")
    assert os.path.exists(os.path.join(workdir, "demo", "data", "global_features.npy"))
    c = _config(vital__visual_target="interpolated", curriculum__max_k=(4,), curriculum__epochs=(1,))
    c.curriculum.min_k = ()
    train.train(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    visual = [r["visual_loss"] for r in rows]
    assert visual and all(np.isfinite(visual)) and max(visual) > 0
    assert os.path.exists(os.path.join(workdir, "phase_1", ckpt_lib.DONE_FILE))


def test_config_errors_are_clear(tmp_path, assets):
    res = _run(str(tmp_path / "a"), "--config.vital.no_such_field=1")
    assert res.returncode != 0 and "unknown config field" in res.stderr and "no_such_field" in res.stderr
    res = _run(str(tmp_path / "b"), "--config.vital.k_max=four")
    assert res.returncode != 0 and "k_max" in res.stderr
    res = _run(str(tmp_path / "zero"), "--config.data.batch_size=0")
    assert res.returncode == 1 and "data.batch_size=0: must be >= 1" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not os.path.exists(str(tmp_path / "zero" / "config.json"))
    c = _config(demo__enabled=False)
    c.model.backbone_dir = str(tmp_path / "missing")
    c.model.decoder_dir = c.model.tokenizer_dir = c.data.data_dir = assets
    with pytest.raises(ConfigError, match="backbone_dir=.*missing.* does not exist"):
        train.train(c, str(tmp_path / "c"))
    # A workdir whose checkpoints another config wrote is refused, never silently re-initialised.
    from vital_jax import workdir as workdir_lib

    workdir = _workdir(tmp_path, assets, "other")
    os.makedirs(os.path.join(workdir, "phase_1", "4"))
    workdir_lib.check_workdir_config(workdir, json.loads(_config().to_json_best_effort()))
    with pytest.raises(ckpt_lib.CheckpointError, match="different config.*vital.lora_rank"):
        train.train(_config(vital__lora_rank=2), workdir)


def test_a_mesh_that_does_not_fit_the_devices_or_the_batch_is_one_config_error_before_any_work(tmp_path):
    import jax

    n = jax.device_count()
    workdir = str(tmp_path / "mesh")
    for shape, needle in [((n + 1, 1, 1), f"needs {n + 1} devices"), ((1.5, 1, 1), "sizes must be integers"),
                          ((0, 1, 1), "positive or -1"), ((-1, -1, 1), "at most one axis"), ((n, 1), "2 entries")]:
        with pytest.raises(ConfigError, match=rf"config.mesh.shape=.*{needle}.*set --config.mesh.shape"):
            train.train(_config(mesh__shape=shape), workdir)
    # The global batch must split over data x fsdp: 6 examples on 4 devices, from the command line.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    res = subprocess.run([sys.executable, "-m", "vital_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
                          *OVERRIDES, "--config.data.batch_size=6", "--config.mesh.shape=(2,2,1)"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "config.data.batch_size=6" in res.stderr and "a multiple of 4" in res.stderr, res.stderr[-3000:]
    assert not os.path.exists(workdir)  # refused before the demo's assets or anything else were written


def test_workdirs_written_before_a_config_field_existed_resume_only_with_its_old_value(tmp_path):
    from vital_jax import workdir as workdir_lib

    current = json.loads(_config().to_json_best_effort())
    assert current["model"]["scan_layers"] is False
    older = json.loads(json.dumps(current))
    del older["model"]["scan_layers"]  # a workdir from before `model.scan_layers` existed
    workdir = str(tmp_path / "old")
    workdir_lib.check_workdir_config(workdir, older)
    workdir_lib.check_workdir_config(workdir, current)  # same behaviour: accepted
    scanned = json.loads(json.dumps(current))
    scanned["model"]["scan_layers"] = True
    with pytest.raises(ckpt_lib.CheckpointError, match="model.scan_layers"):
        workdir_lib.check_workdir_config(workdir, scanned)
    # Only the listed added fields get this leniency: any other difference is still refused.
    other = json.loads(json.dumps(current))
    other["model"]["remat"] = not current["model"]["remat"]
    with pytest.raises(ckpt_lib.CheckpointError, match="model.remat"):
        workdir_lib.check_workdir_config(workdir, other)


def test_a_checkpoint_with_bf16_adapters_restores_into_float32_master_weights(tmp_path):
    """Checkpoints written before issue #18 hold bf16 adapters and moments: resuming a run and `run.load_run`
    (which unflattens the raw saved arrays) both give the float32 trees that training now keeps."""
    import jax
    import jax.numpy as jnp

    rng = np.random.RandomState(0)
    old = {"params": {"lora_a": jnp.asarray(rng.randn(8, 4) * 0.1, jnp.bfloat16),
                      "lora_b": jnp.asarray(rng.randn(4, 8) * 0.1, jnp.bfloat16)},
           "mu": {"lora_a": jnp.asarray(rng.randn(8, 4) * 1e-3, jnp.bfloat16)}, "step": jnp.int32(3)}
    template = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, old)
    ckpt = ckpt_lib.PhaseCheckpointer(str(tmp_path), 1, async_save=False)
    ckpt.save(3, old, {"epoch": 0}, force=True)
    resumed, _ = ckpt.restore(3, template)
    ckpt.close()
    with ocp.StandardCheckpointer() as c:
        raw = c.restore(os.path.join(str(tmp_path), "3", "state"))
    loaded = ckpt_lib.unflatten_state(dict(raw), template)
    for tree in (resumed, loaded):
        assert jax.tree.map(lambda x: x.dtype, tree) == jax.tree.map(lambda x: x.dtype, template)
        for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(old)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.asarray(got).dtype))


def test_a_start_that_fails_records_no_config_and_the_corrected_command_runs(tmp_path, assets):
    workdir = _workdir(tmp_path, assets, "failed_start")
    wrong = _config(demo__enabled=False)
    wrong.data.data_dir = str(tmp_path / "no_such_data")
    wrong.model.backbone_dir = wrong.model.decoder_dir = os.path.join(workdir, "demo", "pretrain", "backbone_hf")
    with pytest.raises(ConfigError, match="data_dir=.*no_such_data"):
        train.train(wrong, workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    # The corrected command (the demo, one short phase) is not refused as "written by a different config".
    fixed = _config(curriculum__max_k=(1,), curriculum__epochs=(1,))
    summary = train.train(fixed, workdir)
    assert not summary["preempted"] and summary["step"] > 0
    assert json.load(open(os.path.join(workdir, "config.json")))["curriculum"]["max_k"] == [1]


def test_a_second_run_is_refused_while_a_run_holds_the_workdir(tmp_path, assets):
    workdir = _workdir(tmp_path, assets, "busy")
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands for a running train
    try:
        with open(os.path.join(workdir, "RUNNING.lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": first.pid, "process_start": _process_start(first.pid),
                       "since": "2025-01-01 00:00:00"}, f)
        res = _run(workdir)
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
        assert f"is in use by another run (pid {first.pid}" in res.stderr and "Traceback" not in res.stderr
        assert not os.path.exists(os.path.join(workdir, "phase_1"))  # refused before anything was written
    finally:
        first.kill()
        first.wait()


def _process_start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None


def test_resume_falls_back_past_unreadable_checkpoints_and_logs_each_step_once(tmp_path, trained_demo_run, caplog):
    ref_step, ref_state = _final_state(trained_demo_run)
    workdir = str(tmp_path / "corrupted")
    shutil.copytree(trained_demo_run, workdir)
    phase3 = os.path.join(workdir, "phase_3")
    steps = sorted((int(d) for d in os.listdir(phase3) if d.isdigit()), reverse=True)
    for path in glob.glob(os.path.join(phase3, str(steps[0]), "state", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)  # the final checkpoint's tensors, cut short
    for step in steps[1:]:
        with open(os.path.join(phase3, str(step), "data", "metadata"), "w") as f:
            f.write("\x00garbage{")  # and the iterator state of the ones before it
    summary = train.train(_config(), workdir)
    # Phase 3 had nothing readable: it is trained again from phase 2's last checkpoint, to the same weights.
    assert summary["step"] == ref_step
    step, state = _final_state(workdir)
    for name in ref_state:
        np.testing.assert_allclose(np.asarray(state[name]), np.asarray(ref_state[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    skipped = [r.getMessage() for r in caplog.records if "cannot read checkpoint" in r.getMessage()]
    assert len(skipped) == len(steps) and all("moved to" in m for m in skipped), skipped
    assert sorted(d.split(".")[0] for d in os.listdir(phase3) if ".unreadable-" in d) == sorted(map(str, steps))
    # metrics.jsonl holds each step once; the rows of the phase trained again were moved aside, not lost.
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = [r["step"] for r in rows]
    assert logged == sorted(set(logged)) and rows[-1]["step"] == ref_step
    original = [json.loads(line)["step"] for line in open(os.path.join(trained_demo_run, "metrics.jsonl"))]
    assert logged == original
    rewound = [json.loads(line) for line in open(os.path.join(workdir, "metrics.rewound.jsonl"))]
    assert rewound and all(r["phase"] == 3 for r in rewound)


def test_a_run_does_not_resume_on_other_training_records(tmp_path, trained_demo_run):
    """The records a run started with are recorded at its first step; resuming after they changed (records added
    or removed) is refused before anything is loaded: the data order, the schedule and the checkpoint's iterator
    position are functions of them (removed records used to end in grain's IndexError, added ones went unseen)."""
    from vital_jax.data.records import RECORDS_FILE, read_records, write_records

    workdir = str(tmp_path / "changed")
    shutil.copytree(trained_demo_run, workdir)
    assert json.load(open(os.path.join(workdir, "train_records.json")))["records"] > 0
    records_path = os.path.join(workdir, "demo", "data", RECORDS_FILE)
    records = read_records(records_path)
    train_rows = [i for i, r in enumerate(records) if r.split == "train"]
    write_records(records_path, [r for i, r in enumerate(records) if i != train_rows[-1]])
    with pytest.raises(ckpt_lib.CheckpointError, match=r"training records changed since this run started \("
                                                       rf"train_records.json: {len(train_rows)} records, now "
                                                       rf"{len(train_rows) - 1}"):
        train.train(_config(), workdir)


def test_max_steps_cuts_the_curriculum_where_its_budget_runs_out(monkeypatch):
    from vital_jax.data import pipeline

    # Records per phase (K <= 1, <= 2, <= 4) at batch size 2: 5, 10 and 20 steps per epoch.
    sizes = {1: 10, 2: 20, 4: 40}
    monkeypatch.setattr(pipeline, "select_records", lambda data_dir, split, max_k, low=1: list(range(sizes[max_k])))
    c = _config(data__batch_size=2, curriculum__max_k=(1, 2, 4), curriculum__epochs=(1, 2, 1))
    assert train.phase_steps(c, "/data") == [5, 20, 20]
    for budget, expected in ((0, [5, 20, 20]), (1, [1, 0, 0]), (12, [5, 7, 0]), (30, [5, 20, 5]), (99, [5, 20, 20])):
        c.curriculum.max_steps = budget
        assert train.phase_steps(c, "/data") == expected
        assert train.phase_steps(c, "/data", capped=False) == [5, 20, 20]
    c.curriculum.max_steps = -1
    with pytest.raises(ConfigError, match="curriculum.max_steps=-1"):
        train.validate_config(c)


def test_max_steps_ends_training_early_and_every_phase_still_has_its_checkpoint(tmp_path, assets):
    from vital_jax.run import load_run

    workdir = _workdir(tmp_path, assets, "budget")
    full = train.phase_steps(_config(), train.resolve_paths(_config(), workdir).data_dir)
    assert full[0] > 3  # the budget ends inside phase 1: phases 2 and 3 take no step
    # Saved as on a gcsfuse-mounted bucket (the other tests save by renaming): finished in place, read back alike.
    config = _config(curriculum__max_steps=3, checkpoint__atomicity="commit_file")
    summary = train.train(config, workdir)
    assert summary["step"] == 3 and not summary["preempted"]
    assert os.path.exists(os.path.join(workdir, "phase_1", "3", "commit_success.txt"))
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert max(steps) == 3
    for phase in (1, 2, 3):
        done = json.load(open(os.path.join(workdir, f"phase_{phase}", ckpt_lib.DONE_FILE)))
        assert done["final_step"] == 3, phase
    assert load_run(workdir).params  # the run loads like any finished one
    rerun = train.train(config, workdir)  # a rerun finds it complete, trains nothing
    assert rerun["step"] == 3 and rerun["metrics"] == summary["metrics"]   # and reports what the run logged
    assert [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == steps


def test_each_batch_is_prepared_while_the_step_before_it_runs(tmp_path, assets, monkeypatch):
    """The loop reads and copies batch N+1 after dispatching step N and before reading its loss (logged right
    after the read), not after: the host's work overlaps the devices'."""
    events = []
    record_batch_preparation(train, events, monkeypatch)
    workdir = _workdir(tmp_path, assets, "ahead")
    summary = train.train(_config(curriculum__max_steps=3, logging__every_steps=1), workdir)
    assert summary["step"] == 3
    assert events == ["prepare", "prepare", "log 1", "prepare", "log 2", "log 3"]  # none past the last step


def test_the_medsynapse_demo_builds_its_assets_under_the_workdirs_lock(tmp_path, monkeypatch):
    """As VITAL's demo does: two runs starting at once would otherwise build the same assets at the same time."""
    from configs import medsynapse_demo
    from vital_jax import workdir as workdir_lib

    lock = tmp_path / workdir_lib.LOCK_FILE
    holders = []

    def prepare_demo(workdir, demo):
        holders.append(json.loads(lock.read_text())["pid"])
        raise RuntimeError("the assets are not built in this test")

    monkeypatch.setattr(train, "prepare_demo", prepare_demo)
    with pytest.raises(RuntimeError, match="not built in this test"):
        train.train_medsynapse(medsynapse_demo.get_config(), str(tmp_path))
    assert holders == [os.getpid()] and not lock.exists()  # released on the way out


def test_batch_shapes_of_another_width_and_k_are_those_of_a_real_batch(assets):
    """The abstract batch a later program is compiled for equals the abstract of a real batch of that prompt
    width and number of latent slots, shardings included."""
    import jax

    from vital_jax import distributed
    from vital_jax.data.pipeline import make_train_iterator
    from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
    from vital_jax.run import resolve_paths
    from vital_jax.vital.batch import slice_latent_slots

    config = _config()
    paths = resolve_paths(config, os.path.dirname(assets))
    model_config = Qwen3VLConfig.from_pretrained(paths.backbone_dir)
    mesh = sharding.mesh_from_config(config)
    records = next(make_train_iterator(paths.data_dir, paths.tokenizer_dir, train.pipeline_config(config), k_max=1,
                                       num_epochs=1))
    narrow = slice_latent_slots(records, 1)
    width = narrow["prompt_ids"].shape[1]
    wide_width = width + 16
    pad = wide_width - width
    wide = dict(records, prompt_ids=np.pad(narrow["prompt_ids"], ((0, 0), (pad, 0)),
                                          constant_values=narrow["prompt_ids"][0, 0]),
                prompt_valid=np.pad(narrow["prompt_valid"], ((0, 0), (pad, 0))))
    assert not narrow["prompt_valid"][:, 0].all()  # left padding: the pad column holds the pad id
    real = distributed.global_vital_batch(slice_latent_slots(wide, 2), model_config, mesh)
    made = train.batch_shapes(distributed.global_vital_batch(narrow, model_config, mesh), wide_width, 2)
    assert jax.tree.structure(made) == jax.tree.structure(real)
    for a, b in zip(jax.tree.leaves(made), jax.tree.leaves(real)):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)


def test_programs_compiled_ahead_are_the_jitted_step_and_others_fall_through():
    import functools

    import jax
    import jax.numpy as jnp

    from vital_jax.vital.batch import VitalBatch

    mesh = sharding.mesh_from_config(_config())

    def step(state, frozen, batch):
        x = batch.prefix.input_ids.astype(jnp.float32).sum() + batch.step_ids.astype(jnp.float32).sum()
        return state * frozen + x, {"loss": x}

    step_fn = jax.jit(step, donate_argnums=(0,))

    def make(width, slots):
        from vital_jax.models.qwen3_vl.cached import PrefixInputs

        prefix = PrefixInputs(input_ids=jnp.ones((2, width), jnp.int32), token_valid=jnp.ones((2, width), bool),
                              positions=jnp.zeros((3, 2, width), jnp.int32))
        return VitalBatch(prefix=prefix, answer_ids=jnp.ones((2, 3), jnp.int32), answer_valid=jnp.ones((2, 3), bool),
                          latent_steps=jnp.ones((2,), jnp.int32), step_ids=jnp.ones((2, slots, 5), jnp.int32),
                          step_valid=jnp.ones((2, slots, 5), bool), roi_feature=jnp.zeros((2, 4)),
                          example_valid=jnp.ones((2,), bool))

    first = make(8, 1)
    args = sharding.abstract_of(jnp.ones(3)), sharding.abstract_of(jnp.full(3, 2.0))
    calls = []

    def widths(values):
        calls.append(values)
        return values

    ahead = train.AheadPrograms(step_fn, args, functools.partial(train.batch_shapes, first),
                                [(1, lambda: widths([8, 16])), (4, lambda: widths([8]))], mesh,
                                skip_key=train._shape_key(first))
    try:
        assert ahead.get(make(16, 1)) is not None and ahead.get(make(8, 4)) is not None
        assert ahead.get(first) is None  # the caller compiles that one itself
        assert ahead.get(make(32, 1)) is None and ahead.get(make(8, 2)) is None  # not in the plan
        program = ahead.get(make(8, 4))
        with jax.set_mesh(mesh):
            got = program(jnp.ones(3), jnp.full(3, 2.0), make(8, 4))
            want = step_fn(jnp.ones(3), jnp.full(3, 2.0), make(8, 4))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        assert calls == [[8, 16], [8]]
    finally:
        ahead.close()

    def failing(state, frozen, batch):
        raise TypeError("this step does not trace")

    broken = train.AheadPrograms(jax.jit(failing), args, functools.partial(train.batch_shapes, first),
                                 [(4, lambda: [8])], mesh)
    broken._thread.join()  # get() answers None (the caller compiles) until the thread has planned the program
    with pytest.raises(TypeError, match="does not trace"):
        broken.get(make(8, 4))
