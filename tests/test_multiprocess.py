"""Multi-host support: the distributed-initialisation decision, and a real two-process VITAL run on localhost.

The two-process run starts `jax.distributed` with a loopback coordinator (127.0.0.1:<free port>) and gloo CPU
collectives; each process owns 2 CPU devices and supplies half of the global batch (with its own prompt length
and patch bucket). Two train steps must reproduce a single-process, single-device run of the same batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests import fast_compile
from vital_jax import checkpoint as ckpt_lib
from vital_jax import distributed
from vital_jax import workdir as workdir_lib

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")


# ---------------------------------------------------------------------------------------------- the decision
def test_single_process_is_a_no_op():
    assert distributed.plan_distributed(env={}, tpu_vm=False).method == "none"
    assert distributed.plan_distributed(num_processes=1, env={}, tpu_vm=False).method == "none"
    slurm_one = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0"}
    assert distributed.plan_distributed(env=slurm_one, tpu_vm=False).method == "none"


def test_a_single_process_given_device_ids_uses_only_those(monkeypatch):
    """VITAL_NUM_PROCESSES=1 with VITAL_LOCAL_DEVICE_IDS (local_multiprocess.sh with NUM_PROCESSES=1
    GPUS_PER_PROC=2): the ids were dropped with jax.distributed, and the process took every GPU of the machine."""
    import jax

    env = {"VITAL_NUM_PROCESSES": "1", "VITAL_LOCAL_DEVICE_IDS": "0,1"}
    plan = distributed.plan_distributed(env=env, tpu_vm=False)
    assert plan.method == "none" and plan.kwargs == {"local_device_ids": [0, 1]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = {k: jax.config.values[k] for k in ("jax_cuda_visible_devices", "jax_rocm_visible_devices")}
    try:
        assert distributed.maybe_initialize_distributed().method == "none"
        assert jax.config.values["jax_cuda_visible_devices"] == "0,1"
        assert jax.config.values["jax_rocm_visible_devices"] == "0,1"
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def test_explicit_arguments_and_environment():
    env = {"VITAL_COORDINATOR": "10.0.0.1:1234", "VITAL_NUM_PROCESSES": "4", "VITAL_PROCESS_ID": "3"}
    plan = distributed.plan_distributed(env=env, tpu_vm=False)
    assert plan.method == "explicit"
    assert plan.kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                           "cluster_detection_method": "deactivate"}
    plan = distributed.plan_distributed("h:1", 2, 0, env={"VITAL_LOCAL_DEVICE_IDS": "0,1"}, tpu_vm=False)
    assert plan.kwargs == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
                           "local_device_ids": [0, 1]}
    with pytest.raises(ValueError, match="missing: process_id"):
        distributed.plan_distributed("h:1", 2, env={}, tpu_vm=False)
    with pytest.raises(ValueError, match="outside"):
        distributed.plan_distributed("h:1", 2, 2, env={}, tpu_vm=False)
    assert distributed.plan_distributed(env={**env, "VITAL_DISTRIBUTED": "off"}).method == "none"


@pytest.mark.parametrize("env, needle", [
    ({"VITAL_NUM_PROCESSES": "two"}, "VITAL_NUM_PROCESSES='two' is not an integer"),
    ({"VITAL_PROCESS_ID": "first"}, "VITAL_PROCESS_ID='first' is not an integer"),
    ({"VITAL_NUM_PROCESSES": "0"}, "VITAL_NUM_PROCESSES=0: set the number of processes"),
    ({"VITAL_PROCESS_ID": "-1"}, r"VITAL_PROCESS_ID=-1 is outside \[0, 2\)"),
    ({"VITAL_NUM_PROCESSES": "1", "VITAL_PROCESS_ID": "3"}, "VITAL_PROCESS_ID=3 is outside"),
    ({"VITAL_LOCAL_DEVICE_IDS": "0,a"}, "VITAL_LOCAL_DEVICE_IDS='0,a'"),
    ({"VITAL_LOCAL_DEVICE_IDS": "-1"}, "VITAL_LOCAL_DEVICE_IDS='-1'"),
    ({"VITAL_LOCAL_DEVICE_IDS": "0,0"}, "VITAL_LOCAL_DEVICE_IDS='0,0'"),
    ({"VITAL_DISTRIBUTED": "disable"}, "VITAL_DISTRIBUTED='disable': set on, off or auto"),
])
def test_a_malformed_environment_is_one_error_naming_the_variable(env, needle):
    base = {"VITAL_COORDINATOR": "h:1", "VITAL_NUM_PROCESSES": "2", "VITAL_PROCESS_ID": "0"}
    with pytest.raises(distributed.DistributedSetupError, match=needle):
        distributed.plan_distributed(env={**base, **env}, tpu_vm=False)


def test_slurm_detection_and_gpus_per_task():
    base = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "5",
            "SLURM_LOCALID": "5", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8"}
    plan = distributed.plan_distributed(env=base, tpu_vm=False)
    assert plan.method == "slurm" and plan.kwargs == {}  # one task per GPU: jax picks GPU SLURM_LOCALID
    per_node = {**base, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4"}
    plan = distributed.plan_distributed(env=per_node, tpu_vm=False)
    assert plan.method == "slurm" and plan.kwargs == {"local_device_ids": [0, 1, 2, 3]}
    del per_node["SLURM_GPUS_ON_NODE"]
    with pytest.raises(ValueError, match="VITAL_LOCAL_DEVICE_IDS"):
        distributed.plan_distributed(env=per_node, tpu_vm=False)


def test_tpu_vm_and_forced_auto_detection():
    assert distributed.plan_distributed(env={}, tpu_vm=True).method == "tpu"
    assert distributed.plan_distributed(env={"VITAL_DISTRIBUTED": "on"}, tpu_vm=False).method == "auto"


def test_maybe_initialize_is_a_no_op_here_and_process_zero_is_primary():
    assert distributed.maybe_initialize_distributed().method in ("none", "already")
    assert distributed.is_primary()


def test_global_batch_in_one_process_equals_the_plain_batch():
    import jax
    import numpy as np

    from tests import multiprocess_worker as worker
    from vital_jax import sharding
    from vital_jax.vital.batch import from_numpy

    model = worker.tiny_model()
    data = worker.tiny_data(model, pad_patches_to=64)
    expected = from_numpy(data, model.backbone_config)
    # Re-packed local batch: a smaller patch bucket, no all-padding prompt columns.
    local = worker.select_rows(data, range(8), pad_patches_to=60)
    mesh = sharding.make_mesh((-1, 1, 1))
    batch = distributed.global_vital_batch(local, model.backbone_config, mesh)
    assert batch.prefix.pixel_patches.shape == (60, 16)
    # One batch shard: the patches are in batch order, so the explicit index is the implicit one (the k-th image
    # token of the batch takes merged row k). Several shards are checked on 8 devices (tests/test_sharding.py).
    index = np.asarray(batch.prefix.image_feature_index)
    image_tokens = (local["prompt_ids"] == worker.IMG) & local["prompt_valid"]
    np.testing.assert_array_equal(index[image_tokens], np.arange(image_tokens.sum()))
    batch = batch.replace(prefix=batch.prefix.replace(image_feature_index=None))
    got, want = jax.tree_util.tree_flatten_with_path(batch)[0], jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, x), (_, y) in zip(got, want):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:  # the packed per-patch arrays: 60 rows here, 64 in the plain batch
            assert x.shape[0] == 60 and y.shape[0] == 64, path
            y = y[:60]
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env(config: str, workdir, **extra: str) -> dict:
    """The environment of a `launch/local_multiprocess.sh` run of two processes: this repository importable, no
    multi-process variables or XLA flags of this test process (the launcher sets its own), then `extra`."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), NUM_PROCESSES="2",
               CONFIG=config, WORKDIR=str(workdir), PORT=str(_free_port()))
    for key in ("XLA_FLAGS", "VITAL_COORDINATOR", "VITAL_NUM_PROCESSES", "VITAL_PROCESS_ID", "VITAL_DISTRIBUTED"):
        env.pop(key, None)
    return {**env, **extra}


