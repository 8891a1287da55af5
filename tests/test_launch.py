"""The cluster launchers (launch/slurm_gpu.sbatch, launch/tpu_pod.sh), run here with the cluster's commands
replaced by stubs on PATH (`scontrol`, `srun`, `gcloud`, and `python` itself, which records what it was started
with): each task's environment and command line, and the plan `vital_jax.distributed` makes from that environment.
Also the GPU-lease plan (benchmarks/accelerator_run.sh) with `nvidia-smi` stubbed: the commands it would run."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from vital_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/vital_qwen3vl_8b.py"

# `python` as the launched task sees it: one JSON line of its arguments and the VITAL_* environment.
PYTHON_STUB = """#!/bin/bash
exec "$REAL_PYTHON" -c 'import json, os, sys
print("STUB", json.dumps({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
                                                if k.startswith(("VITAL_", "SLURM_"))}}))' "$@"
"""
# `srun` without a cluster: runs the command once per task, with the task's SLURM_PROCID / SLURM_LOCALID.
SRUN_STUB = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
per_node="${SLURM_NTASKS_PER_NODE%%(*}"
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" "$@" || exit $?
done
"""
SCONTROL_STUB = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-node-7\\ngpu-node-8\\n'
"""
GCLOUD_STUB = """#!/bin/bash
"$REAL_PYTHON" -c 'import json, sys; print("STUB", json.dumps(sys.argv[1:]))' "$@"
"""


def _stubs(tmp_path, **scripts) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "REAL_PYTHON": sys.executable, "HOME": str(tmp_path)}


def _run(script: str, env: dict, *args: str) -> list:
    res = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [json.loads(line.removeprefix("STUB ")) for line in res.stdout.splitlines() if line.startswith("STUB ")]


@pytest.mark.parametrize("tasks_per_node", ["2(x2)", "1"])
def test_slurm_launcher_gives_every_task_the_coordinator_its_rank_and_its_gpus(tmp_path, tasks_per_node):
    per_node = int(tasks_per_node[0])
    env = dict(_stubs(tmp_path, python=PYTHON_STUB, srun=SRUN_STUB, scontrol=SCONTROL_STUB),
               CONFIG=CONFIG, WORKDIR="/shared/runs/x", SLURM_JOB_ID="31337", SLURM_JOB_NODELIST="gpu-node-[7-8]",
               SLURM_NTASKS=str(2 * per_node), SLURM_NTASKS_PER_NODE=tasks_per_node, SLURM_JOB_NUM_NODES="2",
               SLURM_SUBMIT_DIR=REPO)
    tasks = _run("slurm_gpu.sbatch", env, "--config.curriculum.max_steps=3", "--config.seed=1 2")
    assert len(tasks) == 2 * per_node
    for rank, task in enumerate(tasks):
        assert task["argv"] == ["-m", "vital_jax.train", f"--config={CONFIG}", "--workdir=/shared/runs/x",
                                "--config.curriculum.max_steps=3", "--config.seed=1 2"]
        vital = task["env"]
        assert vital["VITAL_COORDINATOR"] == f"gpu-node-7:{12000 + 31337 % 20000}"
        assert (vital["VITAL_NUM_PROCESSES"], vital["VITAL_PROCESS_ID"]) == (str(2 * per_node), str(rank))
        plan = distributed.plan_distributed(env=task["env"], tpu_vm=False)
        assert plan.method == "explicit" and plan.kwargs["process_id"] == rank
        assert plan.kwargs["num_processes"] == 2 * per_node
        if per_node == 1:   # each process drives every GPU of its node
            assert vital["VITAL_LOCAL_DEVICE_IDS"] == "all" and "local_device_ids" not in plan.kwargs
            assert plan.kwargs["cluster_detection_method"] == "deactivate"
        else:               # one GPU each: the task's local rank
            assert plan.kwargs["local_device_ids"] == [rank % per_node]


def test_slurm_launcher_asks_for_sigterm_minutes_before_the_time_limit():
    """Slurm's default at the time limit is SIGTERM, then SIGKILL KillWait (30 s) later: too short to save."""
    header = [line for line in open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) if line.startswith("#SBATCH")]
    signal = [line.split("=", 1)[1].strip() for line in header if line.startswith("#SBATCH --signal=")]
    assert len(signal) == 1 and signal[0].startswith("TERM@") and int(signal[0].split("@")[1]) >= 120, header


def test_slurm_launcher_refuses_to_start_without_a_config(tmp_path):
    env = dict(_stubs(tmp_path, python=PYTHON_STUB, srun=SRUN_STUB, scontrol=SCONTROL_STUB), WORKDIR="/w")
    res = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "set CONFIG" in res.stderr


