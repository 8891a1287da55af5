"""MedSynapse-V's staged trainer on the phantom demo: Stage I learns (against the same run at lr = 0); all three stages
run from one call, each checkpointing its own trained parameters and logging into one metrics file; a crash in
Stage II and a preemption in Stage III resume exactly without redoing Stage I; `load_trained` assembles what the
finished stages trained; `python -m vital_jax.train` dispatches a MedSynapse-V config."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import medsynapse_demo
from tests.conftest import DEMO_TEST_OVERRIDES, demo_test_config, record_batch_preparation
from vital_jax.checkpoint import CheckpointError
from vital_jax.data.pipeline import make_train_iterator
from vital_jax.generation import SamplingConfig
from vital_jax.models.qwen3_vl.cached import prefix_inputs
from vital_jax.medsynapse import deploy, trainer
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.qwen3_vl import prompt
from vital_jax.models.hf_mapping import flatten
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.workdir import GLOBAL_BATCH_FILE

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRPO_KEYS = ("reward_mean", "reward_std", "r_acc", "r_causal", "advantage_mean", "advantage_std", "advantage_min",
             "advantage_max", "zero_variance_groups", "completion_length", "truncated_fraction", "clip_fraction",
             "ratio_mean", "kl", "loss", "grad_norm")
IMT_KEYS = ("loss", "grad_norm", "trajectory_length", "student_memory_rms", "teacher_memory_rms", "memory_gap_rms")


def _config(lr=None, stages=("warmup",)):
    c = medsynapse_demo.get_config()
    shrunk = demo_test_config()
    c.demo = shrunk.demo
    c.data.batch_size = 4
    c.checkpoint.save_every_steps = 2
    c.checkpoint.async_save = False
    c.logging.every_steps = 1
    m = c.medsynapse
    m.stages = stages
    m.warmup.epochs = 2
    if lr is not None:
        m.warmup.lr = lr
    m.ccr.steps = 4
    m.ccr.num_generations = 2
    m.ccr.max_new_tokens = 8
    m.ccr.lora.rank, m.ccr.lora.alpha = 4, 8.0
    m.imt.max_steps = 3
    m.imt.max_new_tokens = 8
    return c


def _three_stage_config():
    c = _config(stages=trainer.STAGES)
    c.medsynapse.warmup.max_steps = 3
    return c


def _paths(demo_root: str) -> trainer.Paths:
    with open(os.path.join(demo_root, "READY.json")) as f:
        p = json.load(f)
    return trainer.Paths(p["data_dir"], p["tokenizer_dir"], p["backbone_dir"], p["encoder_dir"])


def _rows(workdir, name="metrics.jsonl") -> list[dict]:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _losses(workdir: str, stage: str | None = None) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r and stage in (None, r["stage"])}


def _run(config, workdir, paths, **kw):
    trainer._PREEMPTION["requested"] = False
    return trainer.train(config, str(workdir), paths, **kw)


def _saved_params(workdir, stage: str) -> list[str]:
    """The parameter paths a stage's final checkpoint holds."""
    with open(os.path.join(workdir, f"stage_{stage}", "DONE.json")) as f:
        step = json.load(f)["final_step"]
    with ocp.StandardCheckpointer() as c:
        saved = c.restore(os.path.join(workdir, f"stage_{stage}", str(step), "state"))
    return [k for k in saved if k.startswith("params.")]


def _assert_trees_equal(a, b, exact=True):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        if exact:
            assert np.array_equal(np.asarray(fa[path]), np.asarray(fb[path])), path
        else:
            np.testing.assert_allclose(np.asarray(fa[path]), np.asarray(fb[path]), rtol=1e-5, atol=1e-6,
                                       err_msg=path)


@pytest.fixture(scope="module")
def paths(demo_assets):
    return _paths(demo_assets)


@pytest.fixture(scope="module")
def three_stage_run(paths, tmp_path_factory):
    """One uninterrupted run of all three stages (3 + 4 + 3 steps), read by several tests."""
    workdir = tmp_path_factory.mktemp("three_stages")
    summary = _run(_three_stage_config(), workdir, paths)
    return str(workdir), summary


# ---- Stage I ----------------------------------------------------------------------------------------------------

def _learning_config(lr=None):
    """Stage I for one epoch (22 steps) in one prompt width, checkpointed only at its end: what it learns does not
    depend on the widths, and each width is one more compile of each run's step (most of its time)."""
    c = _config(lr)
    c.medsynapse.warmup.epochs = 1
    c.data.prompt_buckets = (max(c.data.prompt_buckets),)
    c.checkpoint.save_every_steps = 1000
    return c


