"""Pretraining from random initialisation (vital_jax.pretrain) on a tiny phantom corpus: the HF directories it
writes load in transformers and convert back into vital_jax with logit parity; the loss falls; train_parts
freezes what it says; an interrupted run resumes to the same weights and a finished stage is not redone."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from configs.study import pretrain_phantom
from tests.conftest import record_batch_preparation
from vital_jax import demo_assets, pretrain
from vital_jax.data import pretrain_corpus
from vital_jax.data.phantoms import PHANTOM_MODALITIES, make_phantom
from vital_jax.models import safetensors_io
from vital_jax.models.hf_config import ConfigError

TOL = 1e-4


def _where(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    return (("upper" if ys.mean() < mask.shape[0] / 2 else "lower") + " "
            + ("left" if xs.mean() < mask.shape[1] / 2 else "right"))


def write_tiny_corpus(out_dir: str, num_train: int = 16, num_val: int = 4, seed: int = 7) -> str:
    """Phantom PNGs with captions naming each structure's quadrant, one sentence per structure as texts."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    pairs, texts = [], []
    for i in range(num_train + num_val):
        modality = PHANTOM_MODALITIES[i % len(PHANTOM_MODALITIES)]
        phantom = make_phantom(modality, seed, i, size=128)
        image = f"images/p{i:03d}.png"
        Image.fromarray(phantom.image).save(os.path.join(out_dir, image))
        split = "train" if i < num_train else "val"
        names = sorted(phantom.masks)
        caption = f"A {modality} image. " + " ".join(f"The {n} is in the {_where(phantom.masks[n])} part."
                                                     for n in names)
        pairs.append({"id": f"pair{i}", "image": image, "prompt": "Describe the image.", "text": caption,
                      "split": split})
        texts += [{"id": f"text{i}_{j}", "text": f"The {n} is in the {_where(phantom.masks[n])} part of the image.",
                   "split": split} for j, n in enumerate(names)]
    for name, rows in ((pretrain_corpus.PAIRS_FILE, pairs), (pretrain_corpus.TEXTS_FILE, texts)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    demo_assets.write_tokenizer(os.path.join(out_dir, pretrain_corpus.TOKENIZER_DIR),
                                [r["prompt"] for r in pairs] + [r["text"] for r in pairs + texts])
    return out_dir


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("pretrain_corpus")))


def quick_config(corpus: str, **overrides):
    c = pretrain_phantom.get_config("quick")
    c.corpus_dir = corpus
    for key, value in overrides.items():
        section, _, field = key.rpartition("__")
        (c[section] if section else c)[field] = value
    return c


