"""The commands as a new user meets them: a wrong argument is one line on stderr and a non-zero exit status, found
before any model is loaded; --help works for each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def _one_line_error(res, *needles):
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A workdir with only the config a demo run records (K_max = 4): enough for every argument check, and a
    command that tried to load the model would fail differently (the demo's assets are not there)."""
    from configs import demo

    workdir = tmp_path_factory.mktemp("recorded_run")
    (workdir / "config.json").write_text(demo.get_config().to_json_best_effort())
    data = tmp_path_factory.mktemp("jsonl_benchmark")
    (data / "train.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "question": "q?", "answer": "yes",
                                                  "answer_type": "closed"}) + "\n")
    return str(workdir), str(data)


@pytest.mark.parametrize("module, args, needles", [
    ("vital_jax.train", ["--config=configs/demo.py", "--workdir=/tmp/x", "--bogus=1"], ["bogus"]),
    ("vital_jax.train", ["--config=configs/demo.py"], ["--workdir is required"]),
    ("vital_jax.train", ["--config=configs/no_such.py", "--workdir=/tmp/x"], ["configs/no_such.py: no such file"]),
    ("vital_jax.train", ["--config=configs/demo.py", "--workdir=/tmp/x", "--config.vital.no_such=1"],
     ["unknown config field"]),
    # A near miss is named as ml_collections suggests it, without the repr's escaped quotes and literal "\n".
    ("vital_jax.train", ["--config=configs/demo.py", "--workdir=/tmp/x", "--config.data.batchsize=2"],
     ["""'batchsize' Did you mean "batch_size" instead of "batchsize"? See configs/base.py"""]),
    ("vital_jax.train", ["--config=configs/medsynapse_demo.py", "--workdir=/tmp/x",
                         "--config.medsynapse.ccr.num_generations=1"], ["config.medsynapse.ccr.num_generations"]),
    ("vital_jax.pretrain", ["--workdir=/tmp/x"], ["--config is required"]),
    ("vital_jax.study", ["--config=configs/study/phantom.py", "--workdir=/tmp/x", "stray"], ["unexpected"]),
    ("vital_jax.evaluate", ["--checkpoint=/no/such/run", "--benchmark=vqa_rad", "--data_dir=/x", "--out=/tmp/x",
                            "--latent_steps=1"], ["/no/such/run", "config.json"]),
    ("vital_jax.evaluate", ["--checkpoint=/tmp"], ["--benchmark", "required"]),
    *[("vital_jax.evaluate", ["--checkpoint=/x", "--benchmark=vqa_rad", "--data_dir=/x", "--out=/tmp/x",
                              "--latent_steps=1", f"--{flag}=0"], [f"--{flag}=0: 0 is not a positive integer"])
      for flag in ("batch_size", "max_new_tokens", "limit")],
    ("vital_jax.explain", ["--checkpoint=/x", "--out=/tmp/x", "--data_dir=/tmp", "--limit=-1"],
     ["--limit=-1: -1 is not a positive integer"]),
    ("vital_jax.explain", ["--out=/tmp/x"], ["--checkpoint is required"]),
    ("vital_jax.explain", ["--checkpoint=/x", "--out=/tmp/x", "--image=a.png", "--question=q", "--grounding"],
     ["--grounding scores a dataset's records against their masks: give --data_dir"]),
    # An output path that is a file: refused before any work (it used to fail once the results were ready).
    ("vital_jax.evaluate", ["--checkpoint=/no/such/run", "--benchmark=vqa_rad", "--data_dir=/x", "--out=README.md",
                            "--latent_steps=1"], ["--out=README.md exists and is not a directory"]),
    ("vital_jax.explain", ["--checkpoint=/no/such/run", "--data_dir=/tmp", "--out=README.md"],
     ["--out=README.md exists and is not a directory"]),
    ("vital_jax.train", ["--config=configs/demo.py", "--workdir=README.md"],
     ["--workdir=README.md exists and is not a directory"]),
    # A bucket URL would become a local directory "gs:" on each host (abspath): refused, naming the mount to use.
    ("vital_jax.train", ["--config=configs/demo.py", "--workdir=gs://bucket/run"],
     ["--workdir=gs://bucket/run is a URL", "mount the bucket"]),
    ("vital_jax.study", ["--config=configs/study/phantom.py", "--workdir=s3://bucket/study"],
     ["--workdir=s3://bucket/study is a URL"]),
    ("vital_jax.data.build", [], ["--config"]),
    ("vital_jax.data.roi", ["--data_dir=/no/such/data", "--encoder_dir=/x"], ["/no/such/data/records.jsonl"]),
    ("vital_jax.data.roi_grid_search", ["--data_dir=/no/such/data", "--encoder_dir=/x", "--out=/tmp/x/grid.json"],
     ["/no/such/data/records.jsonl"]),
    ("vital_jax.data.validate", [], ["--data_dir"]),
    ("vital_jax.data.audit", [], ["command"]),
    ("vital_jax.data.audit", ["sample", "--data_dir=/nonexistent/audit_data"],
     ["--data_dir=/nonexistent/audit_data: no such directory"]),
    ("vital_jax.data.audit", ["score", "--data_dir=/tmp", "--out=/nonexistent/audit_out"],
     ["/nonexistent/audit_out/sheet.csv: no audit sheet"]),
    ("vital_jax.data.audit", ["sample", "--data_dir=/tmp", "--out=README.md"],
     ["--out=README.md exists and is not a directory"]),
    ("conversion.flax_to_hf", ["--checkpoint=/no/such/dir", "--out=/tmp/x"], ["/no/such/dir"]),
    ("conversion.hf_to_flax", ["--out=/tmp/x"], ["--hf_dir"]),
    ("conversion.torch_latent_generate", ["--model=/no/such/export", "--image=x.png", "--question=q"],
     ["/no/such/export"]),
])
def test_a_wrong_argument_is_one_line_and_a_failure(module, args, needles):
    _one_line_error(_run(module, *args), *needles)