def test_tpu_pod_launcher_runs_the_same_quoted_command_on_every_worker(tmp_path):
    env = dict(_stubs(tmp_path, gcloud=GCLOUD_STUB), TPU_NAME="vital-v5p-64", ZONE="us-east5-a", PROJECT="proj",
               CONFIG=CONFIG, WORKDIR="/mnt/gcs/runs/x", SETUP="1")
    (call,) = _run("tpu_pod.sh", env, "--config.curriculum.max_steps=3", "--config.note=a b")
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "vital-v5p-64"]
    assert "--zone=us-east5-a" in call and "--project=proj" in call and "--worker=all" in call
    remote = next(arg for arg in call if arg.startswith("--command=")).removeprefix("--command=")
    setup, _, rest = remote.partition(" && python3 -m pip install -q -e '.[tpu]' && ")
    assert setup == 'set -o pipefail && cd "$HOME"/vital_jax' and rest  # the default REPO_DIR, ~/vital_jax
    train = rest.split(" && ", 1)[1].split(" 2>&1 | tee ")[0]
    # The remote shell sees the extra flags as the arguments given here, spaces included.
    # python3: stock TPU VM images have no `python`.
    assert shlex.split(train) == ["python3", "-m", "vital_jax.train", f"--config={CONFIG}",
                                  "--workdir=/mnt/gcs/runs/x", "--config.curriculum.max_steps=3", "--config.note=a b"]
    assert distributed.plan_distributed(env={}, tpu_vm=True).method == "tpu"


def test_tpu_pod_launcher_fails_when_training_fails_on_a_worker(tmp_path):
    """The remote command pipes training through `tee` into the host's log: its exit status must be training's."""
    run_remote = """#!/bin/bash
for arg in "$@"; do [[ "$arg" == --command=* ]] && exec bash -c "${arg#--command=}"; done
"""
    failing_python = """#!/bin/bash
echo "training failed" >&2; exit 3
"""
    env = dict(_stubs(tmp_path, gcloud=run_remote, python3=failing_python), TPU_NAME="v", ZONE="z", CONFIG=CONFIG,
               WORKDIR="/mnt/gcs/x", LOG_DIR=str(tmp_path / "logs"))
    (tmp_path / "vital_jax").mkdir()  # REPO_DIR on the "host": ~/vital_jax, HOME is tmp_path
    res = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
    (log,) = (tmp_path / "logs").iterdir()
    assert "training failed" in log.read_text()