def test_stage1_lowers_the_answer_loss_compared_with_lr_zero(paths, tmp_path):
    trained = _run(_learning_config(), tmp_path / "trained", paths)
    _run(_learning_config(lr=0.0), tmp_path / "frozen", paths)
    assert not trained["preempted"] and trained["stages"]["warmup"]["steps"] > 4
    a, b = _losses(str(tmp_path / "trained")), _losses(str(tmp_path / "frozen"))
    assert sorted(a) == sorted(b)
    # Same batches in the same order, so the losses pair up step by step: only the sampler's training differs.
    later = sorted(a)[len(a) // 2:]
    lower = [a[s] < b[s] for s in later]
    assert sum(a[s] for s in later) < sum(b[s] for s in later) and sum(lower) >= 0.8 * len(later), (a, b)
    assert os.path.isfile(os.path.join(tmp_path / "trained", trainer.FEATURES_DIR, "feature_index.json"))


def test_stage1_resumes_exactly_after_a_preemption_and_skips_when_done(three_stage_run, paths, tmp_path):
    # The uninterrupted run is the three-stage run's Stage I (its config without the later stages: the same 3 steps
    # and compiled programs); this run is preempted after step 1 and the rerun trains steps 2 and 3.
    straight_dir, straight = three_stage_run
    config = _three_stage_config()
    config.medsynapse.stages = ("warmup",)
    resumed_dir = tmp_path / "resumed"
    first = _run(config, resumed_dir, paths, on_first_step=trainer.request_preemption)
    assert first["preempted"] and first["stages"]["warmup"]["steps"] == 1
    with pytest.raises(CheckpointError, match="no finished MedSynapse-V stage"):
        trainer.load_trained(str(resumed_dir))
    second = _run(config, resumed_dir, paths)
    assert not second["preempted"]
    assert second["stages"]["warmup"]["steps"] == straight["stages"]["warmup"]["steps"]
    expected, got = _losses(straight_dir, "warmup"), _losses(str(resumed_dir))
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    rows = sum(1 for _ in open(os.path.join(resumed_dir, "metrics.jsonl")))
    third = _run(config, resumed_dir, paths)  # finished: nothing runs, nothing is logged again
    assert third["stages"]["warmup"]["metrics"] == second["stages"]["warmup"]["metrics"]  # what the run logged
    assert third["stages"]["warmup"]["metrics"]["stage"] == "warmup"
    assert sum(1 for _ in open(os.path.join(resumed_dir, "metrics.jsonl"))) == rows
    # A warmup-only run: P_phi on the plain backbone, no LoRA, no A_psi, no encoder.
    run = trainer.load_trained(str(resumed_dir))
    assert run.stages_done == ("warmup",) and run.steps == {"warmup": straight["stages"]["warmup"]["steps"]}
    assert sorted(run.params) == ["backbone", "sampler"] and run.autonomous is None and run.backbone.lora is None
    assert not [p for p in flatten(run.params["backbone"]) if "lora_" in p]
    # The finished Stage I run goes on with CCR (it was refused: another config), Stage I not redone, with CCR
    # settings other than the ones recorded beside Stage I (CCR never ran with them); the recorded config then
    # lists both stages and CCR's settings as they trained, and the stages the run has may not change.
    longer = config.copy_and_resolve_references()
    longer.medsynapse.stages = ("warmup", "ccr")
    longer.medsynapse.ccr.steps = 1  # not the recorded 4; one step: each prompt width is one more program
    fourth = _run(longer, resumed_dir, paths)
    assert fourth["stages"]["warmup"] == third["stages"]["warmup"] and fourth["stages"]["ccr"]["steps"] == 1
    recorded = trainer.read_config(str(resumed_dir)).medsynapse
    assert recorded.stages == ["warmup", "ccr"] and recorded.ccr.steps == 1
    assert trainer.load_trained(str(resumed_dir)).stages_done == ("warmup", "ccr")
    assert sum(1 for _ in open(os.path.join(resumed_dir, "metrics.jsonl"))) == rows + 1  # CCR's step, logged once
    for stages in (("warmup",), ("warmup", "imt")):
        other = config.copy_and_resolve_references()
        other.medsynapse.stages = stages
        with pytest.raises(CheckpointError, match=r"medsynapse.stages may only grow at its end \(recorded "
                                                  r"\['warmup', 'ccr'\]\)"):
            _run(other, resumed_dir, paths)
    for edit in ({"ccr.steps": 4}, {"warmup.lr": 2 * config.medsynapse.warmup.lr}):  # what ran binds
        other = longer.copy_and_resolve_references()
        other.medsynapse.stages = ("warmup", "ccr", "imt")
        other.medsynapse.update_from_flattened_dict(edit)
        with pytest.raises(CheckpointError, match=f"fields differ: medsynapse.{next(iter(edit))}\\)"):
            _run(other, resumed_dir, paths)
    shutil.rmtree(resumed_dir)
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
        trainer.load_trained(str(tmp_path / "nothing"))


def test_each_batch_is_prepared_while_the_step_before_it_runs(paths, tmp_path, monkeypatch):
    events = []
    record_batch_preparation(trainer, events, monkeypatch)
    config = _config()
    config.medsynapse.warmup.max_steps = 3
    _run(config, tmp_path, paths)
    assert events == ["prepare", "prepare", "log 1", "prepare", "log 2", "log 3"]  # none past the last step


def test_a_rerun_after_the_training_records_changed_is_refused_naming_them(paths, tmp_path):
    """A preempted run resumed on a dataset whose train split changed went on silently: the checkpoint's data
    position applied to other records, and the stage's schedule length recomputed from them. It is refused, as
    VITAL's, and the run's checkpoint is kept for the restored dataset."""
    from vital_jax.data.records import RECORDS_FILE

    data_dir = tmp_path / "data"
    shutil.copytree(paths.data_dir, data_dir)
    paths = dataclasses.replace(paths, data_dir=str(data_dir))
    config = _config()
    config.medsynapse.warmup.max_steps = 3  # the three-stage run's Stage I: its compiled steps serve this run
    workdir = tmp_path / "run"
    first = _run(config, workdir, paths, on_first_step=trainer.request_preemption)
    assert first["preempted"] and first["stages"]["warmup"]["steps"] == 1
    records = (data_dir / RECORDS_FILE).read_text()
    lines = records.splitlines(keepends=True)
    train = [i for i, line in enumerate(lines) if json.loads(line)["split"] == config.data.train_split]
    (data_dir / RECORDS_FILE).write_text("".join(line for i, line in enumerate(lines) if i != train[0]))
    with pytest.raises(CheckpointError, match=r"training records changed since this run started "
                                              rf"\(train_records.json: {len(train)} records, now {len(train) - 1}"):
        _run(config, workdir, paths)
    assert os.path.isdir(workdir / "stage_warmup" / "1")
    (data_dir / RECORDS_FILE).write_text(records)  # the dataset restored
    # Another global batch (one process of a smaller batch) is refused too; the run recorded its own.
    assert json.loads((workdir / GLOBAL_BATCH_FILE).read_text()) == {
        "global_batch": {"data.batch_size": config.data.batch_size}}
    smaller = config.copy_and_resolve_references()
    smaller.data.batch_size = config.data.batch_size // 2
    with pytest.raises(CheckpointError, match=rf"data.batch_size = {config.data.batch_size}; this command gives "
                                              rf"1 x {config.data.batch_size // 2}"):
        _run(smaller, workdir, paths)
    assert not _run(config, workdir, paths)["preempted"]   # the run resumes


# Closed questions as PhantomVQA asks them (data.questions' templates): (question type, question, answer, target).
CLOSED_RECORDS = (
    ("yes_no", "Is the liver located in the left half of the image?",
     "Yes, the liver is located in the left half of the image.", "liver"),
    ("yes_no", "Is there a lesion in the kidney in this CT scan?", "No, there is no lesion in the kidney.", "kidney"),
    ("yes_no", "Is the spleen brighter than its surroundings?", "Yes.", "spleen"),
    ("location_choice", "Is the liver in the left, right, or center of the image?",
     "The liver is in the right part of the image.", "liver"),
    ("location_choice", "Is the spleen in the left, right, or center of the image?",
     "The spleen is in the center of the image.", "spleen"),
    ("location_choice", "Is the kidney cyst in the upper, middle, or lower part of the image?",
     "The kidney cyst is in the lower part of the image.", "kidney cyst"),
)


def test_the_closed_reward_scores_each_record_as_evaluation_scores_it(paths, tmp_path):
    # closed_match="closed": r_acc of a closed record = what the phantom_vqa benchmark counts as right, for the
    # record's own answer, each option bare or in a sentence, and answers naming two options or none.
    from vital_jax.data.records import RECORDS_FILE, RecordError, read_records
    from vital_jax.eval.benchmarks import load_benchmark
    from vital_jax.eval.metrics import score_example
    from vital_jax.medsynapse import reward as reward_lib

    demo = read_records(os.path.join(paths.data_dir, RECORDS_FILE))
    base = next(r for r in demo if r.split == "train")
    records = [dataclasses.replace(base, id=f"closed{i}", question_type=kind, question=q, answer=a, target=t,
                                   latent_steps=1, reasoning_chain=base.reasoning_chain[:1])
               for i, (kind, q, a, t) in enumerate(CLOSED_RECORDS)]
    records.append(dataclasses.replace(base, id="open0", split="train"))
    os.symlink(os.path.join(paths.data_dir, "images"), tmp_path / "images")
    with open(tmp_path / RECORDS_FILE, "w") as f:
        f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in records)
    config = reward_lib.RewardConfig(closed_match="closed")
    references = trainer.reward_references(records, "train", config)
    examples = {e.id: e for e in load_benchmark("phantom_vqa", str(tmp_path), split="train")}
    rewarded = 0
    for i, r in enumerate(records[:-1]):
        ref, example = references[i], examples[r.id]
        first, second = example.options[:2]
        for prediction in (r.answer, *example.options, f"{first.capitalize()}.", f"It is {first}, not {second}.",
                           f"The {r.target} is in the {first} part.", f"{first} or {second}", ""):
            reward = reward_lib.accuracy_reward(prediction, ref.answer, ref.open_ended, config, ref.options, ref.target)
            assert reward == float(score_example(example, prediction).correct), (r.id, prediction, ref)
            rewarded += reward == 1.0
    assert rewarded >= 2 * len(CLOSED_RECORDS), rewarded
    # The open record, and every record under the default (Eq. 4: the answer text itself).
    assert references[len(records) - 1] == reward_lib.Reference(base.answer, True)
    exact = trainer.reward_references(records, "train", reward_lib.RewardConfig())
    assert [ref.answer for ref in exact.values()] == [r.answer for r in records] and not exact[0].options
    assert set(trainer.reward_references(records, "val", config)) == set()
    # A closed record the benchmarks could not pose is named before any training.
    bad = dataclasses.replace(records[3], question="Where is the liver?")
    with pytest.raises(RecordError, match="record 'closed3'.*names no choice set.*closed_match"):
        trainer.reward_references([bad], "train", config)