@pytest.fixture(scope="module")
def quick_run(corpus_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain_quick"))
    return workdir, pretrain.pretrain(quick_config(corpus_dir), workdir)


def _weights(directory: str) -> dict[str, np.ndarray]:
    return dict(safetensors_io.iter_tensors(directory))


def test_pretraining_writes_summary_metrics_and_lowers_the_loss(quick_run):
    workdir, summary = quick_run
    assert not summary["preempted"]
    with open(os.path.join(workdir, pretrain.SUMMARY_FILE)) as f:
        assert json.load(f)["stages"].keys() == {"backbone", "decoder"}
    for name, stage in summary["stages"].items():
        assert stage["steps"] == quick_config("").get(name).steps and stage["samples_per_sec"] > 0, name
        assert stage["final_train_loss"] < 0.5 * stage["initial_train_loss"], (name, stage)
        assert np.isfinite(stage["final_val_loss"]) and stage["final_val_loss"] < 0.6 * stage["initial_train_loss"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for name in ("backbone", "decoder"):
        assert any(r["stage"] == name and "loss" in r for r in records)
        assert any(r["stage"] == name and "val_loss" in r for r in records)
        assert os.listdir(os.path.join(workdir, "tensorboard", name))


def _hf_inputs(corpus_dir: str, tokenizer_dir: str, image_pixels: int):
    """One val example's prompt + text as a full sequence, in vital_jax's and HF's input conventions."""
    cfg = pretrain_corpus.CorpusConfig(batch_size=1, min_pixels=image_pixels, max_pixels=image_pixels)
    example = pretrain_corpus.PairExamples(corpus_dir, "val", cfg, tokenizer_dir).example(0)
    ids = np.concatenate([example["prompt_ids"], example["answer_ids"]])[None].astype(np.int64)
    return ids, example["patches"], example["grid_thw"][None].astype(np.int64)


def test_pretrained_backbone_loads_in_transformers_and_converts_back_with_parity(quick_run, corpus_dir, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    from conversion.hf_to_flax import convert
    from vital_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, get_rope_index
    from vital_jax.models.qwen3_vl import params as vl_params
    from vital_jax.models.qwen3_vl import vision_inputs

    workdir, summary = quick_run
    hf_dir = pretrain.hf_dir(workdir, "backbone")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(
        os.listdir(hf_dir))
    hf_model = HFQwen3VL.from_pretrained(hf_dir, attn_implementation="eager").eval()
    convert(hf_dir, str(tmp_path / "converted"))
    config = Qwen3VLConfig.from_pretrained(str(tmp_path / "converted"))
    params = vl_params.load_params(str(tmp_path / "converted"), config)

    ids, patches, grids = _hf_inputs(corpus_dir, hf_dir, pretrain_phantom.get_config("quick").backbone.image_pixels)
    valid = np.ones(ids.shape, bool)
    grid_list = [tuple(int(v) for v in g) for g in grids]
    positions, _ = get_rope_index(ids, valid, grid_list, config.image_token_id)
    ours = Qwen3VLForConditionalGeneration(config).apply(
        {"params": params}, input_ids=jnp.asarray(ids), token_valid=jnp.asarray(valid),
        positions=jnp.asarray(positions), pixel_patches=jnp.asarray(patches),
        vision_inputs=vision_inputs(grid_list, config.vision))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                          pixel_values=torch.tensor(patches), image_grid_thw=torch.tensor(grids),
                          mm_token_type_ids=torch.tensor((ids == config.image_token_id).astype(np.int64)))
    assert float(np.max(np.abs(np.asarray(ours.logits) - theirs.logits.numpy()))) <= TOL
    # The directory holds the trained weights: vital_jax's K = 0 loss on it is the run's final val loss.
    model = Qwen3VLForConditionalGeneration(config)
    losses = []
    pixels = pretrain_phantom.get_config("quick").backbone.image_pixels
    cfg = pretrain_corpus.CorpusConfig(batch_size=4, min_pixels=pixels, max_pixels=pixels)
    val = pretrain_corpus.PairExamples(corpus_dir, "val", cfg, hf_dir)
    for batch in pretrain_corpus.eval_batches(val, 4):
        per_example, weight = pretrain.backbone_example_losses(model, params,
                                                               pretrain.backbone_device_batch(batch, config))
        losses += list(np.asarray(per_example)[np.asarray(weight)])
    assert abs(np.mean(losses) - summary["stages"]["backbone"]["final_val_loss"]) < 1e-5


def test_pretrained_decoder_loads_in_transformers_with_logit_parity(quick_run):
    from transformers import Qwen3ForCausalLM as HFQwen3

    from vital_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, load_params

    workdir, _ = quick_run
    hf_dir = pretrain.hf_dir(workdir, "decoder")
    hf_model = HFQwen3.from_pretrained(hf_dir, attn_implementation="eager").eval()
    config = Qwen3Config.from_pretrained(hf_dir)
    params = load_params(hf_dir, config)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 11))
    ours = Qwen3ForCausalLM(config).apply({"params": params}, input_ids=jnp.asarray(ids))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert float(np.max(np.abs(np.asarray(ours.logits) - theirs))) <= TOL
    # Tied embeddings, like Qwen3-1.7B: no lm_head in the file.
    assert "lm_head.weight" not in _weights(hf_dir)


@pytest.mark.parametrize("parts", ["vision", "llm"])
def test_train_parts_trains_only_its_part(parts, corpus_dir, tmp_path):
    from vital_jax.models.hf_mapping import flatten
    from vital_jax.models.qwen3_vl import Qwen3VLConfig, load_params

    config = quick_config(corpus_dir, stages=("backbone",), backbone__train_parts=parts, backbone__steps=3)
    summary = pretrain.pretrain(config, str(tmp_path))
    hf_dir = summary["stages"]["backbone"]["hf_dir"]
    initial = flatten(demo_assets.init_qwen3_vl_params(
        pretrain.backbone_hf_config(config, os.path.join(corpus_dir, pretrain_corpus.TOKENIZER_DIR)), config.seed,
        jit=True))
    trained = flatten(load_params(hf_dir, Qwen3VLConfig.from_pretrained(hf_dir)))
    assert trained.keys() == initial.keys()
    changed = {path for path in trained if not np.array_equal(trained[path], np.asarray(initial[path]))}
    visual = {path for path in trained if path.startswith("visual/")}
    if parts == "vision":
        assert changed == visual
    else:
        assert changed == set(trained) - visual