def _both_processes_refuse(env: dict, workdir, args: list[str], message: str) -> None:
    """The launcher run fails, each process's log saying `message` without a traceback, and no demo was built."""
    res = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    for i in range(2):
        log = (workdir / "logs" / f"process_{i}.log").read_text()
        assert message in log and "Traceback" not in log, log[-3000:]
    assert not (workdir / "demo").exists()


def _start(args: list[str], log_path: str) -> tuple[subprocess.Popen, object]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    for key in ("VITAL_COORDINATOR", "VITAL_NUM_PROCESSES", "VITAL_PROCESS_ID", "VITAL_DISTRIBUTED"):
        env.pop(key, None)
    err = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=err, text=True,
                            env=env, cwd=REPO)
    return proc, err


def _results(proc: subprocess.Popen) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]


def _run_all(procs: dict, tmp_path, timeout: float = 300) -> dict:
    """Wait for the started workers (killing any still running at the deadline); fail naming the ones that
    failed, with their logs; returns each worker's first result line."""
    deadline = time.time() + timeout
    try:
        for proc, _ in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, err in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
    logs = {name: open(tmp_path / f"{'reference' if name == 'reference' else f'p{name}'}.log").read()
            for name in procs}
    failed = {name: proc.returncode for name, (proc, _) in procs.items() if proc.returncode != 0}
    if failed:
        hint = ""
        if any("collective" in log.lower() or "gloo" in log.lower() for log in logs.values()):
            hint = ("\nCPU cross-process collectives (gloo) look unavailable in this jax build: multi-process CPU "
                    "training cannot be tested here.")
        tails = "\n".join(f"--- {name} (rc {rc}) ---\n{logs[name][-3000:]}" for name, rc in failed.items())
        pytest.fail(f"worker(s) failed or timed out: {failed}{hint}\n{tails}")
    return {name: _results(proc)[0] for name, (proc, _) in procs.items()}


