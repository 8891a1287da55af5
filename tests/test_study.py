"""The learning study (vital_jax.study): its rows, floors, paired test and report; and the quick study end to end
(PhantomVQA -> pretraining -> fine-tuning rows -> evaluation) with resumption."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs.study import phantom as study_config
from tests import fast_compile
from vital_jax import study

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out


def test_mcnemar_is_the_exact_binomial_test_with_one_question_per_unit():
    a = {str(i): True for i in range(10)}
    b = dict(a, **{str(i): False for i in range(5)})  # a right and b wrong on 5, never the reverse
    t = study.mcnemar(a, b)
    assert (t["a_only"], t["b_only"], t["a_ahead"], t["b_ahead"]) == (5, 0, 5, 0)
    assert math.isclose(t["p"], 2 / 2 ** 5)
    assert study.mcnemar(a, a)["p"] == 1.0
    # Only paired ids count.
    assert study.mcnemar(a, {"0": False})["a_only"] == 1
    # Any split of the discordant answers: twice the smaller binomial tail (at most 1).
    rng = np.random.default_rng(0)
    for n01, n10 in [(7, 2), (3, 3), (0, 4), (12, 5), (1, 0)]:
        ids = [str(i) for i in rng.permutation(n01 + n10 + 3)]
        a = {i: n < n01 or n >= n01 + n10 for n, i in enumerate(ids)}   # the last 3: both right
        b = {i: n >= n01 for n, i in enumerate(ids)}
        n = n01 + n10
        tail = sum(math.comb(n, j) for j in range(min(n01, n10) + 1)) / 2 ** n
        t = study.mcnemar(a, b, {i: f"image of {i}" for i in ids})
        assert (t["a_only"], t["b_only"]) == (n01, n10) and math.isclose(t["p"], min(1.0, 2 * tail)), (n01, n10)


def test_mcnemar_over_clusters_flips_each_clusters_difference_as_one():
    # Image x: a right and b wrong on 3 questions (d = +3); image y: the reverse on 1 (d = -1). Sign patterns of
    # (3, 1): sums 4, 2, -2, -4, every one as far from 0 as the observed 2, so p = 1 (per question: 3 vs 1, 0.625).
    a = {"x0": True, "x1": True, "x2": True, "y0": False, "y1": True}
    b = {"x0": False, "x1": False, "x2": False, "y0": True, "y1": True}
    clusters = {"x0": "x", "x1": "x", "x2": "x", "y0": "y", "y1": "y"}
    t = study.mcnemar(a, b, clusters)
    assert (t["a_only"], t["b_only"], t["a_ahead"], t["b_ahead"], t["p"]) == (3, 1, 1, 1, 1.0)
    assert math.isclose(study.mcnemar(a, b)["p"], 2 * 5 / 16)
    # Three images, each d = +2: 6 questions one way, but only 3 independent units: p = 2 / 2^3, not 2 / 2^6.
    a = {f"{image}{q}": True for image in "uvw" for q in range(2)}
    b = {i: False for i in a}
    t = study.mcnemar(a, b, {i: i[0] for i in a})
    assert (t["a_only"], t["a_ahead"]) == (6, 3) and math.isclose(t["p"], 0.25)
    # A unit whose questions cancel (d = 0) is left out, like a tie.
    a["z0"], a["z1"], b["z0"], b["z1"] = True, False, False, True
    assert math.isclose(study.mcnemar(a, b, {i: i[0] for i in a})["p"], 0.25)
    with pytest.raises(ValueError, match="z1"):
        study.mcnemar(a, b, {i: i[0] for i in a if i != "z1"})


def test_rows_edit_the_training_config_as_described(monkeypatch):
    from vital_jax import train as train_lib

    # The curriculum's optimizer steps per phase on this (pretend) data: the mix rows stop after their sum.
    monkeypatch.setattr(train_lib, "phase_steps", lambda c, data_dir, capped=True: [10, 20, 30])
    config = study_config.get_config()
    models = {"backbone_dir": "/b", "decoder_dir": "/d"}
    edit = lambda row: study.run_config(config, row, 3, "/data", models)  # noqa: E731
    base = edit("vital")
    assert base.seed == 3 and base.model.backbone_dir == "/b" and base.data.data_dir == "/data"
    assert (base.vital.lambda_text, base.vital.lambda_visual) == (1.0, 0.1)
    assert base.curriculum.max_k == (1, 2, 4) and base.vital.latent_input == "feedback"
    assert edit("backbone").optimizer.lr == 0.0 and edit("backbone").curriculum.max_steps == 1
    assert base.curriculum.max_steps == edit("sft_k0").curriculum.max_steps == edit("k2").curriculum.max_steps == 0
    assert [edit(f"mix_k{k}").curriculum.max_steps for k in (1, 2, 3, 4)] == [60] * 4
    # The SFT and text-only controls at the curriculum's steps: the same rows otherwise.
    for row in ("sft_k0", "text_only"):
        matched, full = edit(f"{row}_matched"), edit(row)
        assert matched.curriculum.max_steps == 60 and full.curriculum.max_steps == 0
        matched.curriculum.max_steps = 0
        assert matched.to_dict() == full.to_dict()
    sft = edit("sft_k0")
    assert sft.vital.latent_steps_cap == 0 and sft.curriculum.max_k == (4,)
    # Without the curriculum: one phase of the curriculum's total epochs, or of `epochs_without_curriculum` when
    # that is set; the backbone row (nothing trains) stays at 1.
    assert config.epochs_without_curriculum == 0
    assert sft.curriculum.epochs == (sum(base.curriculum.epochs),) == (3,)
    config.epochs_without_curriculum = 2
    assert edit("sft_k0").curriculum.epochs == (2,)
    assert edit("mix_k2").curriculum.epochs == edit("text_only").curriculum.epochs == (2,)
    assert edit("backbone").curriculum.epochs == (1,)
    config.epochs_without_curriculum = 0
    assert edit("text_only").data.blind_images and not base.data.blind_images
    assert (edit("task_only").vital.lambda_text, edit("task_only").vital.lambda_visual) == (0.0, 0.0)
    assert edit("semantic").vital.lambda_visual == 0.0 and edit("visual").vital.lambda_text == 0.0
    assert edit("pause").vital.latent_input == "pause"
    assert edit("k2").vital.latent_steps_cap == 2 and edit("k2").curriculum.max_k == (1, 2, 4)
    assert edit("mix_k2").vital.latent_steps_cap == 2 and edit("mix_k2").curriculum.max_k == (4,)
    with pytest.raises(study.StudyError, match="unknown study row"):
        edit("k9")
    # MedSynapse-V rows: the method's section with the study's overrides, on the same seed's SFT backbone.
    ms = study.run_config(config, "ms_ccr", 3, "/data", dict(models, medsynapse_backbone_dir="/sft", encoder_dir="/e"))
    assert ms.method == "medsynapse" and ms.model.backbone_dir == ms.model.tokenizer_dir == "/sft"
    assert ms.model.roi_encoder_dir == "/e"   # E_ana, recorded with the run's config
    assert ms.medsynapse.stages == ("warmup", "ccr", "imt") and ms.medsynapse.sampler.num_heads == 4
    assert ms.seed == 3 and ms.data.data_dir == "/data"


def test_a_medsynapse_rows_train_call_runs_the_stages_up_to_its_own(tmp_path):
    """So that a row's train time is its own stage's cost (the whole chain was billed to ms_warmup before)."""
    stages, run_dir = ("warmup", "ccr", "imt"), str(tmp_path)
    assert study._stages_through(stages, "warmup", run_dir) == ("warmup",)
    assert study._stages_through(stages, "ccr", run_dir) == ("warmup", "ccr")
    assert study._stages_through(("warmup", "imt"), "imt", run_dir) == ("warmup", "imt")
    with pytest.raises(study.StudyError, match="needs stage 'ccr'"):
        study._stages_through(("warmup", "imt"), "ccr", run_dir)

    def recorded(*listed):
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"medsynapse": {"stages": list(listed)}}, f)

    recorded("warmup")   # a Stage I run: the ccr row's call adds its stage
    assert study._stages_through(stages, "ccr", run_dir) == ("warmup", "ccr")
    recorded(*stages)    # made all at once by an older study: a recorded list may not shrink
    assert study._stages_through(stages, "warmup", run_dir) == stages
    recorded("warmup", "imt")   # not this chain: the trainer refuses it, naming the recorded stages
    assert study._stages_through(stages, "ccr", run_dir) == ("warmup", "ccr")


def test_parallel_jobs_keep_each_seeds_medsynapse_rows_together_after_its_sft_run():
    plan = [("backbone", 0), ("sft_k0", 0), ("sft_k0", 1), ("vital", 0), ("ms_imt", 0), ("ms_warmup", 0),
            ("ms_warmup", 1), ("ms_warmup", 2)]
    jobs = study._jobs(plan)
    # A seed's MedSynapse-V rows in stage order (each row's call trains its own stage), whatever the plan's order.
    assert jobs[:3] == [([("ms_warmup", 0), ("ms_imt", 0)], ("sft_k0", 0)), ([("ms_warmup", 1)], ("sft_k0", 1)),
                        ([("ms_warmup", 2)], None)]  # seed 2's sft_k0 is not in the plan: trained by that job
    # Then seed by seed, each seed's sft_k0 first: the runs in flight together are different rows.
    assert [runs for runs, _ in jobs[3:]] == [[("sft_k0", 0)], [("backbone", 0)], [("vital", 0)], [("sft_k0", 1)]]
    assert sorted(run for runs, _ in jobs for run in runs) == sorted(plan)


def _fake_result(row, seed, closed, ids):
    rng = np.random.default_rng(seed)
    correct = {i: bool(rng.uniform() < closed) for i in ids}
    per_type = {"yes_no": {"score": closed, "count": 10}, "location_choice": {"score": closed, "count": 10},
                "location": {"score": 0.8, "count": 10}}
    part = {"closed_accuracy": closed, "closed_majority_baseline": 0.3, "open_token_f1": 0.8, "latency_ms": 3.0,
            "per_type": per_type, "closed_correct": correct}
    return {"row": row, "seed": seed, "k_eval": 4, "steps": 10, "train_s": 1.0, "eval_s": 1.0,
            "samples_per_sec": 50.0, "test": part, "select": part,
            "diagnostics": {"step_similarity": np.eye(4).tolist(), "norm_ratio_per_step": [1.0, 1.1, 1.2, 1.3]},
            "curve": [(10, 2.0, 1.5), (20, 1.0, 0.8)], "reused": False}


def test_report_puts_floors_beside_mean_and_std_and_draws_the_figures(tmp_path):
    ids = [f"q{i}" for i in range(40)]
    results = [_fake_result(row, seed, closed, ids) for row, closed in (("sft_k0", 0.5), ("vital", 0.7),
                                                                        ("task_only", 0.6), ("k2", 0.65),
                                                                        ("ms_imt", 0.45), ("text_only", 0.4),
                                                                        ("sft_k0_matched", 0.45))
               for seed in (0, 1)]
    results.append(dict(_fake_result("backbone", 0, 0.1, ids), samples_per_sec=None))  # one run: 1 lr-0 step
    floor = {"yes_no": {"chance": 0.5, "majority": 0.5, "majority_by_options": 0.5, "count": 10},
             "location_choice": {"chance": 1 / 3, "majority": 0.2, "majority_by_options": 0.4, "count": 10},
             "location": {"majority_f1": 0.6, "count": 10}, "open": {"majority_f1": 0.6, "count": 10},
             "closed": {"chance": 0.42, "majority": 0.3, "majority_by_type": 0.35, "majority_by_options": 0.45,
                        "strongest": 0.45, "count": 20}}
    for r in results:
        if r["row"] == "vital":  # answered at each question's own training K as well
            r["test_record_k"] = dict(r["test"], closed_accuracy=0.9)
        r["commit"] = "old" if r["row"] == "k2" else "abc"
    config = study_config.get_config()
    select_floor = {"closed": {"chance": 0.4, "majority": 0.3, "strongest": 0.55, "count": 9},
                    "open": {"majority_f1": 0.25, "count": 5}}
    os.makedirs(tmp_path / "report")
    (tmp_path / "report" / "old_figure.png").write_bytes(b"an earlier report's figure")
    units = {i: study.TestRecord(f"image{n // 4}.png", f"mask{n}.png", "liver") for n, i in enumerate(ids)}
    path = study.write_report(str(tmp_path), config, results, floor, {}, {"command": "cmd", "commit": "abc"},
                              select_floor=select_floor, test_records=units)   # 4 questions per image
    assert not (tmp_path / "report" / "old_figure.png").exists()  # a figure this report does not draw
    text = open(path).read()
    validation = text.split("## Validation split")[1].split("##")[0]
    assert "9 closed questions" in validation and "| *floor* | 55.0 | 25.0 |" in validation
    own_k = text.split("## Each question answered at its own training K")[1].split("##")[0]
    assert "| vital | 90.0 ± 0.0 |" in own_k and "| sft_k0 |" not in own_k
    assert "| *floor* |" in text and "| – | – | 45.0 | 50.0 | 40.0 |" in text  # the strongest floor, per type too
    floors = text.split("## Floors (test split)")[1].split("##")[0]
    assert "| location_choice | 10 | 33.3 | 20.0 | – | 40.0 | – |" in floors   # counts and every floor
    assert "| closed | 20 | 42.0 | 30.0 | 35.0 | 45.0 | – |" in floors and "| open | 10 |" in floors
    assert "| vital |" in text and "70.0 ± 0.0" in text and "| vital | full VITAL" in text
    assert "McNemar" in text and "| ms_imt | sft_k0 |" in text
    # Each seed tested (the first only, before), the key control among them, Holm-adjusted over the table.
    fixed = text.split("## Paired tests (exact McNemar")[1].split("##")[0]
    assert "| sft_k0 | text_only | 0 |" in fixed and "| sft_k0 | text_only | 1 |" in fixed
    assert "| vital | sft_k0 | 1 |" in fixed and "| sft_k0 | backbone | 1 |" in fixed  # the one backbone run
    ps = [(float(cells[8]), float(cells[9])) for cells in (line.split("|") for line in fixed.splitlines()
                                                          if line.startswith("| ") and "seed" not in line)]
    assert ps and all(holm >= p for p, holm in ps)
    # The unit is the image: the test of each line is McNemar's over the questions' images.
    assert "the 10 test images hold the 40 closed questions" in fixed and "| images where a is ahead |" in fixed
    by_row = {(r["row"], r["seed"]): r["test"]["closed_correct"] for r in results}
    expected = study.mcnemar(by_row["vital", 1], by_row["sft_k0", 1], {i: r.image for i, r in units.items()})
    line = next(line for line in fixed.splitlines() if line.startswith("| vital | sft_k0 | 1 |"))
    assert line.startswith(f"| vital | sft_k0 | 1 | {expected['a_only']} | {expected['b_only']} | "
                           f"{expected['a_ahead']} | {expected['b_ahead']} | {expected['p']:.3g} |"), line
    assert expected["a_ahead"] + expected["b_ahead"] <= 10
    own = text.split("## Paired tests at each question's own training K")[1].split("##")[0]
    assert "| vital | sft_k0 | 0 |" in own and "| vital | pause |" not in own
    # The SFT control at the latent rows' budget, tested against them (text_only_matched is not in this study).
    assert "| vital | sft_k0_matched | 1 |" in fixed and "| vital | sft_k0_matched | 1 |" in own
    assert "| sft_k0_matched | text_only_matched |" not in fixed
    assert "nan" not in text                                          # the backbone's samples/s is "–"
    assert "| ms_imt | ms_ccr |" not in text  # a pair is tested when the study has both rows
    assert "a row's train time, samples/s and steps are its own stage's" in text
    assert "Reused runs made at other commits: `old` (2)" in text  # the k2 runs came from other code
    assert "All 15 runs: 0 min of training and evaluation" in text
    for name in ("accuracy_vs_k.png", "per_type.png", "step_similarity.png", "norm_ratio.png",
                 "learning_curves.png", "medsynapse_curves.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000, name


def test_study_figures_in_each_format(tmp_path, monkeypatch):
    from vital_jax.eval import study_plots

    results = [_fake_result(row, seed, closed, [f"q{i}" for i in range(40)])
               for row, closed in (("sft_k0", 0.5), ("vital", 0.7), ("task_only", 0.6)) for seed in (0, 1)]
    # Figure 11's panels: task-only, + L_visual and VITAL (the pause control beside them when it ran).
    drawn = []
    monkeypatch.setattr(study_plots.figures, "similarity_matrix", lambda fig, ax, m, title: drawn.append(title))
    study_plots.step_similarity(str(tmp_path / "s.png"), study.aggregate(
        results + [_fake_result("visual", 0, 0.6, [f"q{i}" for i in range(40)])]))
    assert drawn == ["task_only", "visual", "vital"]
    monkeypatch.undo()
    floor = {"yes_no": {"chance": 0.5, "majority": 0.5, "count": 10},
             "closed": {"chance": 0.42, "majority": 0.3, "majority_by_type": 0.45, "strongest": 0.45, "count": 20}}
    by_row = study.aggregate(results)
    assert "MedSynapse-V stage curves" not in study_plots.write_figures(str(tmp_path / "none"), by_row, floor)
    # Each MedSynapse-V stage's curve on its own axis: the metric the study logs for it (an older result holds
    # its stage's loss, with no "curve_metric").
    for row, metric in (("ms_warmup", "loss"), ("ms_ccr", study.MEDSYNAPSE_CURVE_METRICS["ccr"]), ("ms_imt", None)):
        result = _fake_result(row, 0, 0.4, [f"q{i}" for i in range(40)])
        if metric:
            result["curve_metric"] = metric
        results.append(result)
    by_row = study.aggregate(results)
    for fmt, magic in (("svg", b"<svg"), ("pdf", b"%PDF-")):
        made = study_plots.write_figures(str(tmp_path / fmt), by_row, floor, fmt)
        assert set(made) >= {"accuracy against K", "step similarity", "MedSynapse-V stage curves"}
        for path in made.values():
            assert path.endswith(f".{fmt}") and magic in open(path, "rb").read(4096), path


# The quick study shrunk further, as command-line overrides of configs/study/phantom.py:quick: one seed, the
# lr = 0 backbone, SFT at K = 0 and MedSynapse-V's Stage I (10 steps from the SFT model, answered with P_phi's
# memory: the study's MedSynapse-V path; its later stages are tests/medsynapse's).
# 60 training phantoms: with 30 (and the text-only row beside them, in the same time) sft_k0 beat the majority
# answer by one or two of the 47 closed test questions (21.3 vs 19.1 %; once 17.0 %, below it); with 60 it
# answered 44.7 % (21 of 47). The text-only control is the full study's (and test_rows_edit's) business.
# max_answer_tokens as when this was sized; latency_examples 1: the report's latency column only needs a number.
# The session's own compilation cache (tests/conftest.py, every program) serves the study better than the study's
# (workdir/xla_cache, programs over 0.5 s), which would replace it while the study runs.
QUICK_STUDY_OVERRIDES = {
    "rows": ("backbone", "sft_k0", "ms_warmup"), "medsynapse.stages": ("warmup",), "medsynapse.warmup.max_steps": 10,
    "data.split_counts": (60, 4, 16), "train.curriculum.epochs": (2, 2, 3), "train.optimizer.lr": 3e-3,
    "train.data.max_answer_tokens": 64, "eval.diagnostics_examples": 8, "eval.latency_examples": 1,
    "compilation_cache": False, "parallel_runs": 1}  # parallel_runs 1: one after another; the rerun goes parallel
QUICK_STUDY_COMMAND = "python -m vital_jax.study --config=configs/study/phantom.py:quick --workdir=DIR"


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """The study command itself, run on the quick study shrunk further (QUICK_STUDY_OVERRIDES): PhantomVQA ->
    the shipped pretrained backbone -> three runs -> evaluation -> report. It runs in its own process with XLA's
    default optimisation: the session's fast-compile flags (tests/fast_compile.py) halve compile times but make
    this fixture's ~500 training steps 2.3x slower, and they are most of its time."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path_factory.mktemp("study"))
    env = dict(os.environ, XLA_FLAGS=fast_compile.without(os.environ.get("XLA_FLAGS", "")))
    overrides = [f"--config.{key}={value!r}" for key, value in QUICK_STUDY_OVERRIDES.items()]
    res = subprocess.run([sys.executable, "-m", "vital_jax.study", "--config=configs/study/phantom.py:quick",
                          f"--workdir={workdir}", *overrides], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, f"the study command failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    config = study_config.get_config("quick")
    for key, value in QUICK_STUDY_OVERRIDES.items():
        *parents, leaf = key.split(".")
        section = config
        for name in parents:
            section = section[name]
        section[leaf] = value
    out = json.load(open(os.path.join(workdir, study.RESULTS_FILE)))
    out["report"] = os.path.join(workdir, "report", study.REPORT_FILE)
    assert f"report: {out['report']}" in res.stdout, res.stdout[-2000:]
    return config, workdir, out


def test_quick_study_trains_a_model_that_beats_the_majority_answer(quick_study):
    config, workdir, out = quick_study
    by_row = {r["row"]: r for r in out["results"]}
    assert set(by_row) == set(config.rows)
    floor = out["floors"]["closed"]
    # Floors computed in this run, from this test split.
    assert 0 < floor["majority"] <= floor["majority_by_type"] < 1
    trained = by_row["sft_k0"]["test"]["closed_accuracy"]
    untrained = by_row["backbone"]["test"]["closed_accuracy"]
    assert trained > floor["majority"], (trained, floor)
    assert trained > untrained
    # Open answers (255 test questions here) above their floor, the most frequent answer of each type: the model
    # learned the answers, not one sentence. The closed questions are too few at this size (47) to clear their
    # strongest floor (the option-set majority): the thirty-first session measured 40.4 % against 44.7 %; the
    # full study is where the image's use is measured (docs/results/phantom_study).
    open_f1, open_floor = by_row["sft_k0"]["test"]["open_token_f1"], out["floors"]["open"]["majority_f1"]
    assert open_f1 > open_floor > by_row["backbone"]["test"]["open_token_f1"], (open_f1, open_floor)
    report = open(out["report"]).read()
    assert "| sft_k0 |" in report and "| backbone |" in report and "*floor*" in report
    # MedSynapse-V's row: trained from sft_k0's exported model, answered with P_phi(E_ana(X)).
    ms = by_row["ms_warmup"]
    assert ms["memory"] == "sampler" and 0 <= ms["test"]["closed_accuracy"] <= 1 and "| ms_warmup |" in report
    ms_paths = json.load(open(os.path.join(workdir, "runs", "medsynapse", "seed0", "paths.json")))
    assert ms_paths["backbone_dir"] == os.path.join(workdir, "runs", "sft_k0", "seed0", "export_hf")
    # Its recorded config names every path it trained with (so the train command can continue it).
    ms_config = json.load(open(os.path.join(workdir, "runs", "medsynapse", "seed0", "config.json")))
    assert ms_config["model"]["roi_encoder_dir"] == ms_paths["encoder_dir"] == os.path.join(workdir, "roi_encoder")


def test_a_rerun_of_the_study_reuses_every_finished_run(quick_study):
    config, workdir, first = quick_study
    # A run killed before it wrote its result is redone; the others are reused. The redo runs in a worker process
    # (parallel_runs 2) with its output in workdir/logs, and gives the same answers (lr 0: the backbone itself).
    before = {r["row"]: r for r in first["results"]}["backbone"]["test"]["closed_correct"]
    os.remove(os.path.join(workdir, "runs", "backbone", "seed0", study.RESULTS_FILE))
    config = config.copy_and_resolve_references()
    config.unlock()
    config.parallel_runs = 2
    again = study.study(config, workdir, QUICK_STUDY_COMMAND)
    assert sorted(again["reused"]) == ["ms_warmup/seed0", "sft_k0/seed0"]
    redone = {r["row"]: r for r in again["results"]}["backbone"]
    assert redone["steps"] == 1 and redone["test"]["closed_correct"] == before
    assert "training 1 steps" in open(os.path.join(workdir, "logs", "backbone-seed0.log")).read()
    assert json.load(open(os.path.join(workdir, study.RESULTS_FILE)))["results"]
    invocations = study._invocations(workdir)
    assert [(i["runs_made"], i["parallel_runs"]) for i in invocations] == [(3, 1), (1, 2)]
    assert "Wall clock:" in open(again["report"]).read()


def test_a_time_limit_stops_starting_runs_and_the_same_command_continues(tmp_path, monkeypatch):
    # Each (fake) run takes a minute of a fake clock; with a 1.5-minute limit the second run still starts (at
    # minute 1), the third does not, no report is written, and the same command then does the rest.
    clock = [0.0]
    made = []

    def run_one(config, row, seed, data_dir, models, runs_dir, commit):
        path = os.path.join(study.run_dir_of(runs_dir, row, seed), study.RESULTS_FILE)
        if os.path.exists(path):
            return dict(json.load(open(path)), reused=True)
        clock[0] += 60.0
        made.append((row, seed))
        os.makedirs(os.path.dirname(path))
        result = {"row": row, "seed": seed, "test": {"closed_accuracy": 0.5}, "select": {"closed_accuracy": 0.4}}
        json.dump(result, open(path, "w"))
        return dict(result, reused=False)

    monkeypatch.setattr(study.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(study, "run_one", run_one)
    monkeypatch.setattr(study, "prepare_data", lambda config, workdir: "/data")
    monkeypatch.setattr(study, "prepare_backbone", lambda config, workdir: {"summary": {}})
    monkeypatch.setattr(study, "floors", lambda data_dir, split: {"closed": {"majority": 0.5, "count": 10}})
    monkeypatch.setattr(study, "write_report", lambda workdir, config, results, *a, **k: os.path.join(workdir, "r.md"))
    monkeypatch.setattr(study, "_test_records", lambda data_dir, split: {})
    config = study_config.get_config()
    config.rows, config.seeds, config.parallel_runs, config.stop_after_minutes = ("sft_k0",), (0, 1, 2), 1, 1.5
    first = study.study(config, str(tmp_path))
    assert made == [("sft_k0", 0), ("sft_k0", 1)]
    assert first["report"] is None and first["left"] == ["sft_k0/seed2"]
    config.stop_after_minutes = 0.0  # may differ between the parts of one study
    again = study.study(config, str(tmp_path))
    assert made[2:] == [("sft_k0", 2)] and again["left"] == [] and again["report"]
    assert sorted(again["reused"]) == ["sft_k0/seed0", "sft_k0/seed1"]
    assert [i["runs_made"] for i in study._invocations(str(tmp_path))] == [2, 1]
    config.stop_after_minutes = -1.0
    with pytest.raises(study.StudyError, match="stop_after_minutes"):
        study.study(config, str(tmp_path))


def test_an_unreadable_run_result_is_moved_aside_and_the_run_evaluated_again(tmp_path, monkeypatch, caplog):
    from vital_jax import evaluate as evaluate_lib
    from vital_jax import run as run_lib
    from vital_jax import train as train_lib

    runs_dir = str(tmp_path / "runs")
    run_dir = study.run_dir_of(runs_dir, "backbone", 0)
    os.makedirs(run_dir)
    open(os.path.join(run_dir, "metrics.jsonl"), "w").close()
    result_path = os.path.join(run_dir, study.RESULTS_FILE)
    torn = '{"row": "backbone", "seed": 0, "k_e'
    with open(result_path, "w") as f:
        f.write(torn)
    # The run's training finished: train() finds its checkpoints done and returns; then it is evaluated again.
    trained, evaluated = [], []
    monkeypatch.setattr(study, "run_config", lambda *a: ml_collections.ConfigDict({"vital": {"k_max": 4}}))
    monkeypatch.setattr(train_lib, "train", lambda c, workdir: trained.append(workdir) or {"step": 1})
    monkeypatch.setattr(run_lib, "load_run", lambda workdir: "run")
    monkeypatch.setattr(evaluate_lib, "evaluate", lambda *a, **kw: evaluated.append(kw["split"]) or [{}])
    monkeypatch.setattr(study, "_split_scores", lambda metrics, eval_dir, data_dir: {"closed_accuracy": 0.5})
    monkeypatch.setattr(study, "latent_diagnostics", lambda *a: None)
    with caplog.at_level(logging.WARNING):
        result = study.run_one(study_config.get_config(), "backbone", 0, "/data", {}, runs_dir)
    assert trained == [run_dir] and evaluated == ["test", "val"] and not result["reused"]
    assert f"{result_path}: malformed JSON" in caplog.text
    aside = [name for name in os.listdir(run_dir) if name.startswith(study.RESULTS_FILE + ".unreadable-")]
    assert len(aside) == 1 and open(os.path.join(run_dir, aside[0])).read() == torn  # kept, not deleted
    assert json.load(open(result_path))["test"] == {"closed_accuracy": 0.5}
    # The parallel path asks first whether a run is finished: an unreadable result is not.
    with open(result_path, "w") as f:
        f.write(torn)
    assert not study._finished(runs_dir, "backbone", 0) and not os.path.exists(result_path)


def test_a_torn_line_in_invocations_is_skipped_with_a_warning_and_later_lines_are_kept(tmp_path, caplog):
    path = tmp_path / study.INVOCATIONS_FILE
    study._log_invocation(str(tmp_path), "abc", 1, ["sft_k0/seed0", "vital/seed0", "k1/seed0"], 60.0)
    with open(path, "a") as f:
        f.write('{"commit": "abc", "parallel_runs": 2, "ru')  # the study was killed while appending
    study._log_invocation(str(tmp_path), "abc", 2, ["ms_imt/seed0"], 30.0)
    with caplog.at_level(logging.WARNING):
        invocations = study._invocations(str(tmp_path))
    assert [(i["runs_made"], i["parallel_runs"]) for i in invocations] == [(3, 1), (1, 2)]
    assert f"{path}:2: malformed JSON" in caplog.text
    # A report of some rows names the runs of other rows (another variant's) in a command's count.
    by_row = {"sft_k0": [], "vital": [], "ms_imt": []}
    assert [study._other_rows(i, by_row) for i in invocations] == [" (1 of them of rows not in this report)", ""]
    assert study._other_rows({"runs_made": 2}, by_row) == ""  # logged before `made` was


def test_a_torn_line_in_a_runs_metrics_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    from vital_jax.observability import JsonlWriter

    path = tmp_path / "metrics.jsonl"
    with JsonlWriter(str(path)) as writer:
        writer.write(1, {"perf/samples_per_sec": 10.0})
    with open(path, "a") as f:
        f.write('{"step": 2, "perf/sampl')  # the run was killed while logging
    with JsonlWriter(str(path)) as writer:   # a resumed run ends the torn line before its own
        writer.write(2, {"perf/samples_per_sec": 30.0})
    with caplog.at_level(logging.WARNING):
        rows = study._metric_lines(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2] and study._median_throughput(rows) == 20.0
    assert f"{path}:2: malformed JSON" in caplog.text


def test_a_split_without_closed_questions_is_refused_before_pretraining(tmp_path, monkeypatch):
    # A val split of 2 phantoms can hold no closed question; the study's numbers are closed accuracies.
    def prepare_backbone(config, workdir):
        raise AssertionError("pretraining started")

    open_only = {"identify": {"majority_f1": 0.2, "count": 28},
                 "closed": {"chance": None, "majority": None, "majority_by_type": None, "count": 0}}
    closed = {"yes_no": {"chance": 0.5, "majority": 0.5, "majority_answer": "yes", "count": 10},
              "closed": {"chance": 0.5, "majority": 0.5, "majority_by_type": 0.5, "count": 10}}
    monkeypatch.setattr(study, "prepare_data", lambda config, workdir: "/data")
    monkeypatch.setattr(study, "prepare_backbone", prepare_backbone)
    monkeypatch.setattr(study, "floors", lambda data_dir, split: open_only if split == "val" else closed)
    config = study_config.get_config("quick")
    with pytest.raises(study.StudyError, match=r"split 'val' .*no closed-ended question.*split_counts"):
        study.study(config, str(tmp_path))


def test_a_second_study_in_a_busy_workdir_is_refused_before_any_work(tmp_path, monkeypatch):
    """Two studies in one workdir would build the same data, encoder and runs at once."""
    import json
    import socket
    import subprocess
    import sys

    from vital_jax import workdir as workdir_lib

    monkeypatch.setattr(study, "prepare_data", lambda config, workdir: pytest.fail("the data was prepared"))
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / workdir_lib.LOCK_FILE).write_text(
            json.dumps({"host": socket.gethostname(), "pid": running.pid, "since": "2025-01-01 00:00:00"}))
        with pytest.raises(workdir_lib.WorkdirInUseError, match=f"in use by another run \\(pid {running.pid}"):
            study.study(study_config.get_config("quick"), str(tmp_path))
    finally:
        running.kill()
        running.wait()
    assert not (tmp_path / workdir_lib.CONFIG_FILE).exists()


def test_a_worker_is_told_to_stop_when_the_study_process_dies(tmp_path):
    # The study process (here: a stand-in) is killed with SIGKILL; its worker must not train on, orphaned: it gets
    # SIGTERM, the trainers' preemption signal (here a handler that leaves a mark).
    import signal
    import subprocess
    import sys
    import time

    mark, ready = tmp_path / "stopped", tmp_path / "ready"
    worker = (f"import signal, sys, time\nfrom vital_jax import study\n"
              f"signal.signal(signal.SIGTERM, lambda *a: (open({str(mark)!r}, 'w').close(), sys.exit(0)))\n"
              f"study._stop_with_parent(poll_s=0.1, grace_s=30)\nopen({str(ready)!r}, 'w').close()\n"
              f"time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"w = subprocess.Popen([sys.executable, '-c', {worker!r}])\n"
                               f"print(w.pid, flush=True)\ntime.sleep(180)\n"], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline:  # the worker imports vital_jax, starts its watchdog
        time.sleep(0.2)
    assert ready.exists() and not mark.exists()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while not mark.exists() and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert mark.exists(), "the orphaned worker was not stopped"
    finally:
        try:
            os.kill(worker_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_answering_at_the_records_own_k_is_not_redone_when_the_cap_makes_it_the_fixed_k(monkeypatch):
    import types

    from vital_jax import evaluate as evaluate_lib

    examples = [types.SimpleNamespace(id=f"q{k}", extra={"latent_steps": k}) for k in (1, 2, 3, 4)]
    monkeypatch.setattr(evaluate_lib, "load_examples", lambda *a: ("test", examples))

    def evaluate(*a, **kw):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(evaluate_lib, "evaluate", evaluate)
    config = study_config.get_config()
    fixed = {"closed_accuracy": 0.6, "closed_majority_baseline": 0.3, "open_token_f1": 0.8, "latency_ms": 2.0,
             "per_type": {"yes_no": {"score": 0.6, "count": 2}}, "closed_correct": {"q1": True}}

    def run(cap):
        return types.SimpleNamespace(config=ml_collections.ConfigDict({"vital": {"latent_steps_cap": cap,
                                                                                  "k_max": 4}}))

    same = study._evaluate_record_k(config, run(1), "/run", "/data", 1, fixed)
    assert same == {"closed_accuracy": 0.6, "open_token_f1": 0.8, "per_type": fixed["per_type"],
                    "closed_correct": {"q1": True}, "same_as_fixed_k": True}
    with pytest.raises(AssertionError, match="evaluated again"):  # a cap of 2: questions get K = 1 or 2
        study._evaluate_record_k(config, run(2), "/run", "/data", 2, fixed)


def test_command_line_keeps_the_overrides_and_hides_the_workdir():
    line = study.command_line(["--config=configs/study/phantom.py", "--workdir=/home/me/run",
                               "--config.pretrained=shipped"])
    assert line == ("python -m vital_jax.study --config=configs/study/phantom.py --workdir=DIR "
                    "--config.pretrained=shipped")


def test_preparing_the_data_again_redoes_an_roi_extraction_killed_between_its_renames(tmp_path, monkeypatch):
    from vital_jax.data import records, roi

    class Killed(BaseException):  # kill -9: nothing of the code under test runs after it
        pass

    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src) == f".{records.RECORDS_FILE}.tmp-{os.getpid()}":  # the ROI stage's, not the build's
            raise Killed("killed before renaming records.jsonl")
        real_replace(src, dst)

    config = study_config.get_config()
    config.data.split_counts, config.data.phantom_size = (6, 2, 2), 64
    with monkeypatch.context() as patched:
        patched.setattr(roi.os, "replace", replace)
        with pytest.raises(Killed):
            study.prepare_data(config, str(tmp_path))
    data_dir = os.path.join(str(tmp_path), "data")
    assert records.interrupted_roi_write(data_dir)  # new arrays beside the build's roi_index -1 records
    assert study.prepare_data(config, str(tmp_path)) == data_dir
    assert not records.interrupted_roi_write(data_dir) and records.validate_dataset(data_dir) == []
    assert all(r.roi_index >= 0 for r in records.read_records(os.path.join(data_dir, records.RECORDS_FILE)))


def test_a_study_recorded_before_a_checkpoint_field_was_added_to_pretraining_resumes(tmp_path):
    """`pretrain.checkpoint.atomicity` (added in the thirtieth session) made every recorded study workdir refuse
    the same command ("fields differ: pretrain.checkpoint.atomicity"): how checkpoints are written binds no run."""
    import json

    from vital_jax import workdir as workdir_lib

    current = json.loads(study_config.get_config().to_json_best_effort())
    assert "atomicity" in current["pretrain"]["checkpoint"]
    older = json.loads(json.dumps(current))
    del older["pretrain"]["checkpoint"]["atomicity"]
    workdir_lib.check_workdir_config(str(tmp_path), older)     # recorded by the older code
    workdir_lib.check_workdir_config(str(tmp_path), current)   # accepted
    changed = json.loads(json.dumps(current))
    changed["pretrain"]["backbone"]["steps"] += 1               # what is trained still binds
    with pytest.raises(Exception, match="pretrain.backbone.steps"):
        workdir_lib.check_workdir_config(str(tmp_path), changed)


def test_matched_rows_may_be_added_to_a_study_only_where_no_run_of_them_was_made(tmp_path, monkeypatch):
    """The thirty-first session added sft_k0_matched / text_only_matched to `match_curriculum_steps`: a study
    recorded before must take them (their runs are new), but a row whose runs exist keeps the budget it ran with."""
    import json

    from vital_jax import workdir as workdir_lib

    monkeypatch.setattr(study, "_study", lambda config, workdir, provenance: "ran")
    config = study_config.get_config()
    older = json.loads(config.to_json_best_effort())
    older["match_curriculum_steps"] = ["mix_k1", "mix_k2", "mix_k3", "mix_k4"]
    older["rows"] = [r for r in older["rows"] if not r.endswith("_matched")]
    (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(older))
    os.makedirs(tmp_path / "runs" / "sft_k0" / "seed0")
    assert study.study(config, str(tmp_path)) == "ran"   # the matched rows have no runs yet
    recorded = json.loads((tmp_path / workdir_lib.CONFIG_FILE).read_text())["match_curriculum_steps"]
    assert recorded == list(config.match_curriculum_steps)  # and the list is recorded: once their runs exist,
    os.makedirs(tmp_path / "runs" / "sft_k0_matched" / "seed0")
    assert study.study(config, str(tmp_path)) == "ran"   # the same command goes on
    with pytest.raises(study.StudyError, match=r"drops \['sft_k0_matched'\], whose runs .* the curriculum rows'"):
        config_without = config.copy_and_resolve_references()
        config_without.match_curriculum_steps = ("mix_k1", "mix_k2", "mix_k3", "mix_k4", "text_only_matched")
        study.study(config_without, str(tmp_path))
    config.match_curriculum_steps = (*config.match_curriculum_steps, "sft_k0")
    with pytest.raises(study.StudyError, match=r"adds or drops \['sft_k0'\], whose runs .* their own number"):
        study.study(config, str(tmp_path))
    config.match_curriculum_steps = ("mix_k2", "mix_k3", "mix_k4", "sft_k0_matched", "text_only_matched")
    os.makedirs(tmp_path / "runs" / "mix_k1" / "seed0")
    with pytest.raises(study.StudyError, match=r"drops \['mix_k1'\], whose runs .* with the curriculum rows' number"):
        study.study(config, str(tmp_path))


def test_a_study_recorded_before_roi_encoder_goes_on_only_with_the_random_encoder(tmp_path, monkeypatch):
    """config.roi_encoder (thirty-second session) and the pretraining recipe's roi_encoder section are new to
    studies recorded before; those made the random encoder, so only that may go on in them."""
    import json

    from vital_jax import workdir as workdir_lib

    monkeypatch.setattr(study, "_study", lambda config, workdir, provenance: "ran")
    config = study_config.get_config()
    older = json.loads(config.to_json_best_effort())
    del older["roi_encoder"], older["pretrain"]["roi_encoder"]
    (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(older))
    assert study.study(config, str(tmp_path)) == "ran"
    pretrained = study_config.get_config("encoder")
    pretrained.rows = config.rows
    pretrained.pretrained = config.pretrained
    with pytest.raises(study.StudyError, match="made with the random ROI encoder"):
        study.study(pretrained, str(tmp_path))
    config.roi_encoder = "trained"
    with pytest.raises(study.StudyError, match="config.roi_encoder='trained'"):
        study.study(config, str(tmp_path))


def test_the_pretrained_roi_encoder_is_the_pretraining_stages_export_and_is_made_once(tmp_path, monkeypatch):
    from vital_jax import pretrain
    from vital_jax.data.roi import load_roi_encoder

    config = study_config.get_config("encoder")
    config.pretrain = pretrain.default_config("quick")
    calls = []
    real = pretrain.pretrain
    monkeypatch.setattr(pretrain, "pretrain", lambda c, w: calls.append(tuple(c.stages)) or real(c, w))
    encoder_dir = str(tmp_path / "roi_encoder")
    study.make_roi_encoder(config, str(tmp_path), encoder_dir)
    assert calls == [("roi_encoder",)]
    exported = pretrain.hf_dir(str(tmp_path / "roi_encoder_pretrain"), "roi_encoder")
    assert sorted(os.listdir(encoder_dir)) == sorted(os.listdir(exported))
    for name in os.listdir(exported):
        assert (tmp_path / "roi_encoder" / name).read_bytes() == open(os.path.join(exported, name), "rb").read()
    encoder, _ = load_roi_encoder(encoder_dir)
    assert encoder.grid_size == config.pretrain.roi_encoder.image_size // config.pretrain.roi_encoder.patch_size
    line = study._roi_encoder_line(config, str(tmp_path))  # what the report says of it
    assert "pretrained on phantom patch labels" in line and f": {config.pretrain.roi_encoder.steps} steps" in line
    assert str(tmp_path) not in line  # no path of the workdir in the report
    metrics = (tmp_path / "roi_encoder_pretrain" / "metrics.jsonl").read_text()
    shutil.rmtree(encoder_dir)
    study.make_roi_encoder(config, str(tmp_path), encoder_dir)  # the finished stage is reused, not retrained
    assert (tmp_path / "roi_encoder_pretrain" / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "roi_encoder" / "model.safetensors").read_bytes() == \
        open(os.path.join(exported, "model.safetensors"), "rb").read()


def test_report_grounding_section_gives_each_rows_pointing_and_pairs_rows_that_differ_in_l_visual(tmp_path):
    ids = [f"r{i}" for i in range(30)]
    floor = {"closed": {"chance": 0.4, "majority": 0.3, "majority_by_type": 0.3, "majority_by_options": 0.3,
                        "strongest": 0.4, "count": 20}}

    def scored(row, seed, rate):
        hits = {i: n < rate * len(ids) for n, i in enumerate(ids)}
        steps = [{"step": k, "pointing": rate / k, "contrast": 0.01 * k, "count": 30 // k} for k in (1, 2)]
        return dict(_fake_result(row, seed, 0.5, ids), grounding={
            "chance": 0.027, "grid": 8, "records": 30, "steps": steps, "step1_hits": hits,
            "roi_feature": {"pointing": 0.3, "contrast": 0.1, "count": 30},
            "roi_feature_hits": {i: n in (0, 1, 2, 10, 11) for n, i in enumerate(ids)}})

    results = [scored("visual", s, 0.5) for s in (0, 1)] + [scored("task_only", s, 0.1) for s in (0, 1)]
    results += [_fake_result("sft_k0", 0, 0.5, ids)]   # no latent step: not scored
    path = study.write_report(str(tmp_path), study_config.get_config(), results, floor, {},
                              {"command": "cmd", "commit": "abc"})
    text = open(path).read()
    assert "ROI encoder (L_visual's targets, the heatmaps, MedSynapse-V's E_ana): a tiny SigLIP with random" in text
    section = text.split("## Does the visual window point at the target?")[1].split("\n## ")[0]
    assert "Chance (a random cell): 2.7 %" in section and "in place of VP(z_k): 30.0 %" in section
    assert "| visual | yes | 50.0 / 50.0 | 50.0 ± 0.0 | 25.0 ± 0.0 | +0.010 |" in section
    assert "| task_only | no | 10.0 / 10.0 | 10.0 ± 0.0 | 5.0 ± 0.0 |" in section and "| sft_k0 |" not in section
    # visual hits records 0-14, task_only 0-2: each record its own unit, 12 differ, all one way, per seed.
    tests = [line.split("|") for line in section.splitlines() if line.startswith("| visual | task_only |")]
    assert [tuple(int(c) for c in t[4:8]) for t in tests] == [(12, 0, 12, 0), (12, 0, 12, 0)]
    assert float(tests[0][8]) == pytest.approx(2 * 0.5 ** 12, rel=1e-3)  # printed to 3 digits
    assert "read p as optimistic" in section and "| records where a is ahead |" in section
    assert "| vital | semantic |" not in section   # a pair is tested when the study has both rows
    # Five records per (image, mask) unit: visual hits units 0-2 wholly, task_only unit 0's records 0-2. The
    # units' differences 2, 5, 5 (sum 12): of the 8 sign patterns only +-12 reach 12, p = 2 / 8.
    # Records 0-9 about the liver, 10-29 about the spleen.
    units = {i: study.TestRecord(f"image{n // 10}", f"mask{n // 5}", "liver" if n < 10 else "spleen")
             for n, i in enumerate(ids)}
    path = study.write_report(str(tmp_path), study_config.get_config(), results, floor, {},
                              {"command": "cmd", "commit": "abc"}, test_records=units)
    section = open(path).read().split("## Does the visual window point at the target?")[1].split("\n## ")[0]
    tests = [line.split("|") for line in section.splitlines() if line.startswith("| visual | task_only |")]
    assert [tuple(int(c) for c in t[4:8]) for t in tests] == [(12, 0, 3, 0), (12, 0, 3, 0)]
    assert float(tests[0][8]) == 0.25 and "| pairs where a is ahead |" in section
    assert "the 6 pairs hold the 30 records" in section
    # By target: visual hits all 10 liver records and 5 of the 20 spleen ones, task_only 3 liver records.
    by_target = section.split("Step 1's pointing by target")[1]
    assert "| row | spleen (20) | liver (10) |" in by_target
    assert "| visual | 25.0 ± 0.0 | 100.0 ± 0.0 |" in by_target
    assert "| task_only | 0.0 ± 0.0 | 30.0 ± 0.0 |" in by_target
    # The targets themselves: 3 of the 10 liver records' ROI features point inside, 2 of the 20 spleen ones.
    assert "| the record's ROI feature itself (the L_visual target) | 10.0 | 30.0 |" in by_target
    no_grounding = study.write_report(str(tmp_path), study_config.get_config(),
                                      [_fake_result("vital", 0, 0.5, ids)], floor, {},
                                      {"command": "cmd", "commit": "abc"})
    assert "point at the target" not in open(no_grounding).read()


def test_grounding_is_scored_for_latent_rows_only_and_added_to_a_finished_run_when_asked(tmp_path, monkeypatch):
    from vital_jax import run as run_lib

    config = study_config.get_config("encoder")
    assert config.eval.grounding and not study_config.get_config().eval.grounding
    assert study._wants_grounding(config, "vital", 4) and not study._wants_grounding(config, "sft_k0", 0)
    assert not study._wants_grounding(config, "ms_imt", 4)
    run_dir = study.run_dir_of(str(tmp_path), "vital", 0)
    os.makedirs(run_dir)
    saved = dict(_fake_result("vital", 0, 0.5, ["q0"]), commit="abc")
    del saved["reused"]
    with open(os.path.join(run_dir, study.RESULTS_FILE), "w") as f:
        json.dump(dict(saved, test_record_k=saved["test"]), f)
    monkeypatch.setattr(run_lib, "load_run", lambda path: ("run of", path))
    monkeypatch.setattr(study, "_grounding", lambda config, run, data_dir: {"scored": run, "roi_feature_hits": {}})
    result = study.run_one(config, "vital", 0, "data", {}, str(tmp_path))
    assert result["reused"] and result["grounding"] == {"scored": ("run of", run_dir), "roi_feature_hits": {}}
    with open(os.path.join(run_dir, study.RESULTS_FILE)) as f:
        assert json.load(f)["grounding"] == {"scored": ["run of", run_dir], "roi_feature_hits": {}}  # saved
    monkeypatch.setattr(study, "_grounding", lambda config, run, data_dir: pytest.fail("scored twice"))
    assert study.run_one(config, "vital", 0, "data", {}, str(tmp_path))["grounding"]["scored"] == ["run of", run_dir]
    # Scored before the ROI feature's own hits were kept: scored again.
    with open(os.path.join(run_dir, study.RESULTS_FILE), "w") as f:
        json.dump(dict(saved, test_record_k=saved["test"], grounding={"scored": "before"}), f)
    monkeypatch.setattr(study, "_grounding", lambda config, run, data_dir: {"scored": "again", "roi_feature_hits": {}})
    assert study.run_one(config, "vital", 0, "data", {}, str(tmp_path))["grounding"]["scored"] == "again"
    config.eval.grounding = False
    os.remove(os.path.join(run_dir, study.RESULTS_FILE))
    with open(os.path.join(run_dir, study.RESULTS_FILE), "w") as f:
        json.dump(dict(saved, test_record_k=saved["test"]), f)
    assert "grounding" not in study.run_one(config, "vital", 0, "data", {}, str(tmp_path))


def test_test_records_are_the_splits_image_mask_and_target(tmp_path):
    from vital_jax.data.records import RECORDS_FILE, Record, write_records

    def record(i, image, target, split):
        return Record(id=f"q{i}", image=image, mask=f"{image}_{target}.png", question=f"Where is the {target}?",
                      answer="upper left.", reasoning_chain=("It lies in the upper left.",), latent_steps=1,
                      question_type="location", target=target, target_type="organ", modality="CT", source="phantom",
                      split=split, roi_index=-1)

    write_records(str(tmp_path / RECORDS_FILE), [record(0, "a.png", "liver", "test"),
                                                 record(1, "a.png", "liver", "test"),
                                                 record(2, "a.png", "spleen", "test"),
                                                 record(3, "b.png", "liver", "train")])
    units = study._test_records(str(tmp_path), "test")
    assert units == {"q0": ("a.png", "a.png_liver.png", "liver"), "q1": ("a.png", "a.png_liver.png", "liver"),
                     "q2": ("a.png", "a.png_spleen.png", "spleen")}