def test_interrupted_run_resumes_to_the_same_weights_and_skips_finished_stages(quick_run, corpus_dir, tmp_path):
    reference_dir, _ = quick_run
    workdir = str(tmp_path)
    config = quick_config(corpus_dir)
    first = pretrain.pretrain(config, workdir, stop_after=("backbone", 15))
    assert first["preempted"] and first["stages"]["backbone"]["step"] == 15
    assert not os.path.exists(pretrain.hf_dir(workdir, "backbone"))
    # As if killed before its step-15 checkpoint: the rerun resumes from step 10 and logs step 15 again.
    shutil.rmtree(os.path.join(workdir, "backbone_ckpt", "15"))
    second = pretrain.pretrain(config, workdir)
    assert not second["preempted"]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    for stage in ("backbone", "decoder"):
        keys = [(r["step"], "val_loss" in r) for r in rows if r["stage"] == stage]
        assert len(keys) == len(set(keys)), keys  # each step once ...
    rewound = [json.loads(line) for line in open(os.path.join(workdir, "metrics.rewound.jsonl"))]
    assert {(r["stage"], r["step"]) for r in rewound} == {("backbone", 15)}  # ... the first run's kept beside
    for stage in ("backbone", "decoder"):
        ours, reference = _weights(pretrain.hf_dir(workdir, stage)), _weights(pretrain.hf_dir(reference_dir, stage))
        assert ours.keys() == reference.keys()
        for name in ours:
            np.testing.assert_array_equal(ours[name], reference[name], err_msg=f"{stage}: {name}")
    # Rerunning a finished workdir trains nothing and rewrites nothing.
    stamp = os.path.getmtime(os.path.join(pretrain.hf_dir(workdir, "backbone"), "model.safetensors"))
    third = pretrain.pretrain(config, workdir)
    assert third["stages"] == second["stages"]
    assert os.path.getmtime(os.path.join(pretrain.hf_dir(workdir, "backbone"), "model.safetensors")) == stamp


def test_each_batch_is_prepared_while_the_step_before_it_runs(corpus_dir, tmp_path, monkeypatch):
    events = []
    record_batch_preparation(pretrain, events, monkeypatch)
    config = quick_config(corpus_dir, stages=("backbone",), backbone__steps=3, logging__every_steps=1)
    assert not pretrain.pretrain(config, str(tmp_path))["preempted"]
    assert events == ["prepare", "prepare", "log 1", "prepare", "log 2", "log 3"]  # none past the last step


def test_a_finished_workdir_copied_elsewhere_names_its_own_hf_dirs(quick_run, corpus_dir, tmp_path):
    reference_dir, reference = quick_run
    workdir = str(tmp_path / "copied")
    shutil.copytree(reference_dir, workdir)
    summary = pretrain.pretrain(quick_config(corpus_dir), workdir)
    for stage in ("backbone", "decoder"):
        ours = summary["stages"][stage]
        assert ours["hf_dir"] == pretrain.hf_dir(workdir, stage) != reference["stages"][stage]["hf_dir"]
        assert {k: v for k, v in ours.items() if k != "hf_dir"} == {
            k: v for k, v in reference["stages"][stage].items() if k != "hf_dir"}  # nothing trained again
    assert pretrain.hf_dir(workdir, "decoder") in pretrain.format_summary(summary)


def test_a_done_stage_whose_summary_is_corrupt_or_hf_dir_is_gone_is_rewritten_from_its_checkpoint(
        quick_run, corpus_dir, tmp_path, caplog):
    reference_dir, reference = quick_run
    workdir = str(tmp_path / "workdir")
    shutil.copytree(reference_dir, workdir)
    summary_path = os.path.join(workdir, "backbone_ckpt", pretrain.STAGE_SUMMARY_FILE)
    with open(summary_path, "w") as f:
        f.write('{"stage": "backb')  # torn
    shutil.rmtree(pretrain.hf_dir(workdir, "decoder"))
    with caplog.at_level(logging.WARNING):
        rerun = pretrain.pretrain(quick_config(corpus_dir), workdir)
    assert f"{summary_path}: malformed JSON" in caplog.text
    assert f"{pretrain.hf_dir(workdir, 'decoder')}: no config.json" in caplog.text
    for stage in ("backbone", "decoder"):
        # Restored from the final checkpoint, 0 steps trained: the same losses and weights, in this workdir.
        ours = rerun["stages"][stage]
        assert ours["hf_dir"] == pretrain.hf_dir(workdir, stage)
        timing = ("hf_dir", "train_seconds", "steps_per_sec", "samples_per_sec")  # as of the final checkpoint
        assert {k: v for k, v in ours.items() if k not in timing} == {
            k: v for k, v in reference["stages"][stage].items() if k not in timing}
        with open(os.path.join(workdir, f"{stage}_ckpt", pretrain.STAGE_SUMMARY_FILE)) as f:
            assert json.load(f) == ours
        weights, expected = _weights(ours["hf_dir"]), _weights(pretrain.hf_dir(reference_dir, stage))
        assert weights.keys() == expected.keys()
        for name in weights:
            np.testing.assert_array_equal(weights[name], expected[name], err_msg=f"{stage}: {name}")