def test_train_names_a_malformed_multi_process_variable_before_any_work(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, VITAL_COORDINATOR="127.0.0.1:1", VITAL_NUM_PROCESSES="two",
               VITAL_PROCESS_ID="0")
    res = subprocess.run([sys.executable, "-m", "vital_jax.train", "--config=configs/demo.py",
                          f"--workdir={tmp_path}/run"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    _one_line_error(res, "VITAL_NUM_PROCESSES='two' is not an integer")
    assert not os.path.exists(tmp_path / "run")


def test_evaluate_checks_k_and_the_split_before_loading_the_model(recorded_run):
    workdir, data = recorded_run
    common = [f"--checkpoint={workdir}", "--benchmark=jsonl", f"--data_dir={data}", f"--out={workdir}/eval"]
    _one_line_error(_run("vital_jax.evaluate", *common, "--latent_steps=9"), "outside 0..K_max=4")
    _one_line_error(_run("vital_jax.evaluate", *common, "--latent_steps=2", "--split=test"), "test")
    _one_line_error(_run("vital_jax.evaluate", *common), "--latent_steps=K")
    _one_line_error(_run("vital_jax.evaluate", *common, "--memory=autonomous"), "VITAL run")
    _one_line_error(_run("vital_jax.evaluate", *common, "--latent_steps=2", "--latency_breakdown"), "--k_sweep")


def test_evaluate_checks_record_k_before_loading_the_model(recorded_run, tmp_path):
    """--record_k on a benchmark whose questions carry no record K: one error line, before the model loads."""
    from PIL import Image

    workdir, _ = recorded_run
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "question": "q?", "answer": "yes",
                                                     "answer_type": "closed"}) + "\n")
    res = _run("vital_jax.evaluate", f"--checkpoint={workdir}", "--benchmark=jsonl", f"--data_dir={tmp_path}",
               f"--out={tmp_path / 'eval'}", "--latent_steps=1", "--record_k")
    _one_line_error(res, "example 'a' has no record K")
    assert "loading the run" not in res.stderr


