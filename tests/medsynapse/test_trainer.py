"""MedSynapse-V's staged trainer on the phantom demo: Stage I learns (against the same run at lr = 0), resumes
exactly after a preemption, and skips a finished stage."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from configs import medsynapse_demo
from tests.conftest import demo_test_config
from vital_jax.medsynapse import trainer
from vital_jax.models.hf_config import ConfigError
from vital_jax.run import load_weights


def _config(lr=None):
    c = medsynapse_demo.get_config()
    shrunk = demo_test_config()
    c.demo = shrunk.demo
    c.data.batch_size = 4
    c.checkpoint.save_every_steps = 2
    c.checkpoint.async_save = False
    c.logging.every_steps = 1
    c.medsynapse.warmup.epochs = 2
    if lr is not None:
        c.medsynapse.warmup.lr = lr
    return c


def _paths(demo_root: str) -> trainer.Paths:
    with open(os.path.join(demo_root, "READY.json")) as f:
        p = json.load(f)
    return trainer.Paths(p["data_dir"], p["tokenizer_dir"], p["backbone_dir"], p["encoder_dir"])


def _losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _run(config, workdir, paths, **kw):
    trainer._PREEMPTION["requested"] = False
    return trainer.train(config, str(workdir), paths, load_weights, **kw)


@pytest.fixture(scope="module")
def paths(demo_assets):
    return _paths(demo_assets)


def test_stage1_lowers_the_answer_loss_compared_with_lr_zero(paths, tmp_path):
    trained = _run(_config(), tmp_path / "trained", paths)
    _run(_config(lr=0.0), tmp_path / "frozen", paths)
    assert not trained["preempted"] and trained["stages"]["warmup"]["steps"] > 4
    a, b = _losses(str(tmp_path / "trained")), _losses(str(tmp_path / "frozen"))
    assert sorted(a) == sorted(b)
    # Same batches in the same order, so the losses pair up step by step: only the sampler's training differs.
    later = sorted(a)[len(a) // 2:]
    lower = [a[s] < b[s] for s in later]
    assert sum(a[s] for s in later) < sum(b[s] for s in later) and sum(lower) >= 0.8 * len(later), (a, b)
    assert os.path.isfile(os.path.join(tmp_path / "trained", trainer.FEATURES_DIR, "feature_index.json"))


def test_stage1_resumes_exactly_after_a_preemption_and_skips_when_done(paths, tmp_path):
    config = _config()
    config.medsynapse.warmup.epochs = 1
    straight = _run(config, tmp_path / "straight", paths)
    resumed_dir = tmp_path / "resumed"
    first = _run(config, resumed_dir, paths, on_first_step=trainer.request_preemption)
    assert first["preempted"] and first["stages"]["warmup"]["steps"] == 1
    second = _run(config, resumed_dir, paths)
    assert not second["preempted"]
    assert second["stages"]["warmup"]["steps"] == straight["stages"]["warmup"]["steps"]
    expected, got = _losses(str(tmp_path / "straight")), _losses(str(resumed_dir))
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    rows = sum(1 for _ in open(os.path.join(resumed_dir, "metrics.jsonl")))
    third = _run(config, resumed_dir, paths)  # finished: nothing runs, nothing is logged again
    assert third["stages"]["warmup"]["metrics"] == {}
    assert sum(1 for _ in open(os.path.join(resumed_dir, "metrics.jsonl"))) == rows
    shutil.rmtree(resumed_dir)


def test_impossible_stage_settings_are_config_errors(paths, tmp_path):
    config = _config()
    config.medsynapse.stages = ("imt",)
    with pytest.raises(ConfigError, match="stages"):
        _run(config, tmp_path / "x", paths)
    config = _config()
    config.medsynapse.warmup.epochs = 0
    with pytest.raises(ConfigError, match="epochs"):
        _run(config, tmp_path / "y", paths)