def test_tpu_pod_launcher_quotes_the_checkout_and_log_paths_for_the_hosts(tmp_path):
    """REPO_DIR and LOG_DIR with spaces (and a quote) reach the remote shell as one path each, a leading ~/ still the
    home directory on the host: `gcloud` runs the remote commands here (HOME is tmp_path), `tar` records what it
    would extract where, `python` where it was started."""
    run_remote = """#!/bin/bash
for arg in "$@"; do [[ "$arg" == --command=* ]] && exec bash -c "${arg#--command=}"; done
# scp: the archive stays here; its arguments are recorded
"$REAL_PYTHON" -c 'import json, sys; print("STUB", json.dumps({"gcloud": sys.argv[1:]}))' "$@"
"""
    tar = """#!/bin/bash
"$REAL_PYTHON" -c 'import json, sys; print("STUB", json.dumps({"tar": sys.argv[1:]}))' "$@"
"""
    python = """#!/bin/bash
exec "$REAL_PYTHON" -c 'import json, os, sys
print("STUB", json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}))' "$@"
"""
    env = dict(_stubs(tmp_path, gcloud=run_remote, tar=tar, python3=python), TPU_NAME="v", ZONE="z", CONFIG=CONFIG,
               WORKDIR="/mnt/gcs/x", REPO_DIR="~/my repo", LOG_DIR=str(tmp_path / "vital's logs"), SYNC="1",
               PROJECT="p")
    copy, extract, task = _run("tpu_pod.sh", env, "--config.note=a b")
    # `tpu-vm scp SRC... DEST`: the TPU is named in DEST only (gcloud would read a bare name as a source file).
    assert copy["gcloud"][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    positional = [a for a in copy["gcloud"][4:] if not a.startswith("--")]
    assert positional[-1] == "v:/tmp/vital_jax.tar.gz" and len(positional) == 2, copy
    assert positional[0].endswith(".tar.gz") and {"--zone=z", "--project=p", "--worker=all"} <= set(copy["gcloud"])
    repo = tmp_path / "my repo"
    assert extract == {"tar": ["-xzf", "/tmp/vital_jax.tar.gz", "-C", str(repo)]} and repo.is_dir()
    assert task == {"argv": ["-m", "vital_jax.train", f"--config={CONFIG}", "--workdir=/mnt/gcs/x",
                             "--config.note=a b"], "cwd": str(repo)}
    (log,) = (tmp_path / "vital's logs").iterdir()
    assert log.name.startswith("host_") and "STUB" in log.read_text()


def test_tpu_pod_launcher_refuses_a_bucket_url_as_workdir(tmp_path):
    env = dict(_stubs(tmp_path, gcloud=GCLOUD_STUB), TPU_NAME="v", ZONE="z", CONFIG=CONFIG,
               WORKDIR="gs://bucket/runs/x")
    res = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "is a URL: mount the bucket" in res.stderr and "STUB" not in res.stdout


@pytest.mark.parametrize("variable, value", [("NUM_PROCESSES", "0"), ("NUM_PROCESSES", "two"),
                                             ("DEVICES_PER_PROC", "-1"), ("GPUS_PER_PROC", "x")])
def test_local_launcher_refuses_a_process_or_device_count_that_is_not_a_positive_integer(tmp_path, variable, value):
    env = dict(_stubs(tmp_path, python=PYTHON_STUB), CONFIG=CONFIG, WORKDIR=str(tmp_path / "run"), PORT="1",
               **{variable: value})
    res = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and f"{variable}='{value}': set a positive integer" in res.stderr, res.stderr
    assert "STUB" not in res.stdout and not (tmp_path / "run").exists()


def test_local_launcher_stops_every_process_when_a_later_one_fails(tmp_path):
    """Process 1 fails at once while process 0 would wait (as in a collective, for the failed peer) far longer than
    the test allows: the launcher must stop process 0 then, not when process 0 ends by itself."""
    python = """#!/bin/bash
if [[ "$VITAL_PROCESS_ID" == 1 ]]; then echo "process 1 failed" >&2; exit 4; fi
exec sleep 600
"""
    env = dict(_stubs(tmp_path, python=python), CONFIG=CONFIG, WORKDIR=str(tmp_path / "run"), NUM_PROCESSES="2",
               PORT="1")
    res = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "a process failed" in res.stderr, (res.stdout, res.stderr)
    assert "process 1 failed" in (tmp_path / "run" / "logs" / "process_1.log").read_text()


def test_local_launcher_takes_relative_paths_from_where_it_is_started(tmp_path):
    """A relative WORKDIR (and a CONFIG found there) is the caller's, not the repository's, where the launcher runs
    its processes; its logs land where the processes write them."""
    caller = tmp_path / "caller"
    (caller / "mine").mkdir(parents=True)
    (caller / "mine" / "config.py").write_text("")
    env = dict(_stubs(tmp_path, python=PYTHON_STUB), CONFIG="mine/config.py:variant", WORKDIR="runs/my run",
               NUM_PROCESSES="2", PORT="1")
    res = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config.seed=3"], env=env,
                         cwd=caller, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    logs = caller / "runs" / "my run" / "logs"
    for rank in range(2):
        (line,) = [x for x in (logs / f"process_{rank}.log").read_text().splitlines() if x.startswith("STUB ")]
        task = json.loads(line.removeprefix("STUB "))
        assert task["argv"] == ["-m", "vital_jax.train", f"--config={caller}/mine/config.py:variant",
                                f"--workdir={caller}/runs/my run", "--config.seed=3"]
        assert task["env"]["VITAL_PROCESS_ID"] == str(rank) and task["env"]["VITAL_NUM_PROCESSES"] == "2"


@pytest.mark.parametrize("memory_mib, batch, policy", [("81559", "10", "projections"), ("143771", "16", "dots")])
def test_the_accelerator_plan_sizes_its_batch_by_the_cards_memory(tmp_path, memory_mib, batch, policy):
    """benchmarks/accelerator_run.sh (issue #16's GPU measurements) with `nvidia-smi` reporting an 80 GB or a 141 GB
    card and `python3` / `timeout` stubbed: the commands it would run, batches and remat policy included, and
    explicit arguments win."""
    nvidia_smi = f"""#!/bin/bash
if [[ "$*" == *nounits* ]]; then echo {memory_mib}; else echo "NVIDIA GPU, {memory_mib} MiB"; fi
"""
    echo = """#!/bin/bash
echo "STUB $*"
"""
    skip_timeout = """#!/bin/bash
shift; exec "$@"
"""
    env = dict(_stubs(tmp_path, **{"nvidia-smi": nvidia_smi, "python3": echo, "timeout": skip_timeout}),
               OUT=str(tmp_path / "out"))

    def commands(*args):
        res = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "accelerator_run.sh"), *args], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return [line.removeprefix("STUB ") for line in res.stdout.splitlines() if line.startswith("STUB -m")]

    trace = f"--trace_dir {tmp_path / 'out'}/trace_step"
    assert commands("train") == [
        f"-m benchmarks.attention_kernels --batch {batch}",
        f"-m benchmarks.mfu_8b --batch {batch} --remat_policy {policy} {trace}",
        f"-m benchmarks.mfu_8b --batch {batch} --remat_policy {policy} --attention cudnn"]
    assert commands("train", "12", "20", "full")[1:] == [
        f"-m benchmarks.mfu_8b --batch 12 --remat_policy full {trace}",
        "-m benchmarks.mfu_8b --batch 20 --remat_policy full --attention cudnn"]
    assert commands("inference") == ["-m benchmarks.latency_8b --repeats 8"]