def test_unknown_train_parts_and_missing_corpus_are_errors(corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="train_parts"):
        pretrain.pretrain(quick_config(corpus_dir, backbone__train_parts="decoder"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="phantom_corpus|corpus_dir"):
        pretrain.resolve_corpus(quick_config(str(tmp_path / "missing")), str(tmp_path / "b"))


def test_the_workdir_corpus_is_reused_only_when_finished_with_the_same_settings(tmp_path):
    """Its data files were taken as the mark of a built corpus: a corpus killed while saving its tokenizer, or built
    with other corpus settings by a run stopped before its first checkpoint, was used as it was."""
    from vital_jax.data import phantom_corpus

    config = quick_config("", corpus__num_phantoms=2, corpus__phantom_size=64, corpus__chain_phantoms=0)
    workdir = str(tmp_path / "w")
    corpus_dir = pretrain.resolve_corpus(config, workdir)
    tokenizer = os.path.join(corpus_dir, pretrain_corpus.TOKENIZER_DIR, "tokenizer.json")
    with open(tokenizer) as f:
        built = f.read()
    assert pretrain.resolve_corpus(config, workdir) == corpus_dir  # finished: reused
    os.remove(os.path.join(corpus_dir, phantom_corpus.SUMMARY_FILE))  # killed while saving the tokenizer
    with open(tokenizer, "w") as f:
        f.write(built[:100])
    assert pretrain.resolve_corpus(config, workdir) == corpus_dir
    with open(tokenizer) as f:
        assert f.read() == built  # built again
    config.corpus.seed = 7
    with pytest.raises(phantom_corpus.CorpusError, match="other settings"):
        pretrain.resolve_corpus(config, workdir)


def test_a_failed_start_binds_nothing_and_a_busy_workdir_is_refused(corpus_dir, tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(ConfigError, match="corpus_dir"):
        pretrain.pretrain(quick_config(str(tmp_path / "missing")), workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    with pytest.raises(ConfigError, match="corpus_dir"):  # a different config: not "written by a different config"
        pretrain.pretrain(quick_config(str(tmp_path / "missing"), backbone__steps=7), workdir)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(os.path.join(workdir, "RUNNING.lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": running.pid, "since": "2025-01-01 00:00:00"}, f)
        with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {running.pid}"):
            pretrain.pretrain(quick_config(corpus_dir), workdir)
    finally:
        running.kill()
        running.wait()


def test_shipped_configs_validate():
    pretrain.validate_config(pretrain_phantom.get_config())
    pretrain.validate_config(pretrain_phantom.get_config("quick"))
    with pytest.raises(ValueError, match="variant"):
        pretrain_phantom.get_config("nope")


def test_non_finite_loss_stops_naming_step_and_examples(corpus_dir, tmp_path):
    config = quick_config(corpus_dir, stages=("decoder",), decoder__lr=1e30, optimizer__max_grad_norm=1e30)
    with pytest.raises(pretrain.NonFiniteLossError, match=r"decoder: non-finite loss .* at step \d+; examples "
                                                          r"\['text"):
        pretrain.pretrain(config, str(tmp_path))


@pytest.mark.parametrize("line, message", [
    (b'["not", "an object"]', r"lines\.jsonl:2: not a JSON object"),
    (b'{"id": "t1", "text": "caf\xe9", "split": "train"}', r"lines\.jsonl:2: .*UTF-8"),
    (b'{"id": "t1", "text": ', r"lines\.jsonl:2: malformed JSON"),
    (b'{"id": "t1", "text": 5, "split": "train"}', r"lines\.jsonl:2: missing or non-string field\(s\) \['text'\]"),
])
def test_a_bad_corpus_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b'{"id": "t0", "text": "a", "split": "train"}\n' + line + b"\n")
    with pytest.raises(pretrain_corpus.CorpusError, match=message):
        pretrain_corpus.read_jsonl(str(path), ("id", "text", "split"))


def test_corpus_loader_order_is_a_function_of_the_batch_index_and_errors_name_records(corpus_dir):
    cfg = pretrain_corpus.CorpusConfig(batch_size=4)
    texts = pretrain_corpus.TextExamples(corpus_dir, "train", cfg)
    run = pretrain_corpus.TrainBatches(texts, 4, seed=3)
    batches = [next(run) for _ in range(2 * run.batches_per_epoch + 1)]
    resumed = pretrain_corpus.TrainBatches(texts, 4, seed=3)
    resumed.set_state({"next_batch": run.batches_per_epoch, "seed": 3})
    for batch in batches[run.batches_per_epoch:]:
        np.testing.assert_array_equal(next(resumed)["record_index"], batch["record_index"])
    epoch = np.concatenate([b["record_index"] for b in batches[:run.batches_per_epoch]])
    assert len(set(epoch.tolist())) == len(epoch)  # an epoch sees each example at most once
    short = pretrain_corpus.CorpusConfig(batch_size=4, text_buckets=(4,))
    with pytest.raises(pretrain_corpus.CorpusError, match=r"record 'text0_\d+': text of \d+ tokens"):
        pretrain_corpus.TextExamples(corpus_dir, "train", short).batch([0, 1], [True, True])


def test_the_roi_encoder_stage_needs_no_corpus_and_writes_an_encoder_that_roi_features_load(tmp_path):
    from vital_jax.data import phantom_corpus
    from vital_jax.data.roi import load_roi_encoder
    from vital_jax.models.siglip.params import load_siglip_vision

    config = quick_config("", stages=("roi_encoder",))
    summary = pretrain.pretrain(config, str(tmp_path))["stages"]["roi_encoder"]
    assert not os.path.exists(os.path.join(tmp_path, "corpus"))  # no corpus built for it
    assert summary["steps"] == config.roi_encoder.steps
    assert summary["final_val_loss"] < 0.8 * summary["initial_train_loss"], summary
    hf_dir = pretrain.hf_dir(str(tmp_path), "roi_encoder")
    encoder, params = load_roi_encoder(hf_dir)
    assert encoder.grid_size == config.roi_encoder.image_size // config.roi_encoder.patch_size
    # The exported tower is the trained one (not its initial weights), without the patch head.
    stage = pretrain._roi_encoder_stage(config, None, None)
    _, trained = load_siglip_vision(hf_dir, use_head=False)
    moved = [not np.allclose(np.asarray(a), b) for a, b in zip(jax.tree.leaves(trained),
                                                               jax.tree.leaves(stage.params["encoder"]))]
    assert sum(moved) >= 0.5 * len(moved)
    assert "patch_head" not in json.dumps(sorted(k for k, _ in safetensors_io.iter_tensors(hf_dir)))
    # The stage's loss is the documented one: shares x class weights x -log p, mean over patches.
    pixels = np.zeros((1, 112, 112, 3), np.float32)
    targets = np.full((1, encoder.grid_size ** 2, len(phantom_corpus.PATCH_CLASSES)), 1 / 6, np.float32)
    weights = jnp.arange(1.0, 7.0)
    batch = {"pixels": jnp.asarray(pixels), "targets": jnp.asarray(targets), "example_valid": jnp.ones(1, bool)}
    loss, _ = pretrain.roi_encoder_example_losses(stage.model, stage.params, batch, weights)
    features = np.asarray(stage.model.patch_features(stage.params["encoder"], batch["pixels"]))
    head = jax.tree.map(np.asarray, stage.params["patch_head"])
    logits = features @ head["kernel"] + head["bias"]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, -(targets * np.arange(1, 7) * log_p).sum(-1).mean(-1), rtol=1e-5)


def test_a_workdir_recorded_before_the_roi_encoder_stage_still_resumes(quick_run, corpus_dir, tmp_path):
    workdir = shutil.copytree(quick_run[0], os.path.join(tmp_path, "copy"))
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        recorded = json.load(f)
    recorded.pop("roi_encoder")
    with open(path, "w") as f:
        json.dump(recorded, f)
    summary = pretrain.pretrain(quick_config(corpus_dir), workdir)  # both stages done: nothing retrained
    assert not summary["preempted"] and summary["stages"].keys() == {"backbone", "decoder"}