def _two_processes_and_reference(reference_mode: str, process_mode: str, tmp_path) -> dict:
    """Two train steps three ways at once: `reference_mode` on one device, and `process_mode` as processes 0 and 1
    of a 2-process x 2-device mesh (data 2, fsdp 2) on a loopback coordinator; each worker's result line."""
    common = ["--devices", "2", "--num_processes", "2", "--coordinator", f"127.0.0.1:{_free_port()}",
              "--mesh", "2,2,1", "--steps", "2"]
    procs = {
        "reference": _start([reference_mode, "--steps", "2"], str(tmp_path / "reference.log")),
        0: _start([process_mode, "--process_id", "0", *common], str(tmp_path / "p0.log")),
        1: _start([process_mode, "--process_id", "1", *common], str(tmp_path / "p1.log")),
    }
    return _run_all(procs, tmp_path)


def test_two_processes_reproduce_the_single_process_run(tmp_path):
    out = _two_processes_and_reference("reference", "process", tmp_path)
    reference = out["reference"]
    results = [out[i] for i in (0, 1)]
    assert reference["num_processes"] == 1 and reference["devices"] == 1
    for i, r in enumerate(results):
        assert r["process_id"] == i and r["num_processes"] == 2
        assert r["devices"] == 4 and r["local_devices"] == 2
        assert r["primary"] == (i == 0)
        # Same global batch, same parameters: losses of both steps and the parameter checksum agree with one device
        # up to float32 reduction order (1e-5 relative).
        assert r["losses"] == pytest.approx(reference["losses"], rel=1e-5), (r["losses"], reference["losses"])
        assert r["checksum"] == pytest.approx(reference["checksum"], rel=1e-6)
    assert results[0]["losses"] != pytest.approx([results[0]["losses"][0]] * 2, rel=1e-4)  # the step trained
    assert sorted(results[0]["rows"] + results[1]["rows"]) == list(range(8))
    # Process 1's prompts are shorter: the global batch left-pads them to the longest prompt of all processes.
    assert results[1]["local_prompt_len"] < results[1]["global_prompt_len"] == results[0]["global_prompt_len"]
    # The logged throughput counts the global batch on every process (it counted process 0's examples x 2 and its
    # own prompt width): all examples, each with the global prompt width, and one FLOP count for the step.
    assert results[0]["logged_work"] == results[1]["logged_work"]
    assert results[1]["logged_work"]["tokens"] == reference["logged_work"]["tokens"]
    assert results[1]["logged_work"]["samples"] == reference["logged_work"]["samples"] == 8
    # A tensor axis spanning both processes' devices puts one batch shard on two processes: refused by
    # check_mesh (before any model loads), not by jax at the first step.
    for r in results:
        checks = r["mesh_checks"]
        assert checks["(-1, 1, 1)"] is None and checks["(2, 1, 2)"] is None, checks
        assert checks["(1, 1, 4)"].startswith("ConfigError") and "places 4 of the 4 examples" in checks["(1, 1, 4)"]
        assert "at most 2" in checks["(1, 1, 4)"], checks