def test_medsynapse_evaluation_refuses_an_out_holding_another_evaluations_results(tmp_path):
    """The --out check of VITAL's evaluate, for MedSynapse-V runs too (their results overwrote another run's)."""
    import types

    from PIL import Image

    from configs import medsynapse_demo
    from vital_jax import evaluate

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "question": "q?", "answer": "yes",
                                                     "answer_type": "closed"}) + "\n")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "jsonl.metrics.json").write_text(json.dumps({"meta": {"checkpoint": "/another/run", "split": "test"}}))
    trained = types.SimpleNamespace(config=medsynapse_demo.get_config(), stages_done=("warmup", "ccr", "imt"))
    with pytest.raises(ValueError, match="another evaluation's results .*/another/run"):
        evaluate.evaluate_medsynapse(str(tmp_path / "run"), "jsonl", str(tmp_path), str(out), ["autonomous"],
                                     trained=trained)
    # The same run's report of the other memory branch was replaced too.
    (out / "jsonl.metrics.json").write_text(json.dumps({"meta": {"checkpoint": str(tmp_path / "run"),
                                                                 "split": "test", "memory": "sampler"}}))
    with pytest.raises(ValueError, match="another evaluation's results .*split test, memory sampler"):
        evaluate.evaluate_medsynapse(str(tmp_path / "run"), "jsonl", str(tmp_path), str(out), ["autonomous"],
                                     trained=trained)


def test_the_out_check_refuses_a_report_of_another_k_and_lets_its_own_be_replaced(tmp_path):
    """Evaluating K=4 into the --out of the same run's K=0 report replaced it silently."""
    from vital_jax import evaluate

    out, run = tmp_path / "eval", str(tmp_path / "run")
    (out / "k0").mkdir(parents=True)
    report = {"meta": {"checkpoint": run, "split": "test", "latent_steps": 0}}
    (out / "jsonl.metrics.json").write_text(json.dumps(report))
    (out / "k0" / "jsonl.metrics.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="jsonl.metrics.json: jsonl of .*run, split test, latent_steps 0\\)"):
        evaluate.check_out_dir(str(out), "jsonl", run, "test", {str(out): {"latent_steps": 4}}, sweep=False)
    with pytest.raises(ValueError, match="latent_steps 0"):
        evaluate.check_out_dir(str(out), "jsonl", run, "test", {str(out): {"latent_steps": "per record"}},
                               sweep=False)
    evaluate.check_out_dir(str(out), "jsonl", run, "test", {str(out): {"latent_steps": 0}}, sweep=False)
    # A sweep writes k0/ with K=0 again: its own report, replaced.
    evaluate.check_out_dir(str(out), "jsonl", run, "test", {str(out / f"k{k}"): {"latent_steps": k}
                                                             for k in (0, 2)}, sweep=True)


def test_evaluate_refuses_an_out_holding_another_evaluations_results(recorded_run, tmp_path):
    """Results of another checkpoint were overwritten, and a K sweep of another benchmark replaced k_sweep.json
    and summary.md beside the first one's per-K files, silently; a rerun of the same evaluation still goes on
    (to the model, which this config-only workdir does not have)."""
    from PIL import Image

    workdir, _ = recorded_run
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "question": "q?", "answer": "yes",
                                                     "answer_type": "closed"}) + "\n")
    out = tmp_path / "eval"
    (out / "k0").mkdir(parents=True)

    def result(path, benchmark, checkpoint):
        path.write_text(json.dumps({"benchmark": benchmark, "meta": {"checkpoint": checkpoint, "split": "test"}}))

    common = [f"--checkpoint={workdir}", "--benchmark=jsonl", f"--data_dir={tmp_path}", f"--out={out}"]
    result(out / "jsonl.metrics.json", "jsonl", "/another/run")
    _one_line_error(_run("vital_jax.evaluate", *common, "--latent_steps=1"), "another evaluation's results",
                    str(out / "jsonl.metrics.json"), "/another/run")
    result(out / "jsonl.metrics.json", "jsonl", workdir)
    result(out / "k0" / "vqa_rad.metrics.json", "vqa_rad", workdir)
    _one_line_error(_run("vital_jax.evaluate", *common, "--k_sweep"), "another evaluation's results",
                    str(out / "k0" / "vqa_rad.metrics.json"))
    res = _run("vital_jax.evaluate", *common, "--latent_steps=1")   # the same evaluation again: not refused
    assert "another evaluation" not in res.stderr and "loading the run" in res.stderr, res.stderr[-3000:]
    # A workdir's own eval folder, after the workdir was copied or moved: its results record the old path.
    own = os.path.join(workdir, "eval")
    os.makedirs(own, exist_ok=True)
    result(Path(own) / "jsonl.metrics.json", "jsonl", "/where/the/workdir/was")
    res = _run("vital_jax.evaluate", *common[:-1], f"--out={own}", "--latent_steps=1")
    assert "another evaluation" not in res.stderr and "loading the run" in res.stderr, res.stderr[-3000:]