def test_impossible_stage_settings_are_config_errors(paths, tmp_path):
    for field, value, needle in [("stages", ("imt",), "stages"), ("warmup.epochs", 0, "epochs"),
                                 ("ccr.num_generations", 1, "ccr.num_generations"),
                                 ("ccr.kl_estimator", "k2", "ccr.kl_estimator"),
                                 ("ccr.lora.targets", ("q", "qkv"), "ccr.lora.targets"),
                                 ("ccr.schedule", "linear", "ccr.schedule"),
                                 ("imt.beta", 1.5, "imt.beta"), ("imt.max_new_tokens", 0, "imt.max_new_tokens"),
                                 ("memory_position", "before_image", "memory_position")]:
        config = _config(stages=trainer.STAGES)
        *parents, leaf = field.split(".")
        section = config.medsynapse
        for name in parents:
            section = section[name]
        section[leaf] = value
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            _run(config, tmp_path / "x", paths)
    assert not os.path.exists(tmp_path / "x")  # refused before anything was written


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_an_imt_beta_at_either_end_is_a_config_error_saying_eq_8_vanishes_there(beta):
    """JSD_beta is identically 0 at beta = 0 and 1: accepted, Stage III trained A_psi on a zero loss."""
    config = _config(stages=trainer.STAGES)
    trainer.validate_config(config)  # beta 0.5, the paper's
    config.medsynapse.imt.beta = beta
    with pytest.raises(ConfigError, match=rf"config\.medsynapse\.imt\.beta: {beta} must lie in \(0, 1\): "
                                          r"Eq\. \(8\)'s JSD_beta is identically 0"):
        trainer.validate_config(config)


def test_sampler_heads_that_do_not_split_e_anas_channels_are_a_config_error_before_training(paths, tmp_path):
    """P_phi attends over F's channels (the demo SigLIP's 32): 5 heads failed inside the first traced step with a
    traceback."""
    config = _config()
    config.medsynapse.sampler.num_heads = 5
    with pytest.raises(ConfigError, match=r"config\.medsynapse\.sampler\.num_heads=5 must divide E_ana's feature "
                                          r"dim 32"):
        _run(config, tmp_path / "run", paths)
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_the_memory_position_reaches_stage_one_and_memory_cost_reads_the_run(three_stage_run, paths, tmp_path):
    """memory_position "user_turn" (the memory before the assistant header): from the same P_phi start on the same
    batch, Stage I's first loss differs from the "assistant_turn" run's (the three-stage run: a step's loss is taken
    before its update, so that run's lr does not enter it), and each run records the placement that evaluation and
    export read back (`memory_prompt_tail`). Then `python -m vital_jax.medsynapse.memory_cost` on the user_turn run
    (Stage I at lr = 0, so its trained P_phi is the initial one and their NLLs agree, while no memory, zero memory
    and P_phi's memory differ)."""
    runs = {"assistant_turn": three_stage_run[0], "user_turn": str(tmp_path / "user_turn")}
    config = _config(lr=0.0)
    config.medsynapse.memory_position = "user_turn"
    config.medsynapse.warmup.max_steps = 1
    _run(config, runs["user_turn"], paths)
    tokenizer = prompt.load_tokenizer(paths.tokenizer_dir)
    first = {}
    for position, workdir in runs.items():
        first[position] = _losses(workdir, "warmup")[1]
        recorded = trainer.read_config(workdir)
        assert trainer.memory_position(recorded) == position
        assert trainer.memory_prompt_tail(recorded, tokenizer) == (
            prompt.user_turn_end_length(tokenizer) if position == "user_turn" else 0)
    assert abs(first["user_turn"] - first["assistant_turn"]) > 1e-4, first

    out = tmp_path / "cost.json"
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-m", "vital_jax.medsynapse.memory_cost",
                          f"--workdir={tmp_path / 'user_turn'}", "--split=val", "--limit=5", f"--out={out}"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "per example" in res.stdout and "trained_sampler" in res.stdout
    result = json.loads(out.read_text())
    assert result["examples"] == 5 and result["memory_position"] == "user_turn"
    c = {name: v["nll_per_example"] for name, v in result["conditions"].items()}
    assert sorted(c) == sorted(("no_memory", "zero_memory", "text_memory", "initial_sampler", "trained_sampler"))
    assert all(np.isfinite(v) and v > 0 for v in c.values())
    assert c["trained_sampler"] == pytest.approx(c["initial_sampler"], rel=1e-5)
    assert abs(c["no_memory"] - c["initial_sampler"]) > 1e-3 and abs(c["zero_memory"] - c["no_memory"]) > 1e-3
    assert min(abs(c["text_memory"] - c[name]) for name in ("no_memory", "zero_memory", "initial_sampler")) > 1e-3
    # Without a limit, every record of the split that training would read (the training iterator it used dropped
    # the last partial batch).
    from vital_jax.data.pipeline import select_records
    from vital_jax.medsynapse import memory_cost

    whole = memory_cost.memory_cost(str(tmp_path / "user_turn"), split="val")
    assert whole["examples"] == len(select_records(paths.data_dir, "val", None)) > 0
    missing = subprocess.run([sys.executable, "-m", "vital_jax.medsynapse.memory_cost",
                              f"--workdir={tmp_path / 'nothing'}"], capture_output=True, text=True, cwd=REPO,
                             env=env, timeout=300)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]