def test_two_processes_run_stage_ii_grpo_like_one(tmp_path):
    """MedSynapse-V's Stage II on a global batch split over 2 processes x 2 devices (mesh data 2, fsdp 2): each
    process decodes and scores only its own prompts' completions (`grpo.host_accuracy`), and the rewards,
    losses and trained adapters equal one process on one device (1e-5 relative: float32 reduction order)."""
    out = _two_processes_and_reference("grpo", "grpo", tmp_path)
    reference = out["reference"]
    assert reference["num_processes"] == 1 and reference["devices"] == 1
    assert sorted(out[0]["rows"] + out[1]["rows"]) == list(range(8)) and out[0]["rows"] != out[1]["rows"]
    for i in (0, 1):
        assert out[i]["num_processes"] == 2 and out[i]["devices"] == 4
        for got, want in zip(out[i]["history"], reference["history"]):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (i, key, got, want)
        assert out[i]["checksum"] == pytest.approx(reference["checksum"], rel=1e-6)
    # The run trained, and the rewards are not all one value (so a mis-assigned row would show).
    assert reference["checksum"] != pytest.approx(out[0]["checksum"] + 1.0)
    assert 0 < reference["history"][0]["r_acc"] < 1
    # `distributed.host_copy` (mean_teacher_memory's read of P_phi): leaves sharded across the two processes are
    # gathered whole on each, equal to the single process's copy.
    assert reference["host_copy"]["gathered_leaves"] == 0 and reference["host_copy"]["numpy"]
    for i in (0, 1):
        assert out[i]["host_copy"]["gathered_leaves"] > 0 and out[i]["host_copy"]["numpy"], out[i]["host_copy"]
        assert out[i]["host_copy"]["checksum"] == reference["host_copy"]["checksum"]


def test_a_demo_that_pretrains_is_refused_by_each_of_two_processes_before_anything_is_built(tmp_path):
    """A demo that pretrains its own VLM cannot be built by several processes (pretraining is single-process): one
    config error on each, before anything is built."""
    from tests.conftest import DEMO_TEST_OVERRIDES

    _both_processes_refuse(_launcher_env("configs/demo.py", tmp_path / "pretrain"), tmp_path / "pretrain",
                           DEMO_TEST_OVERRIDES, "error: config.demo.pretrain='quick'")