def test_explain_checks_k_and_its_files_before_loading_the_model(recorded_run):
    workdir, _ = recorded_run
    common = [f"--checkpoint={workdir}", "--question=Where?", f"--out={workdir}/explain"]
    _one_line_error(_run("vital_jax.explain", *common, "--image=/no/such.png"), "/no/such.png")
    _one_line_error(_run("vital_jax.explain", *[a for a in common if not a.startswith("--question")],
                         "--question=  ", "--image=/no/such.png"), "--question is empty")
    image = os.path.join(REPO, "vital_jax", "assets", "phantom_vlm", "PROVENANCE.json")  # any existing file
    _one_line_error(_run("vital_jax.explain", *common, f"--image={image}", "--latent_steps=7"), "outside 0..K_max=4")
    # A file that is not an image was found only after the model had loaded and compiled.
    res = _run("vital_jax.explain", *common, f"--image={image}")
    _one_line_error(res, "PROVENANCE.json")
    assert "loading the run" not in res.stderr, res.stderr[-3000:]
    # --mask at K = 0 was accepted and silently unused (no heatmap to score).
    _one_line_error(_run("vital_jax.explain", *common, f"--image={image}", f"--mask={image}", "--latent_steps=0"),
                    "--latent_steps=0 has none")


@pytest.mark.parametrize("module, flag, needle", [
    ("vital_jax.train", "--help", "--workdir"), ("vital_jax.evaluate", "--helpfull", "--benchmark"),
    ("vital_jax.data.validate", "--help", "--data_dir")])
def test_help_is_printed_and_exits_0(module, flag, needle):
    """absl exits 1 after printing --help, as for an error: a script that runs `cmd --help` saw a failure."""
    res = _run(module, flag)
    assert res.returncode == 0 and needle in res.stdout, res.stderr[-2000:]


def test_torch_latent_generate_is_a_command():
    res = _run("conversion.torch_latent_generate", "--help")
    assert res.returncode == 0, res.stderr
    assert all(flag in res.stdout for flag in ("--model", "--image", "--question", "--latent_steps"))


def test_a_config_file_given_by_path_from_another_directory_loads(tmp_path):
    """`--config=/repo/configs/demo.py` from another working directory failed with "No module named 'configs'": the
    config files import their siblings as `configs.X`, a package that is not installed with vital_jax."""
    from vital_jax import cli

    config = os.path.join(REPO, "configs", "study", "phantom.py")
    assert cli.config_import_root(["x", f"--config={config}:quick"]) == REPO
    assert cli.config_import_root(["x", "--config", os.path.join(REPO, "configs", "data", "msd.py")]) == REPO
    assert cli.config_import_root(["x", f"--config={tmp_path}/c.py", "--config.rows=1"]) is None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vital_jax as installed, configs not
    res = subprocess.run([sys.executable, "-m", "vital_jax.train", f"--config={REPO}/configs/medsynapse_demo.py",
                          f"--workdir={tmp_path}/run", "--config.no_such=1"], capture_output=True, text=True,
                         cwd=str(tmp_path), env=env, timeout=300)
    _one_line_error(res, "unknown config field")  # the file loaded: its overrides were checked