def test_each_stage_batch_that_does_not_split_over_the_mesh_is_one_config_error_before_any_work(tmp_path):
    """Stages I and III batch data.batch_size records, Stage II ccr.rollout_prompts prompts: each must split over the
    mesh's data x fsdp shards. A rollout batch that did not failed with a traceback once Stage I had trained."""
    config = _config(stages=trainer.STAGES)
    assert trainer.stage_batches(config) == {"data.batch_size": 4}  # rollout_prompts 0: data.batch_size's prompts
    config.medsynapse.ccr.rollout_prompts = 2
    assert trainer.stage_batches(config) == {"data.batch_size": 4, "medsynapse.ccr.rollout_prompts": 2}
    config.medsynapse.stages = ("warmup", "imt")
    assert trainer.stage_batches(config) == {"data.batch_size": 4}  # no Stage II
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    res = subprocess.run([sys.executable, "-m", "vital_jax.train", "--config=configs/medsynapse_demo.py",
                          f"--workdir={workdir}", *DEMO_TEST_OVERRIDES, "--config.mesh.shape=(2,2,1)",
                          "--config.medsynapse.ccr.rollout_prompts=2"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert ("error: config.medsynapse.ccr.rollout_prompts=2 x 1 process(es) = 2 examples per step do not split over "
            "the mesh's data x fsdp = 2 x 2 = 4 batch shards (config.mesh.shape=(2, 2, 1)): set "
            "medsynapse.ccr.rollout_prompts to a multiple of 4") in res.stderr, res.stderr[-3000:]
    assert not os.path.exists(workdir)  # refused before the demo's assets or any model were loaded


# ---- Stages I-III -----------------------------------------------------------------------------------------------

def test_three_stages_run_from_one_call_each_checkpointing_and_logging(three_stage_run):
    workdir, summary = three_stage_run
    assert not summary["preempted"] and summary["step"] == 10
    assert {s: r["steps"] for s, r in summary["stages"].items()} == {"warmup": 3, "ccr": 4, "imt": 3}
    for stage, steps in (("warmup", 3), ("ccr", 4), ("imt", 3)):
        with open(os.path.join(workdir, f"stage_{stage}", "DONE.json")) as f:
            assert json.load(f)["final_step"] == steps
    rows = _rows(workdir)
    assert [(r["stage"], r["step"]) for r in rows] == ([("warmup", s) for s in (1, 2, 3)]
                                                       + [("ccr", s) for s in (4, 5, 6, 7)]
                                                       + [("imt", s) for s in (8, 9, 10)])
    for row in rows:
        keys = {"warmup": ("loss", "grad_norm", "memory_rms"), "ccr": GRPO_KEYS, "imt": IMT_KEYS}[row["stage"]]
        assert all(np.isfinite(row[k]) for k in keys), row
        assert "trajectory" not in row and "lengths" not in row
    ccr = [r for r in rows if r["stage"] == "ccr"]
    assert all(r["ratio_mean"] == pytest.approx(1.0, abs=1e-5) for r in ccr)  # one update per rollout batch
    assert any(abs(r["r_causal"]) > 0 for r in ccr)  # the intervention changes the answers' likelihood
    assert all(0 < r["completion_length"] <= 8 for r in ccr)
    # Each stage's checkpoint holds the parameters it trained and nothing else.
    assert all(k.startswith("params.sampler.") for k in _saved_params(workdir, "warmup"))
    lora = _saved_params(workdir, "ccr")
    assert lora and all(k.startswith("params.backbone.") and k.rsplit(".", 1)[1] in ("lora_a", "lora_b")
                        for k in lora)
    assert all(k.startswith("params.autonomous.") for k in _saved_params(workdir, "imt"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["medsynapse"]["stages"] == list(trainer.STAGES)


def test_a_stage_ii_step_is_one_rollout_batch_whatever_its_updates(paths, tmp_path):
    """ccr.steps counts rollout batches (the paper's "200 steps with a rollout batch size of 32"). It counted
    optimizer updates: with 2 updates per batch, 3 steps ran 2 rollout batches and stopped at step 4, and the
    schedule spanned 3 of the 6 updates (the last at lr 0)."""
    config = _config(stages=("warmup", "ccr"))
    config.medsynapse.warmup.max_steps = 1
    config.data.prompt_buckets = (max(config.data.prompt_buckets),)  # one compile of each stage's programs
    c = config.medsynapse.ccr
    c.steps, c.num_updates, c.schedule = 3, 2, "warmup_cosine"
    summary = _run(config, tmp_path, paths)
    assert not summary["preempted"] and summary["stages"]["ccr"]["steps"] == 3 and summary["step"] == 4
    assert [(r["stage"], r["step"]) for r in _rows(str(tmp_path))] == [("warmup", 1)] + [
        ("ccr", s) for s in (2, 3, 4)]
    with open(tmp_path / "stage_ccr" / "DONE.json") as f:
        assert json.load(f)["final_step"] == 3
    with ocp.StandardCheckpointer() as ckpt:
        saved = flatten(ckpt.restore(str(tmp_path / "stage_ccr" / "3" / "state")))
    counts = {int(v) for k, v in saved.items() if k.endswith(".count")}
    assert counts == {6}, counts  # 3 rollout batches x 2 updates
    rates = [float(v) for k, v in saved.items() if k.endswith("hyperparams.learning_rate")]
    assert len(rates) == 1 and rates[0] > 0  # the last update's: the schedule spans all 6 updates


def test_load_trained_assembles_what_each_stage_trained(three_stage_run):
    workdir, _ = three_stage_run
    run = trainer.load_trained(workdir)
    assert run.stages_done == trainer.STAGES and run.steps == {"warmup": 3, "ccr": 4, "imt": 3}
    assert sorted(run.params) == ["autonomous", "backbone", "sampler"]  # E_ana is never part of a run
    assert run.backbone.lora.rank == 4 and run.autonomous is not None
    flat = flatten(run.params["backbone"])
    base = flatten(qwen3_vl_params.load_params(run.paths.backbone_dir, run.backbone.config))
    for path, value in base.items():  # the base weights are the backbone's own, bit for bit
        assert np.array_equal(np.asarray(flat[path]), np.asarray(value)), path
    lora_b = [p for p in flat if p.endswith("lora_b")]
    assert lora_b and all(float(jnp.max(jnp.abs(flat[p]))) > 0 for p in lora_b)  # Stage II moved every adapter
    fresh = trainer._init_autonomous(run.autonomous, run.config.seed + 4)
    for path, value in flatten(fresh).items():  # Stage III trained every leaf of A_psi
        assert not np.array_equal(np.asarray(value), np.asarray(flatten(run.params["autonomous"])[path])), path
    # The deployed model (backbone + LoRA + A_psi) generates from the loaded tree.
    cfg = trainer.pipeline_config(run.config)
    batch = next(make_train_iterator(run.paths.data_dir, run.paths.tokenizer_dir, cfg, k_max=cfg.k_max_slots))
    prefix = prefix_inputs(batch["prompt_ids"], batch["prompt_valid"], batch["image_grid_thw"], batch["pixel_patches"],
                           run.backbone.config)
    generate = deploy.make_generate(run.backbone, run.autonomous, SamplingConfig(max_new_tokens=3))
    tokens, lengths = generate(deploy.deployable_params(run.params), prefix)
    assert tokens.shape == (cfg.batch_size, 3) and int(jnp.min(lengths)) >= 1


def test_a_branch_keeps_the_run_up_to_a_finished_stage_for_its_later_stages_to_train_again(three_stage_run, tmp_path):
    """Several CCR / IMT variants on one Stage I: a branch holds the run up to the stage (checkpoints, features,
    paths, its metrics rows, the recorded stages ending there) and the original is left as it was."""
    from vital_jax.medsynapse import branch

    workdir, _ = three_stage_run
    before = sorted(os.listdir(workdir))
    out = tmp_path / "after_ccr"
    result = branch.branch(workdir, "ccr", str(out))
    assert result["stages"] == ("warmup", "ccr") and result["steps"] == {"warmup": 3, "ccr": 4}
    assert sorted(os.listdir(workdir)) == before and not os.path.exists(str(out) + ".partial")
    assert not (out / "stage_imt").exists() and (out / trainer.FEATURES_DIR).is_dir()
    # Its paths lie outside the run (the shared demo assets): recorded as they were, nothing more copied.
    assert trainer.trained_paths(str(out)) == trainer.trained_paths(workdir)
    assert set(os.listdir(out)) <= set(before)
    # What binds the run's later stages comes along: its training records and global batch.
    for name in ("train_records.json", GLOBAL_BATCH_FILE):
        assert (out / name).read_text() == open(os.path.join(workdir, name)).read(), name
    assert [(r["stage"], r["step"]) for r in _rows(str(out))] == [("warmup", s) for s in (1, 2, 3)] + [
        ("ccr", s) for s in (4, 5, 6, 7)]
    recorded, original = trainer.read_config(str(out)), trainer.read_config(workdir)
    assert recorded.medsynapse.stages == ["warmup", "ccr"] and recorded.medsynapse.imt == original.medsynapse.imt
    got, expected = trainer.load_trained(str(out)), trainer.load_trained(workdir, upto="ccr")
    assert got.stages_done == ("warmup", "ccr") and got.autonomous is None
    for part in ("sampler", "backbone"):
        flat = flatten(expected.params[part])
        for path, value in flatten(got.params[part]).items():
            assert np.array_equal(np.asarray(value), np.asarray(flat[path])), (part, path)
    # The command line; a stage the source has not finished, and a used --out, are refused.
    res = subprocess.run([sys.executable, "-m", "vital_jax.medsynapse.branch", f"--workdir={out}", "--stage=warmup",
                          f"--out={tmp_path / 'after_warmup'}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "after stage 'warmup'" in res.stdout and "3 metrics rows" in res.stdout, res.stderr
    assert trainer.finished_stages(str(tmp_path / "after_warmup")) == {"warmup": 3}
    with pytest.raises(CheckpointError, match="stage 'ccr' has not finished \\(finished: \\('warmup',\\)\\)"):
        branch.branch(str(tmp_path / "after_warmup"), "ccr", str(tmp_path / "nothing"))
    with pytest.raises(FileExistsError, match="not an empty directory"):
        branch.branch(workdir, "warmup", str(out))


def test_a_branch_copies_the_assets_its_paths_name_inside_the_run(three_stage_run, demo_assets, tmp_path):
    """A demo run's paths.json names its own demo/ folder (data, tokenizer, backbone, E_ana). The branch copied
    paths.json as it was, so it read the original's demo/ and failed to load once the original was deleted; it now
    copies the folder and names the copies. A path inside one of the run's own folders is refused."""
    from vital_jax.medsynapse import branch

    source = tmp_path / "demo_run"
    shutil.copytree(three_stage_run[0], source)
    shutil.copytree(demo_assets, source / "demo")
    recorded = dataclasses.asdict(trainer.trained_paths(str(source)))
    relative = {field: os.path.relpath(path, demo_assets) for field, path in recorded.items()}
    assert not any(r.startswith(os.pardir) for r in relative.values()), relative  # all four in the demo's folder
    (source / trainer.PATHS_FILE).write_text(json.dumps({f: str(source / "demo" / r) for f, r in relative.items()}))
    out = tmp_path / "branched"
    branch.branch(str(source), "warmup", str(out))
    shutil.rmtree(source)
    copies = {field: str(out / "demo" / r) for field, r in relative.items()}
    assert dataclasses.asdict(trainer.trained_paths(str(out))) == copies
    run = trainer.load_trained(str(out))
    assert run.stages_done == ("warmup",) and run.paths.data_dir == str(out / "demo" / relative["data_dir"])
    assert trainer.load_feature_store(str(out), run.paths).features.shape[0] > 0

    (out / trainer.PATHS_FILE).write_text(json.dumps(dict(recorded, encoder_dir=str(out / "stage_warmup"))))
    with pytest.raises(ValueError, match="encoder_dir=.*inside one of the run's own folders"):
        branch.branch(str(out), "warmup", str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused") and not os.path.exists(str(tmp_path / "refused") + ".partial")


def test_a_run_recorded_before_the_newer_fields_loads_exports_and_resumes(three_stage_run, paths, tmp_path):
    """A workdir whose config.json predates medsynapse.memory_position, imt.init and imt.memory_match (every run
    trained before them): `load_trained` failed on it with a traceback (AttributeError: 'memory_match') in evaluate
    and the HF export, and the same training command was refused ("fields differ: medsynapse.memory_position").
    The fields read back at the values older code trained with."""
    from conversion import medsynapse_export

    workdir = tmp_path / "old"
    shutil.copytree(three_stage_run[0], workdir)
    recorded = json.loads((workdir / "config.json").read_text())
    del recorded["medsynapse"]["memory_position"]
    for field in ("init", "memory_match"):
        del recorded["medsynapse"]["imt"][field]
    (workdir / "config.json").write_text(json.dumps(recorded))
    run = trainer.load_trained(str(workdir))
    assert run.stages_done == trainer.STAGES and trainer.memory_position(run.config) == "assistant_turn"
    assert run.config.medsynapse.imt.init == "random" and run.config.medsynapse.imt.memory_match == 0.0
    medsynapse_export.export_run(str(workdir), str(tmp_path / "export"))
    meta = json.loads((tmp_path / "export" / "medsynapse.json").read_text())
    assert (meta["memory_position"], meta["prompt_tail"]) == ("assistant_turn", 0)
    # The command older code ran (the added fields at the values it trained with) resumes it: nothing is left.
    config = _three_stage_config()
    config.medsynapse.imt.init = "random"
    summary = _run(config, workdir, paths)
    assert not summary["preempted"] and {s: r["steps"] for s, r in summary["stages"].items()} == run.steps
    config.medsynapse.memory_position = "user_turn"  # a placement the run was not trained with is still refused
    with pytest.raises(CheckpointError, match=r"fields differ: medsynapse\.memory_position"):
        _run(config, workdir, paths)


def test_flax_to_hf_exports_a_medsynapse_run_for_serving(three_stage_run, tmp_path, capsys):
    """`python -m conversion.flax_to_hf --checkpoint=<MedSynapse-V workdir>` writes medsynapse_export's layout (it
    took the run for a VITAL one: "no training checkpoint found in phase_*/"); a run without Stage III writes
    nothing."""
    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    from conversion import flax_to_hf, medsynapse_export

    workdir, _ = three_stage_run
    out = tmp_path / "export"
    assert flax_to_hf.main([f"--checkpoint={workdir}", f"--out={out}"]) == 0
    assert "(LoRA merged, A_psi, memory at assistant_turn)" in capsys.readouterr().out
    assert {"model.safetensors", "autonomous.safetensors", "medsynapse.json", "tokenizer.json"} <= set(os.listdir(out))
    run = trainer.load_trained(workdir)
    _, psi = medsynapse_export.load_autonomous(str(out))
    _assert_trees_equal(psi, run.params["autonomous"])
    HFQwen3VL.from_pretrained(str(out))

    no_imt = tmp_path / "no_imt"
    shutil.copytree(workdir, no_imt)
    shutil.rmtree(trainer.stage_dir(str(no_imt), "imt"))
    with pytest.raises(SystemExit):
        flax_to_hf.main([f"--checkpoint={no_imt}", f"--out={tmp_path / 'refused'}"])
    assert not (tmp_path / "refused").exists()


def test_stage_iii_can_start_a_psi_at_the_teachers_mean_memory(three_stage_run, paths, tmp_path):
    """imt.init = "teacher_mean": A_psi starts at the per-slot mean of P_phi(F) over the training images (checked here
    at lr = 0, where Stage III leaves it there), whatever the input."""
    straight_dir, _ = three_stage_run
    workdir = tmp_path / "teacher_mean"
    shutil.copytree(straight_dir, workdir, ignore=shutil.ignore_patterns("stage_imt"))
    os.remove(workdir / "config.json")  # the finished Stages I and II are reused under Stage III's new settings
    config = _three_stage_config()
    config.medsynapse.imt.init, config.medsynapse.imt.lr = "teacher_mean", 0.0
    config.medsynapse.imt.max_steps = 1  # at lr = 0 no step moves A_psi: one step (one program to compile) shows it
    _run(config, workdir, paths)
    run = trainer.load_trained(str(workdir))
    setup = trainer.build_setup(run.config, str(workdir), paths)
    split = run.config.data.train_split
    images = sorted({int(setup.store.image_rows[i]) for i, r in enumerate(setup.records) if r.split == split})
    assert len(images) >= 3 and len(images) < len([r for r in setup.records if r.split == split])
    everything = setup.sampler.apply({"params": run.params["sampler"]}, jnp.asarray(setup.store.features[images]))
    want = np.mean(np.asarray(everything, np.float64), axis=0)  # each image once, however many questions it has
    # Batches of len - 1 images: the last one is padded.
    got = trainer.mean_teacher_memory(setup, run.params["sampler"], split, batch_size=len(images) - 1)
    assert got.shape == (run.autonomous.config.num_queries, run.autonomous.config.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert float(np.abs(want).max()) > 1e-3
    tokens = jnp.asarray(np.random.RandomState(0).randn(2, 7, run.autonomous.config.hidden_size), jnp.float32)
    memory = run.autonomous.apply({"params": run.params["autonomous"]}, tokens, jnp.ones((2, 7), bool))
    np.testing.assert_allclose(np.asarray(memory), np.broadcast_to(got, memory.shape), atol=1e-6)


class _Crash(RuntimeError):
    """Stands for a kill -9: the process dies after logging a step and before checkpointing it."""


def test_a_crash_in_stage_ii_and_a_preemption_in_stage_iii_resume_exactly(three_stage_run, paths, tmp_path,
                                                                          caplog):
    straight_dir, _ = three_stage_run
    config = _three_stage_config()
    workdir = str(tmp_path / "resumed")

    def crash(stage, step):
        if (stage, step) == ("ccr", 3):  # checkpoints every 2 steps: the rerun restarts from Stage II's step 2
            raise _Crash

    with pytest.raises(_Crash):
        _run(config, workdir, paths, on_step=crash)
    run = trainer.load_trained(workdir)
    assert run.stages_done == ("warmup",) and run.backbone.lora is None and "autonomous" not in run.params

    def preempt(stage, step):
        if (stage, step) == ("imt", 1):
            trainer.request_preemption()

    second = _run(config, workdir, paths, on_step=preempt)
    assert second["preempted"] and second["stages"]["imt"]["steps"] == 1
    # Stage I is not redone; the summary keeps what it logged (its last row: the crashed run logged nothing later)
    warmup_rows = [r for r in _rows(workdir) if r.get("stage") == "warmup"]
    assert second["stages"]["warmup"]["metrics"] == {k: v for k, v in warmup_rows[-1].items()
                                                    if k not in ("step", "time")}
    assert second["stages"]["ccr"]["steps"] == 4
    with caplog.at_level("WARNING"):
        after_ccr = trainer.load_trained(workdir)
    assert "after stage 'ccr'; stage(s) ('imt',) of the run have not finished" in caplog.text   # said, not silent
    assert after_ccr.stages_done == ("warmup", "ccr") and after_ccr.backbone.lora is not None
    assert sorted(after_ccr.params) == ["backbone", "sampler"] and after_ccr.autonomous is None

    third = _run(config, workdir, paths)
    assert not third["preempted"] and {s: r["steps"] for s, r in third["stages"].items()} == \
        {"warmup": 3, "ccr": 4, "imt": 3}
    assert third["stages"]["ccr"]["metrics"] == second["stages"]["ccr"]["metrics"]
    # Every step logged once, with the uninterrupted run's numbers; the crashed step's row was moved aside.
    expected = {r["step"]: r for r in _rows(straight_dir)}
    got = {r["step"]: r for r in _rows(workdir)}
    assert sorted(got) == sorted(expected) and len(_rows(workdir)) == len(got)
    for step, row in expected.items():
        assert got[step]["stage"] == row["stage"]
        keys = GRPO_KEYS if row["stage"] == "ccr" else ("loss", "grad_norm")
        for key in keys:
            assert got[step][key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), (step, key)
    assert [(r["stage"], r["step"]) for r in _rows(workdir, "metrics.rewound.jsonl")] == [("ccr", 6)]
    # ... and the same trained parameters; Stage III left the backbone (+ LoRA) and P_phi as Stage II had them.
    final, reference = trainer.load_trained(workdir), trainer.load_trained(straight_dir)
    for top in ("backbone", "sampler", "autonomous"):
        _assert_trees_equal(final.params[top], reference.params[top], exact=False)
    for top in ("backbone", "sampler"):
        _assert_trees_equal(final.params[top], after_ccr.params[top])


def test_train_command_dispatches_a_medsynapse_config(three_stage_run, demo_assets, tmp_path):
    """`python -m vital_jax.train` with a MedSynapse-V config runs its stages. Its settings are the three-stage
    run's (Stage II for one step: its schedule is constant), so the command compiles nothing that run did not (the
    session's compilation cache) and its Stage I repeats that run's losses."""
    workdir = tmp_path / "cli"
    shutil.copytree(demo_assets, workdir / "demo")
    shrink = ["--config.logging.every_steps=1", "--config.medsynapse.warmup.epochs=2",
              "--config.medsynapse.warmup.max_steps=3", "--config.medsynapse.ccr.steps=1",
              "--config.medsynapse.ccr.num_generations=2", "--config.medsynapse.ccr.max_new_tokens=8",
              "--config.medsynapse.ccr.lora.rank=4", "--config.medsynapse.ccr.lora.alpha=8.0",
              "--config.medsynapse.imt.max_steps=3", "--config.medsynapse.imt.max_new_tokens=8"]
    res = subprocess.run([sys.executable, "-m", "vital_jax.train", "--config=configs/medsynapse_demo.py",
                          f"--workdir={workdir}", *DEMO_TEST_OVERRIDES, *shrink], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MedSynapse-V training finished at step 7" in res.stdout, res.stdout
    expected, got = _losses(three_stage_run[0], "warmup"), _losses(str(workdir), "warmup")
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    with open(workdir / "train_summary.json") as f:
        summary = json.load(f)
    assert list(summary["stages"]) == list(trainer.STAGES) and not summary["preempted"]
    assert summary["paths"]["encoder_dir"].endswith("roi_encoder")
    with open(workdir / "config.json") as f:
        assert json.load(f)["method"] == "medsynapse"
    assert [r["stage"] for r in _rows(str(workdir))] == ["warmup"] * 3 + ["ccr"] + ["imt"] * 3
    for stage in trainer.STAGES:
        assert os.path.isfile(workdir / f"stage_{stage}" / "DONE.json")


# ---- Evaluation of a trained run --------------------------------------------------------------------------------

def test_evaluation_answers_with_either_memory_branch_and_the_teacher_sees_the_stored_features(three_stage_run,
                                                                                             tmp_path, monkeypatch):
    from vital_jax.data.records import RECORDS_FILE, read_records
    from vital_jax.eval import load_benchmark
    from vital_jax.evaluate import evaluate_medsynapse
    from vital_jax.medsynapse import memory as memory_lib
    from vital_jax.medsynapse import predict

    workdir, _ = three_stage_run
    run = trainer.load_trained(workdir)
    out = tmp_path / "eval"
    summaries = evaluate_medsynapse(workdir, "phantom_vqa", run.paths.data_dir, str(out), ["autonomous", "sampler"],
                                    split="train", limit=5, batch_size=2, trained=run, latency_examples=2)
    assert [s["meta"]["memory"] for s in summaries] == ["autonomous", "sampler"]
    for s, memory in zip(summaries, ("autonomous", "sampler")):
        assert s["count"] == 5 and "overall" in s and s["meta"]["stages"] == list(trainer.STAGES)
        assert s["meta"]["memory_position"] == "assistant_turn"  # where the answers' memory went, as trained
        assert len((out / memory / "phantom_vqa.predictions.jsonl").read_text().splitlines()) == 5

    # Evaluating the run again (the study evaluates a test and a select split) reuses each branch's predictors and
    # their compiled programs: nothing is built, traced or loaded again, and the answers are the same.
    built = dict(run.predictors)
    assert sorted(built) == [(m, size, int(run.config.data.max_answer_tokens)) for m in ("autonomous", "sampler")
                             for size in (1, 2)]
    traced = []
    generate = memory_lib.generate
    monkeypatch.setattr(memory_lib, "generate", lambda *a, **k: traced.append(a) or generate(*a, **k))
    monkeypatch.setattr(predict, "anatomical_encoder", lambda *a: pytest.fail("E_ana loaded again"))
    again = evaluate_medsynapse(workdir, "phantom_vqa", run.paths.data_dir, str(tmp_path / "again"), ["sampler"],
                                split="train", limit=5, batch_size=2, trained=run, latency_examples=2)
    assert traced == [] and run.predictors.keys() == built.keys()
    assert all(run.predictors[k] is built[k] for k in built)

    def predictions(directory):
        return [json.loads(line)["prediction"] for line in (directory / "phantom_vqa.predictions.jsonl").open()]

    assert predictions(tmp_path / "again") == predictions(out / "sampler") and again[0]["count"] == 5
    monkeypatch.undo()

    # The deployed predictor's program gets exactly the backbone (+ LoRA) and A_psi.
    assert sorted(predict.MemoryPredictor(run, "autonomous", 2, 4).params) == ["autonomous", "backbone"]
    with pytest.raises(ValueError, match="Stage III"):
        predict.check_memory("autonomous", ("warmup", "ccr"))

    # The teacher branch runs E_ana on the image at evaluation: the same F as the store training read, and the
    # same answer as memory.generate with the stored F.
    max_new_tokens = int(run.config.data.max_answer_tokens)  # evaluate's: this is the predictor it built
    teacher = predict.shared_predictor(run, "sampler", 2, max_new_tokens)
    encoder, encoder_params = teacher.encoder, teacher.params["encoder"]
    examples = load_benchmark("phantom_vqa", run.paths.data_dir, split="train", limit=2)
    rows = {r.id: i for i, r in enumerate(read_records(os.path.join(run.paths.data_dir, RECORDS_FILE)))}
    encoded, n = teacher.encode([e.image for e in examples], [e.prompt for e in examples])
    stored = trainer.load_feature_store(workdir, run.paths).gather(
        np.asarray([rows[e.id] for e in examples]))["feature_map"]
    prefix, pixels = encoded
    np.testing.assert_allclose(np.asarray(encoder.feature_map(encoder_params, pixels)), stored, atol=1e-5)
    memory = run.sampler.apply({"params": run.params["sampler"]}, jnp.asarray(stored))
    # Jitted: run op by op, this reference compiled each of its few hundred operations (most of the test's time).
    reference = jax.jit(lambda params, prefix, memory: memory_lib.generate(run.backbone, params, prefix, memory,
                                                                           teacher.sampling))
    tokens, lengths = reference(run.params["backbone"], prefix, memory)
    expected = [teacher.decode(t, length) for t, length in zip(np.asarray(tokens), np.asarray(lengths))]
    assert teacher.run_encoded(encoded, n)[0] == expected

    # A run trained with `scan_layers` is decoded with the layers unrolled, and answers as the run's own layout.
    config = run.backbone.config
    scanned = dataclasses.replace(
        run, backbone=type(run.backbone)(dataclasses.replace(config, text=dataclasses.replace(
            config.text, scan_layers=True)), run.backbone.lora),
        params={**run.params, "backbone": qwen3_vl_params.to_layout(run.params["backbone"], True)})
    assert "layers" in scanned.params["backbone"]["language_model"]["model"]
    # (A replaced run shares `predictors` with the run it replaces, and gets its own predictor from it.)
    deployed = predict.shared_predictor(scanned, "autonomous", 2, max_new_tokens)
    assert deployed is not built[("autonomous", 2, max_new_tokens)]
    assert "layers" not in deployed.params["backbone"]["language_model"]["model"]
    encoded, n = deployed.encode([e.image for e in examples], [e.prompt for e in examples])
    assert deployed.run_encoded(encoded, n)[0] == predict.MemoryPredictor(
        run, "autonomous", 2, max_new_tokens).run_encoded(encoded, n)[0]


def test_evaluate_command_answers_a_medsynapse_run_and_refuses_latent_steps(three_stage_run, tmp_path):
    workdir, _ = three_stage_run
    data_dir = trainer.load_trained(workdir).paths.data_dir
    common = [sys.executable, "-m", "vital_jax.evaluate", f"--checkpoint={workdir}", "--benchmark=phantom_vqa",
              f"--data_dir={data_dir}", f"--out={tmp_path}/eval", "--split=train", "--limit=4"]
    wrong = subprocess.run(common + ["--latent_steps=2"], capture_output=True, text=True, cwd=REPO)
    assert wrong.returncode == 2 and "--memory" in wrong.stderr and "Traceback" not in wrong.stderr
    # Batches of 2, as the evaluation test's: the command finds those programs in the session's compilation cache.
    right = subprocess.run(common + ["--memory=autonomous", "--batch_size=2", "--latency_examples=1"],
                           capture_output=True, text=True, cwd=REPO)
    assert right.returncode == 0, right.stderr[-2000:]
    assert "memory=autonomous: 4 questions" in right.stdout and "closed" in right.stdout


@pytest.mark.parametrize("value", [None, True, False])
def test_rollout_relayout_reaches_stage_ii(value):
    """`medsynapse.rollout_relayout` (unset: decided by the mesh) is what Stage II's GRPOConfig decodes with; Stage
    III passes the same field to `imt.make_train_step` (its layout is tested in test_imt)."""
    config = medsynapse_demo.get_config()
    assert config.medsynapse.rollout_relayout is None
    config.medsynapse.rollout_relayout = value
    assert trainer.grpo_config(config, (1,), 0).rollout_relayout is value