def test_two_train_processes_build_stop_resume_and_finish_the_demo(tmp_path):
    """The demo through `launch/local_multiprocess.sh`, one launch after another on one workdir (one test: each
    launch is mostly start-up and compilation):
    1. process 0 builds the demo's assets while process 1 waits (two builders writing the same files left every
       record twice);
    2. SIGTERM to process 1 alone stops both at the same step with one checkpoint (saving is collective: a process
       saving alone waited for the others forever);
    3. one process with twice the per-process batch (the same global batch) resumes there and trains to the end:
       a checkpoint of a 2 x 2-device mesh over two processes restores on one device, the loader position with it;
    4. the rerun on two processes finishes the run: process 0 alone evaluates, explains and exports it while
       process 1 waits for it (both did all of it, writing eval/ and export_hf/ at once), and neither exits before
       the artefacts are written;
    5. a rerun whose finish fails on process 0 fails on process 1 too, saying so."""
    import signal

    from vital_jax.data.records import RECORDS_FILE, read_records

    workdir = tmp_path / "run"
    # A 2 x 2 mesh (the fsdp axis spans the processes), a few steps: start-up and compile time are what count.
    # SIGTERM is sent once step 1 is logged and must land before the last step: 24 steps leave it ~2x the time
    # 12 did, for a few seconds more of training.
    max_steps = 24
    env = _launcher_env("configs/demo.py", workdir, DEVICES_PER_PROC="2", XLA_FLAGS=fast_compile.added_to(""))
    args = ["--config.demo.split_counts=(24, 1, 1)", "--config.data.batch_size=2",
            f"--config.curriculum.max_steps={max_steps}", "--config.mesh.shape=(2,2,1)",
            "--config.checkpoint.async_save=False", "--config.logging.every_steps=1"]
    launch = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), *args]

    def logs() -> list[str]:
        return [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)]

    launcher = subprocess.Popen(launch, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.time() + 400
        while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text().strip():
            assert launcher.poll() is None and time.time() < deadline, ("the run ended or never trained", logs())
            time.sleep(0.05)  # the SIGTERM below must land before the last step: poll often
        lock = json.loads((workdir / "RUNNING.lock").read_text())
        children = subprocess.run(["pgrep", "-f", "--", f"--workdir={workdir}"], capture_output=True, text=True).stdout
        others = [int(p) for p in children.split() if int(p) != lock["pid"]]
        assert len(others) == 1, (children, lock)
        os.kill(others[0], signal.SIGTERM)  # process 1 only
        assert launcher.wait(timeout=240) == 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    records = read_records(str(workdir / "demo" / "data" / RECORDS_FILE))
    assert (workdir / "demo" / "READY.json").exists() and len({r.id for r in records}) == len(records)
    first = logs()
    assert all("preempted at step" in log for log in first), [log[-2000:] for log in first]
    step = int(re.search(r"preempted at step (\d+)", first[0]).group(1))
    assert step < max_steps and f"preempted at step {step}" in first[1] and list(workdir.glob(f"phase_*/{step}"))

    # That checkpoint, saved by two processes on a 2 x 2 mesh, reads whole in this one-device process (restored
    # "as saved", orbax refused the other topology), as an evaluation on one host reads a pod's run.
    saved = ckpt_lib.restore_saved_state(str(next(workdir.glob(f"phase_*/{step}")) / "state"))
    assert int(saved["step"]) == step and all(x.is_fully_addressable for x in saved.values())

    # The rest of the training on one process of batch 4 (the finish left to the two-process rerun below).
    single = [a for a in args if not a.startswith(("--config.data.batch_size", "--config.mesh.shape"))]
    res = subprocess.run([sys.executable, "-m", "vital_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
                          *single, "--config.data.batch_size=4", "--config.mesh.shape=(1,1,1)",
                          "--config.demo.finish=False"], env=dict(env, XLA_FLAGS=fast_compile.added_to("")),
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from step {step}" in res.stderr and f"training finished at step {max_steps}" in res.stdout
    assert json.loads((workdir / workdir_lib.GLOBAL_BATCH_FILE).read_text()) == {"global_batch": {"data.batch_size": 4}}

    env["PORT"] = str(_free_port())
    res = subprocess.run(launch, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    finished = logs()
    assert res.returncode == 0, [log[-3000:] for log in finished]
    assert all("Traceback" not in log for log in finished), [log[-3000:] for log in finished]
    assert all(f"training finished at step {max_steps}" in log for log in finished), [log[-3000:]
                                                                                      for log in finished]
    assert "Artefacts:" in finished[0] and "Artefacts:" not in finished[1], finished[1][-3000:]
    assert "demo: process 0 writes the artefacts" in finished[1] and "process 1 waits for it" in finished[1]
    assert "phantom_vqa K=0" not in finished[1]  # no evaluation on process 1
    assert json.loads((workdir / "eval" / "demo_summary.json").read_text())["results"]
    assert (workdir / "export_hf" / "vital.json").exists() and (workdir / "explain" / "explanation.json").exists()
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, max_steps + 1))   # each step logged once, across the stop

    # The rerun of the finished run finishes again; when process 0 fails to, process 1 fails too, saying so.
    shutil.rmtree(workdir / "eval")
    (workdir / "eval").write_text("")  # a file where the evaluation writes its folder
    env["PORT"] = str(_free_port())
    res = subprocess.run(launch, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = logs()[1]
    assert res.returncode == 1 and "Traceback" not in log, log[-3000:]
    assert f"error: process 0 could not finish the demo in {workdir}; its log says why" in log, log[-3000:]


def test_two_medsynapse_train_processes_join_one_distributed_run(tmp_path):
    """`python -m vital_jax.train` with a MedSynapse-V config through the local launcher: each process joins the
    distributed run before anything else (it used to train alone, the two racing on one workdir), so a mesh of
    4 devices is refused on 2 processes x 1 device naming the 2 devices of the whole run."""
    _both_processes_refuse(_launcher_env("configs/medsynapse_demo.py", tmp_path / "run"), tmp_path / "run",
                           ["--config.mesh.shape=(4,1,1)"], "mesh shape (4, 1, 1) needs 4 devices; there are 2")
