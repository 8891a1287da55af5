"""A trained tiny run, used as a user would: evaluate (VQA-RAD slice, in-domain K sweep), explain, export to
HF, and the PyTorch latent-generation reference against vital_jax."""

import dataclasses
import json
import re
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from vital_jax.inference import Predictor
from vital_jax.run import load_run

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out


@pytest.fixture(scope="module")
def workdir(trained_demo_run):
    return trained_demo_run


def test_evaluate_vqa_rad_slice_writes_the_documented_files(workdir, shared_data_dir, tmp_path):
    from vital_jax.evaluate import evaluate

    out = tmp_path / "eval"
    summaries = evaluate(workdir, "vqa_rad", os.path.join(shared_data_dir, "vqa_rad"), str(out), [2], limit=16)
    assert summaries[0]["count"] == 16
    lines = [json.loads(line) for line in open(out / "vqa_rad.predictions.jsonl")]
    assert len(lines) == 16 and all(line["latent_steps"] == 2 and "prediction" in line for line in lines)
    metrics = json.load(open(out / "vqa_rad.metrics.json"))
    assert metrics["count"] == 16
    # Accuracy beside its majority baseline, both closed conventions, open F1 apart (issues #17, #18).
    assert {"closed_accuracy", "closed_majority_baseline", "accuracy_over_all", "open_token_f1"} <= set(metrics)
    # Latency is single-example (batch 1); the batched time per example is labelled apart; answers get the
    # training answer budget.
    assert metrics["latency_ms"]["batch_size"] == 1 and metrics["batched_ms_per_example"]["batch_size"] == 4
    assert metrics["meta"]["max_new_tokens"] == load_run(workdir).config.data.max_answer_tokens
    assert metrics["meta"]["finished"] is True
    assert (out / "vqa_rad.metrics.md").read_text().strip()


def test_k_sweep_on_the_in_domain_split(workdir, tmp_path):
    from vital_jax.evaluate import evaluate

    run = load_run(workdir)
    out = tmp_path / "sweep"
    splits = {json.loads(line)["split"] for line in open(os.path.join(run.paths.data_dir, "records.jsonl"))}
    split = "test" if "test" in splits else "val"
    evaluate(workdir, "in_domain", run.paths.data_dir, str(out), [0, 1, 2, 3, 4], split=split, limit=8, run=run)
    with pytest.raises(ValueError, match="has no examples"):
        evaluate(workdir, "in_domain", run.paths.data_dir, str(out), [0], split="nonexistent", run=run)
    sweep = json.load(open(out / "k_sweep.json"))
    assert [p["latent_steps"] for p in sweep["points"]] == [0, 1, 2, 3, 4]
    assert all(p["latency_ms"]["batch_size"] == 1 and p["batched_ms_per_example"]["batch_size"] == 4 and
               "closed_accuracy" in p and "open_token_f1" in p for p in sweep["points"])
    assert Image.open(out / "k_sweep.png").size[0] > 0


def test_k_sweep_latency_breakdown_times_the_generate_programs_phases(workdir, tmp_path):
    # Figure 4(b): prefill, latent steps and decoding per K, from programs of the generate program's own code up
    # to each phase and the whole program (best of 3 each), so their sum is that program's time. The
    # single-example latency beside it is one call per example, at millisecond scale on a shared CI machine (one
    # run measured 3.5 and 7.1 ms for one program): only an order-of-magnitude check against its fastest call
    # (units, per-example vs per-batch) is stable.
    from vital_jax.evaluate import evaluate
    from vital_jax.inference import shared_predictor

    run = load_run(workdir)
    out = tmp_path / "sweep"
    evaluate(workdir, "in_domain", run.paths.data_dir, str(out), [0, 2], split="train", limit=2, run=run,
             latency_examples=2, latency_breakdown=True)
    points = json.load(open(out / "k_sweep.json"))["points"]
    for point in points:
        phases = point["latency_breakdown_ms"]
        assert set(phases) == {"prefill", "latent", "decode"} and min(phases.values()) >= 0, phases
        # At K > 0 a tiny model's two latent steps may take less than the timing noise, which reads 0.
        assert phases["prefill"] > 0 and (point["latent_steps"] > 0 or phases["latent"] == 0), phases
        assert 0.1 < sum(phases.values()) / point["latency_ms"]["min"] < 10.0, (phases, point["latency_ms"])
    # The phase program up to the latent steps computes the z that generation returns.
    single = shared_predictor(run, 1, int(run.config.data.max_answer_tokens))
    image = os.path.join(run.paths.data_dir, "images", sorted(os.listdir(os.path.join(run.paths.data_dir,
                                                                                      "images")))[0])
    prefix, n = single.encode([image], ["Where is the liver?"])
    _, z, _ = single.run_encoded(prefix, n, 2)
    z_phase = single._phases(single.backbone_params, prefix, jnp.full((1,), 2, jnp.int32), 2, "latent")[0]
    np.testing.assert_allclose(np.asarray(z_phase), z, atol=1e-5)


def test_record_k_answers_each_question_at_its_own_trained_k(workdir, tmp_path):
    """latent_steps="record": one batch mixes records of different K (as training does); each answer must equal
    the answer of a fixed-K evaluation at that record's K."""
    from vital_jax.evaluate import RECORD_K, evaluate

    run = load_run(workdir)
    split = "train"  # the tiny run's train split has records of every K
    out = tmp_path / "record"
    evaluate(workdir, "in_domain", run.paths.data_dir, str(out / "mixed"), [RECORD_K], split=split, limit=12,
             run=run, latency_examples=1)
    mixed = [json.loads(line) for line in open(out / "mixed" / "in_domain.predictions.jsonl")]
    ks = sorted({row["latent_steps"] for row in mixed})
    assert len(ks) > 1, f"the slice should mix several K, got {ks}"
    evaluate(workdir, "in_domain", run.paths.data_dir, str(out / "fixed"), ks, split=split, limit=12, run=run,
             latency_examples=1)
    for k in ks:
        fixed = {json.loads(line)["id"]: json.loads(line)["prediction"]
                 for line in open(out / "fixed" / f"k{k}" / "in_domain.predictions.jsonl")}
        for row in mixed:
            if row["latent_steps"] == k:
                assert row["prediction"] == fixed[row["id"]], (row["id"], k)
    with pytest.raises(ValueError, match="outside 0..K_max"):
        evaluate(workdir, "in_domain", run.paths.data_dir, str(out / "bad"), ["every"], split=split, run=run)
    # One fixed K beside each question's own: both rows in summary.md, the second labelled (it had no summary.md,
    # and a record-K row had an empty K cell).
    both = evaluate(workdir, "in_domain", run.paths.data_dir, str(out / "both"), [ks[0], RECORD_K], split=split,
                    limit=4, run=run, latency_examples=1)
    assert [s["meta"]["latent_steps"] for s in both] == [ks[0], "per record"]
    rows = [line for line in (out / "both" / "summary.md").read_text().splitlines()
            if line.startswith(f"| in_domain | {split} |")]  # the metrics table (the per-source one follows)
    assert [row.split(" | ")[2] for row in rows] == [str(ks[0]), "per record"]


def test_explain_writes_text_heatmaps_and_similarity(workdir, tmp_path):
    from vital_jax.explain import explain_dataset, explain_example

    run = load_run(workdir)
    image = os.path.join(run.paths.data_dir, "images", sorted(os.listdir(os.path.join(run.paths.data_dir,
                                                                                      "images")))[0])
    result = explain_example(run, image, "Where is the liver?", str(tmp_path / "x"), latent_steps=3)
    assert len(result["step_texts"]) == 3 and len(result["heatmaps"]) == 3
    # The ||z_k|| / embedding-norm ratios the module docstring promises in explanation.json.
    assert result["norm_ratio_per_step"] == pytest.approx([n / result["embedding_norm"]
                                                           for n in result["z_norm_per_step"]], rel=1e-5)
    grid = run.model.config.roi_dim and result["heatmaps"][0]["grid"]
    assert grid == [8, 8]  # the tiny SigLIP's 112 px / patch 14 grid
    # Each step decoded up to the step budget the decoder trained with; a step is "cut" when it reached it without
    # its end token, and a shorter budget cuts the same steps' texts to their beginnings.
    budget = int(run.config.data.max_step_tokens)
    assert result["step_text_budget"] == budget and set(result["step_texts_cut"]) <= {1, 2, 3}
    short = explain_example(run, image, "Where is the liver?", str(tmp_path / "s"), latent_steps=3,
                            max_text_tokens=2)
    assert short["step_text_budget"] == 2
    for i, (whole, cut) in enumerate(zip(result["step_texts"], short["step_texts"]), start=1):
        assert whole.startswith(cut), (whole, cut)
        if whole != cut:  # the two-token text stopped before the step's end
            assert i in short["step_texts_cut"], (i, whole, cut)
    # The visual window's retrieval: per step, the training split's ROI features (less the image's own) nearest to
    # VP(z_k) by cosine, named by the first training record that uses each.
    from vital_jax.data.records import RECORDS_FILE, ROI_FEATURES_FILE, read_records
    from vital_jax.explain import roi_neighbours
    from vital_jax.vital import interpret

    _, z, _ = run.predictors[(1, int(run.config.data.max_answer_tokens))].answer([image], ["Where is the liver?"], 3)
    z = jnp.asarray(z[:, :3])
    bank_info, near = roi_neighbours(run, z, 3, image)
    assert result["neighbours"] == near and result["neighbour_bank"] == bank_info and len(near) == 3
    first, own = {}, set()
    for record in read_records(os.path.join(run.paths.data_dir, RECORDS_FILE)):
        if os.path.join(run.paths.data_dir, record.image) == image:
            own.add(record.roi_index)
        if record.split == "train":
            first.setdefault(record.roi_index, record)
    rows = np.asarray(sorted(set(first) - own))
    assert bank_info == {"split": "train", "roi_rows": len(rows), "excluded_image_rows": len(set(first) & own)}
    vp = np.asarray(interpret.project_latents(run.model, run.params, z), np.float64)[0]
    bank = np.load(os.path.join(run.paths.data_dir, ROI_FEATURES_FILE)).astype(np.float64)[rows]
    cos = (vp / np.linalg.norm(vp, axis=-1, keepdims=True)) @ (bank / np.linalg.norm(bank, axis=-1, keepdims=True)).T
    for k in range(3):
        assert [n["roi_row"] for n in near[k]] == rows[np.argsort(-cos[k], kind="stable")[:3]].tolist()
        assert [n["cosine"] for n in near[k]] == pytest.approx(np.sort(cos[k])[::-1][:3], abs=1e-5)
        assert [n["record"] for n in near[k]] == [first[n["roi_row"]].id for n in near[k]]
    assert roi_neighbours(run, z, 0, image) is None
    # Figure 12: with the record's ground-truth mask, each heatmap is scored against it (explain.mask_agreement on
    # the heatmaps it drew, heatmaps.npy).
    from vital_jax.explain import HEATMAPS_FILE, mask_agreement
    from vital_jax.data.roi import load_mask

    record = read_records(os.path.join(run.paths.data_dir, RECORDS_FILE))[0]
    masked = explain_example(run, os.path.join(run.paths.data_dir, record.image), record.question,
                             str(tmp_path / "m"), latent_steps=2,
                             mask_path=os.path.join(run.paths.data_dir, record.mask))
    maps = np.load(tmp_path / "m" / HEATMAPS_FILE)
    expected = mask_agreement(maps, load_mask(os.path.join(run.paths.data_dir, record.mask)))
    assert [{k: h[k] for k in expected[0]} for h in masked["heatmaps"]] == expected
    for name in ("summary.png", "step_1.png", "step_similarity.png", "explanation.json"):
        assert (tmp_path / "x" / name).exists()
    # The answer came from the run's shared single-example predictor (the one evaluation compiles), at the
    # training answer budget, and a second explanation compiles nothing new.
    shared = run.predictors[(1, int(run.config.data.max_answer_tokens))]
    programs = shared._generate._cache_size()
    assert explain_example(run, image, "Where is the liver?", str(tmp_path / "y"), latent_steps=3) == {
        **result, "heatmaps": [dict(h, figure=h["figure"].replace(str(tmp_path / "x"), str(tmp_path / "y")))
                               for h in result["heatmaps"]]}
    assert shared._generate._cache_size() == programs
    matrix = explain_dataset(run, run.paths.data_dir, str(tmp_path / "d"), split="train", limit=6)
    assert matrix.shape == (4, 4) and np.allclose(np.diag(matrix), 1.0, atol=1e-5)


def test_explain_at_k_0_explains_the_answer_without_latent_steps(workdir, tmp_path):
    """explain --latent_steps=0 was accepted, then crashed decoding zero latent states (ZeroDivisionError)."""
    from vital_jax.explain import explain_example
    from vital_jax.inference import shared_predictor

    run = load_run(workdir)
    image = os.path.join(run.paths.data_dir, "images", sorted(os.listdir(os.path.join(run.paths.data_dir,
                                                                                      "images")))[0])
    result = explain_example(run, image, "Where is the liver?", str(tmp_path / "x"), latent_steps=0)
    answer = shared_predictor(run, 1, int(run.config.data.max_answer_tokens)).answer(
        [image], ["Where is the liver?"], 0)[0][0]
    assert result["answer"] == answer and result["latent_steps"] == 0
    for field in ("step_texts", "step_texts_cut", "z_norm_per_step", "norm_ratio_per_step", "step_similarity",
                  "heatmaps"):
        assert result[field] == [], field
    assert "neighbours" not in result and result["embedding_norm"] is None
    assert sorted(os.listdir(tmp_path / "x")) == ["explanation.json"]
    assert json.loads((tmp_path / "x" / "explanation.json").read_text()) == result


def test_explain_compares_vp_with_the_encoder_output_the_roi_targets_came_from(workdir, tmp_path, monkeypatch):
    # A dataset whose ROI features pooled SigLIP's post-layernorm output: the heatmaps use that output too.
    import dataclasses
    import shutil

    from vital_jax.data import roi
    from vital_jax.data.records import ROI_PROVENANCE_FILE
    from vital_jax.explain import explain_example

    run = load_run(workdir)
    assert json.load(open(os.path.join(run.paths.data_dir, ROI_PROVENANCE_FILE)))["feature_layer"] == "last_block"
    data_dir = str(tmp_path / "data")
    shutil.copytree(run.paths.data_dir, data_dir)
    provenance = json.load(open(os.path.join(data_dir, ROI_PROVENANCE_FILE)))
    with open(os.path.join(data_dir, ROI_PROVENANCE_FILE), "w") as f:
        json.dump(dict(provenance, feature_layer="post_layernorm"), f)
    run.paths = dataclasses.replace(run.paths, data_dir=data_dir)
    asked = []
    real = roi.load_roi_encoder
    monkeypatch.setattr(roi, "load_roi_encoder", lambda d, layer="last_block", **kw: asked.append(layer) or real(
        d, layer, **kw))
    image = os.path.join(data_dir, "images", sorted(os.listdir(os.path.join(data_dir, "images")))[0])
    explain_example(run, image, "Where is the liver?", str(tmp_path / "x"), latent_steps=2)
    assert asked == ["post_layernorm"]


def test_explain_draws_heatmaps_with_the_recorded_encoder_and_refuses_a_foreign_one(workdir, tmp_path):
    """A run without model.roi_encoder_dir (the default outside the demo) drew no heatmaps, and gave no warning,
    though the dataset's roi_features.json names the encoder; an encoder of another architecture was used."""
    from vital_jax.data.records import ROI_PROVENANCE_FILE
    from vital_jax.demo_assets import write_tiny_siglip
    from vital_jax.explain import explain_example
    from vital_jax.models.hf_config import ConfigError

    run = load_run(workdir)
    recorded = json.load(open(os.path.join(run.paths.data_dir, ROI_PROVENANCE_FILE)))["encoder_dir"]
    assert os.path.isdir(recorded)
    run.paths = dataclasses.replace(run.paths, encoder_dir="")
    image = os.path.join(run.paths.data_dir, "images", sorted(os.listdir(os.path.join(run.paths.data_dir,
                                                                                      "images")))[0])
    result = explain_example(run, image, "Where is the liver?", str(tmp_path / "x"), latent_steps=2)
    assert len(result["heatmaps"]) == 2 and result["heatmaps"][0]["grid"] == [8, 8]
    # A tiny SigLIP of the same width at 224 px (a 16x16 grid): another feature space, refused before answering.
    other = write_tiny_siglip(str(tmp_path / "other"), image_size=224)
    with pytest.raises(ConfigError, match=r"image_size 224 \(recorded: 112\)"):
        explain_example(run, image, "Where is the liver?", str(tmp_path / "y"), latent_steps=2, encoder_dir=other)
    assert not (tmp_path / "y").exists()


def test_shared_predictor_is_built_once_per_run_and_shape(workdir):
    from vital_jax.inference import shared_predictor

    run = load_run(workdir)
    predictor = shared_predictor(run, 1, 8)
    assert shared_predictor(run, 1, 8) is predictor
    assert shared_predictor(run, 2, 8) is not predictor and shared_predictor(run, 1, 9) is not predictor
    run.params = {**run.params, "backbone": dict(run.params["backbone"])}  # new parameters: a new predictor
    rebuilt = shared_predictor(run, 1, 8)
    assert rebuilt is not predictor and rebuilt.source_params is run.params["backbone"]
    assert load_run(workdir).predictors == {}  # each loaded run has its own
    # A replaced run shares `predictors` with the run it replaces (dataclasses.replace copies the reference) and
    # gets predictors of its own: another model, or other pause embeddings, with the same backbone parameters.
    other_model = dataclasses.replace(run, model=dataclasses.replace(run.model))
    for_other = shared_predictor(other_model, 1, 8)
    assert other_model.predictors is run.predictors and for_other is not rebuilt
    paused = dataclasses.replace(run, params={**run.params, "pause_embeddings": jnp.zeros((2, 4))})
    assert shared_predictor(paused, 1, 8) is not for_other
    current = shared_predictor(run, 2, 8)
    run.paths = dataclasses.replace(run.paths)  # equal paths: still the same predictor
    assert shared_predictor(run, 2, 8) is current


def test_a_run_trained_with_scanned_layers_is_decoded_unrolled_with_the_same_answers(workdir):
    """The 8B recipe trains with `scan_layers`; its Predictor decodes with the layers unrolled (a scan would copy
    every layer's weights at each answer token) and must answer exactly as the run's own layout does."""
    from vital_jax.models.qwen3_vl import params as qwen3_vl_params
    from vital_jax.run import TrainedRun

    run = load_run(workdir)
    config = run.model.backbone_config
    scanned_config = dataclasses.replace(config, text=dataclasses.replace(config.text, scan_layers=True))
    stacked = qwen3_vl_params.to_layout(run.params["backbone"], True)
    assert "layers" in stacked["language_model"]["model"]
    scanned = TrainedRun(run.config, dataclasses.replace(run.model, backbone_config=scanned_config),
                         {**run.params, "backbone": stacked}, run.paths, run.step)
    predictor = Predictor(scanned, batch_size=2, max_new_tokens=6)
    assert predictor.model.backbone_config.text.scan_layers is False
    assert "layers" not in predictor.backbone_params["language_model"]["model"]
    assert predictor.source_params is stacked  # shared_predictor's test for replaced parameters
    images_dir = os.path.join(run.paths.data_dir, "images")
    images = [os.path.join(images_dir, name) for name in sorted(os.listdir(images_dir))[:2]]
    questions = ["Where is the liver?", "Is there a lesion?"]
    reference = Predictor(run, batch_size=2, max_new_tokens=6)
    for k in (0, 3):
        ours, z, _ = predictor.answer(images, questions, k)
        theirs, z_ref, _ = reference.answer(images, questions, k)
        assert ours == theirs and np.array_equal(z, z_ref), k


def _one_example(run, predictor):
    """One demo image and question as both sides take them: (image, question, prompt ids, patches, grid) for
    transformers and the predictor's prefix for vital_jax."""
    from vital_jax.models.qwen3_vl import preprocessing, prompt

    images = os.path.join(run.paths.data_dir, "images")
    image = os.path.join(images, sorted(os.listdir(images))[1])
    question = "Is there a kidney in the image?"
    patches, grid = preprocessing.preprocess_image(image, min_pixels=run.config.data.min_pixels,
                                                   max_pixels=run.config.data.max_pixels)
    ids = prompt.tokenize_prompt(predictor.tokenizer, question, grid).input_ids
    prefix, _ = predictor.encode([image], [question])
    return image, question, ids, patches, grid, prefix


def test_export_loads_in_transformers_and_torch_latent_generate_matches(workdir, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    from conversion import vital_export
    from conversion.torch_latent_generate import latent_generate
    from vital_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration as FlaxQwen3VL
    from vital_jax.vital import trainable

    run = load_run(workdir)
    out = tmp_path / "export"
    vital_export.export_run(workdir, str(out))
    hf = Qwen3VLForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
    assert (out / "scaffolding" / "decoder" / "model.safetensors").exists()

    predictor = Predictor(run, batch_size=1, max_new_tokens=12)
    image, question, ids, patches, grid, prefix = _one_example(run, predictor)

    # Merged-LoRA logits: transformers on the export == vital_jax on the merged params.
    merged = trainable.merge_lora(run.params["backbone"], run.model.config.lora)
    ours = FlaxQwen3VL(run.model.backbone_config).apply(
        {"params": merged}, input_ids=prefix.input_ids, token_valid=prefix.token_valid,
        positions=prefix.positions, pixel_patches=prefix.pixel_patches, vision_inputs=prefix.vision_inputs)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids[None], dtype=torch.long), pixel_values=torch.tensor(patches),
                    image_grid_thw=torch.tensor(grid[None]),
                    mm_token_type_ids=torch.tensor((ids[None] == hf.config.image_token_id).astype(np.int64)))
    valid = np.asarray(prefix.token_valid[0])
    assert np.max(np.abs(np.asarray(ours.logits)[0][valid] - theirs.logits.numpy()[0])) <= 1e-4

    # A tokenizer with ids past the model's vocabulary is refused on the host, naming the example.
    predictor.vocab_size = int(max(ids))
    with pytest.raises(ValueError, match=r"example 0 .*outside the model's vocabulary"):
        predictor.encode([image], [question])
    predictor.vocab_size = run.model.backbone_config.text.vocab_size

    eos = predictor.sampling.eos_token_ids
    for k in (0, 2, 4):
        tokens, lengths, _ = run.model.generate(run.params["backbone"], prefix, jnp.full((1,), k, jnp.int32),
                                                predictor.sampling)
        jax_tokens = [int(t) for t in np.asarray(tokens)[0, :int(lengths[0])]]
        torch_tokens = latent_generate(hf, torch.tensor(ids[None], dtype=torch.long), torch.tensor(patches),
                                       torch.tensor(grid[None]), latent_steps=k, max_new_tokens=12,
                                       eos_token_ids=eos)
        assert torch_tokens == jax_tokens, k


def test_a_pause_run_exports_its_pause_vectors_and_torch_feeds_them_as_vital_jax_does(workdir, tmp_path):
    """The pause control's slots are fed learned vectors: its export held only pj_in and the projector, recorded
    no latent_input, and the torch path fed z_{k-1} back to a model that never saw it."""
    from transformers import Qwen3VLForConditionalGeneration

    from conversion import vital_export
    from conversion.torch_latent_generate import default_latent_steps, latent_generate, read_pause_embeddings
    from vital_jax.models import safetensors_io
    from vital_jax.vital.model import VitalModel

    run = load_run(workdir)
    model = VitalModel(dataclasses.replace(run.model.config, latent_input="pause", latent_steps_cap=2),
                       run.model.backbone_config, run.model.decoder_config)
    d = run.model.backbone_config.text.hidden_size
    pause = np.random.RandomState(0).randn(model.config.k_max, d).astype(np.float32)
    paused = dataclasses.replace(run, model=model, params={**run.params, "pause_embeddings": jnp.asarray(pause)},
                                 predictors={})
    out = tmp_path / "export"
    vital_export.export_run(workdir, str(out), run=paused)
    heads = safetensors_io.read_file(str(out / vital_export.HEADS_FILE))
    np.testing.assert_array_equal(heads[vital_export.PAUSE_TENSOR], pause)
    record = json.load(open(out / vital_export.VITAL_FILE))
    assert record["latent_input"] == "pause" and default_latent_steps(str(out)) == 2
    assert torch.equal(read_pause_embeddings(str(out)), torch.tensor(pause))

    hf = Qwen3VLForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
    predictor = Predictor(run, batch_size=1, max_new_tokens=8)
    _, _, ids, patches, grid, prefix = _one_example(run, predictor)
    eos = predictor.sampling.eos_token_ids
    k = jnp.full((1,), 3, jnp.int32)
    tokens, lengths, z = model.generate(paused.params["backbone"], prefix, k, predictor.sampling,
                                        pause_embeddings=paused.params["pause_embeddings"])
    _, _, z_feedback = run.model.generate(run.params["backbone"], prefix, k, predictor.sampling)
    assert not np.allclose(np.asarray(z)[0, 1:3], np.asarray(z_feedback)[0, 1:3], atol=1e-3)  # the inputs matter
    torch_tokens = latent_generate(hf, torch.tensor(ids[None], dtype=torch.long), torch.tensor(patches),
                                   torch.tensor(grid[None]), latent_steps=3, max_new_tokens=8, eos_token_ids=eos,
                                   pause_embeddings=read_pause_embeddings(str(out)))
    assert torch_tokens == [int(t) for t in np.asarray(tokens)[0, :int(lengths[0])]]
    (out / vital_export.HEADS_FILE).unlink()
    with pytest.raises(ValueError, match="heads.safetensors: no pause_embeddings"):
        read_pause_embeddings(str(out))


def test_demo_finish_prints_results_and_writes_every_artefact(workdir, tmp_path, capsys):
    from vital_jax import demo

    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    demo.finish(str(copy), eval_limit=8)
    out = capsys.readouterr().out
    assert ("| K | closed accuracy | majority answer | majority answer per question type | majority answer per "
            "option set | chance |") in out
    assert "| 4 |" in out
    summary = json.load(open(copy / "eval" / "demo_summary.json"))
    assert [r["latent_steps"] for r in summary["results"]] == [0, 4, "record"]
    assert "| each question's own K |" in out
    assert all({"closed_accuracy", "closed_majority_baseline", "closed_majority_by_type_baseline"} <= set(r)
               for r in summary["results"])
    for path in ("eval/k_sweep.png", "eval/summary.md", "explain/summary.png", "export_hf/model.safetensors",
                 "export_hf/scaffolding/heads.safetensors"):
        assert (copy / path).exists(), path


def _command(module, *args):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=repo,
                          env=dict(os.environ, PYTHONPATH=repo), timeout=600)


def test_evaluate_command_prints_its_headline_numbers_and_no_library_logging(workdir, tmp_path):
    run_data = load_run(workdir).paths.data_dir
    res = _command("vital_jax.evaluate", f"--checkpoint={workdir}", "--benchmark=phantom_vqa",
                   f"--data_dir={run_data}", "--latent_steps=2", "--latency_examples=1",
                   f"--out={tmp_path / 'eval'}")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.load(open(tmp_path / "eval" / "phantom_vqa.metrics.json"))
    out = res.stdout
    assert metrics["closed"]["count"] and metrics["open"]["count"], metrics  # the test split has both kinds
    assert f"phantom_vqa, test split, K=2: {metrics['count']} questions" in out
    assert f"{100 * metrics['closed_accuracy']:.1f}%, n={metrics['closed']['count']}; floors: majority answer" in out
    assert "majority per type" in out and "accuracy = the normalised answer" in out
    assert all(f"  {qtype} " in out for qtype in metrics["per_question_type"])
    assert "loading the run" in res.stderr and "compiling generation" in res.stderr
    assert "Traceback" not in res.stderr and not any(line[:1] == "I" and line[1:5].isdigit()
                                                     for line in res.stderr.splitlines()), res.stderr[-3000:]


def test_torch_latent_generate_command_answers_as_vital_jax_does(workdir, tmp_path):
    from conversion import vital_export

    run = load_run(workdir)
    vital_export.export_run(workdir, str(tmp_path / "export"))
    image = os.path.join(run.paths.data_dir, "images", sorted(os.listdir(os.path.join(run.paths.data_dir,
                                                                                      "images")))[1])
    question = "Is there a kidney in the image?"
    res = _command("conversion.torch_latent_generate", f"--model={tmp_path / 'export'}", f"--image={image}",
                   f"--question={question}", "--latent_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    # transformers renamed past_key_values to cache (5.2x): the old name warned on every run.
    assert "deprecated" not in res.stderr and "Warning" not in res.stderr, res.stderr[-3000:]
    expected = Predictor(run, batch_size=1, max_new_tokens=32).answer([image], [question], 2)[0][0]
    assert res.stdout.strip() == expected


def _copy_run(workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy


def _same_params(a, b):
    import jax

    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_load_run_takes_a_relative_workdir_and_loads_without_the_training_data(workdir, tmp_path, monkeypatch):
    """orbax wants absolute paths; the ROI dimension comes from the checkpoint, so a run whose training data is
    gone still loads (it used to guess 1152 and fail on a shape mismatch that blamed the config)."""
    run = load_run(workdir)
    copy = _copy_run(workdir, tmp_path)
    shutil.rmtree(copy / "demo" / "data")
    monkeypatch.chdir(tmp_path)
    moved = load_run("run")
    assert moved.step == run.step and moved.phase == len(run.config.curriculum.max_k)
    assert _same_params(moved.params, run.params)
    from vital_jax.models.hf_config import ConfigError

    assert moved.paths.decoder_dir.startswith(str(copy))   # the test demo pretrains its own models
    shutil.rmtree(moved.paths.decoder_dir)
    with pytest.raises(ConfigError, match="the demo's decoder is missing"):
        load_run("run")


def test_load_run_warns_about_an_unfinished_run_and_refuses_lost_checkpoints(workdir, tmp_path, caplog):
    run = load_run(workdir)
    assert run.finished
    copy = _copy_run(workdir, tmp_path)
    last = len(run.config.curriculum.max_k)
    # Stopped inside the last phase (killed or preempted after its latest checkpoint): no completion marker.
    (copy / f"phase_{last}" / "DONE.json").unlink()
    with caplog.at_level("WARNING"):
        stopped = load_run(str(copy))
    assert stopped.step == run.step and not stopped.finished
    assert f"phase_{last}, the last, has no completion marker for step {run.step}" in caplog.text
    shutil.rmtree(copy / f"phase_{last}")
    (copy / f"phase_{last}").mkdir()   # the phase started, no checkpoint yet
    with caplog.at_level("WARNING"):
        partial = load_run(str(copy))
    assert partial.phase == last - 1 and partial.step < run.step and not partial.finished
    assert f"phase_{last} of {last} has no checkpoint" in caplog.text
    # The run had finished (the train command's summary says where): a checkpoint is missing, not pending.
    (copy / "train_summary.json").write_text(json.dumps({"preempted": False, "step": run.step}))
    with pytest.raises(Exception, match=f"says training finished at step {run.step}, but the latest checkpoint is "
                                        f"step {partial.step} of phase_{last - 1}"):
        load_run(str(copy))


def test_load_run_names_a_malformed_config_or_demo_record(workdir, tmp_path):
    from vital_jax.checkpoint import CheckpointError
    from vital_jax.models.hf_config import ConfigError

    copy = _copy_run(workdir, tmp_path)
    ready = copy / "demo" / "READY.json"
    ready.write_text('{"models": ')
    with pytest.raises(ConfigError, match=f"{ready}: malformed JSON"):
        load_run(str(copy))
    config = copy / "config.json"
    config.write_text('{"data": ')
    with pytest.raises(CheckpointError, match=f"{config}: malformed JSON"):
        load_run(str(copy))
    config.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a recorded training config"):
        load_run(str(copy))


def test_floors_of_a_split_without_closed_questions_are_none(workdir, tmp_path):
    """A dataset of open questions only (BiomedParse's builds none closed) has no closed floor; `floors` said so
    with an IndexError before."""
    from vital_jax.data.records import RECORDS_FILE, read_records, write_records
    from vital_jax.eval.floors import floors

    run = load_run(workdir)
    data = tmp_path / "data"
    shutil.copytree(run.paths.data_dir, data)
    records = read_records(str(data / RECORDS_FILE))
    open_only = [r for r in records if r.question_type not in ("yes_no", "location_choice")]   # phantom_vqa's open
    assert open_only and len(open_only) < len(records)
    write_records(str(data / RECORDS_FILE), open_only)
    split = open_only[0].split
    out = floors(str(data), split)
    assert out["closed"] == {"chance": None, "majority": None, "majority_by_type": None, "majority_by_options": None,
                             "strongest": None, "count": 0}
    assert all("majority_f1" in v for k, v in out.items() if k != "closed")


def test_a_torn_demo_record_is_rebuilt_not_a_traceback(demo_assets, tmp_path, caplog):
    """READY.json cut short (a crash mid-write on an older version, a bad copy): prepare warns and rebuilds the
    record, reusing every asset it finds."""
    from tests.conftest import demo_test_config
    from vital_jax import demo
    from vital_jax.run import DEMO_READY_FILE, resolve_paths

    shutil.copytree(demo_assets, tmp_path / "demo")
    ready = tmp_path / "demo" / DEMO_READY_FILE
    record = json.loads(ready.read_text())
    ready.write_text('{"models": "pret')
    config = demo_test_config()
    with caplog.at_level("WARNING"):
        paths = demo.prepare(str(tmp_path), config.demo)
    assert "building the demo's assets again" in caplog.text and str(ready) in caplog.text
    assert json.loads(ready.read_text())["models"] == record["models"]
    assert paths == resolve_paths(config, str(tmp_path))


def test_a_deleted_demo_asset_is_built_again_not_trusted_to_be_there(demo_assets, tmp_path, caplog):
    """READY.json was trusted: with demo/roi_encoder deleted, every rerun failed. prepare now names what is missing
    and builds it (the same encoder: written from the demo's seed), reusing the rest."""
    from safetensors.numpy import load_file

    from tests.conftest import demo_test_config
    from vital_jax import demo
    from vital_jax.data.records import ROI_FEATURES_FILE

    shutil.copytree(demo_assets, tmp_path / "demo")
    encoder = tmp_path / "demo" / "roi_encoder"
    original = load_file(str(encoder / "model.safetensors"))
    features = tmp_path / "demo" / "data" / ROI_FEATURES_FILE
    features_written = features.stat().st_mtime_ns
    shutil.rmtree(encoder)
    with caplog.at_level("WARNING"):
        paths = demo.prepare(str(tmp_path), demo_test_config().demo)
    assert f"{encoder / 'config.json'} is missing; building what is missing" in caplog.text
    assert paths.encoder_dir == str(encoder)
    rebuilt = load_file(str(encoder / "model.safetensors"))
    assert sorted(rebuilt) == sorted(original)
    assert all(np.array_equal(rebuilt[k], original[k]) for k in original)
    assert features.stat().st_mtime_ns == features_written   # the features it had made are kept
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert demo.prepare(str(tmp_path), demo_test_config().demo) == paths
    assert "missing" not in caplog.text


def test_a_damaged_final_checkpoint_is_named_with_what_to_do(workdir, tmp_path):
    """Evaluation (load_run; MedSynapse-V's load_trained reads through the same `restore_saved_state`) of a run
    whose last checkpoint's files are truncated: one error naming the checkpoint, not orbax's traceback."""
    import glob

    from vital_jax.checkpoint import UnreadableCheckpointError

    run = load_run(workdir)
    copy = _copy_run(workdir, tmp_path)
    state = copy / f"phase_{run.phase}" / str(run.step) / "state"
    for path in glob.glob(str(state / "**" / "d" / "*"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UnreadableCheckpointError, match=f"{state}: cannot read the checkpoint .*rerunning the "
                                                         "training command moves it aside"):
        load_run(str(copy))


def test_a_prompt_longer_than_every_bucket_names_its_image_and_question(workdir):
    from vital_jax.inference import shared_predictor

    run = load_run(workdir)
    predictor = shared_predictor(run, 2, 4)
    images_dir = os.path.join(run.paths.data_dir, "images")
    image = os.path.join(images_dir, sorted(os.listdir(images_dir))[0])
    long_question = "Where is the liver? " * 2000
    with pytest.raises(ValueError, match=re.escape(f"{image}, question 'Where is the liver? Where") +
                       r".*\.\.\.: the prompt is \d+ tokens, more than the largest prompt bucket \d+"):
        predictor.encode([image, image], ["Where is the liver?", long_question])


def test_evaluate_command_states_the_per_type_floor_of_the_questions_it_answered(workdir, tmp_path):
    """With --limit, the printed per-type majority floor was the whole split's, beside accuracy on the first N."""
    from vital_jax.eval.floors import floors

    run_data = load_run(workdir).paths.data_dir
    whole = floors(run_data, "test")["closed"]["majority_by_type"]
    limit = next(n for n in range(2, 200) if floors(run_data, "test", n)["closed"]["majority_by_type"] not in
                 (None, whole))
    res = _command("vital_jax.evaluate", f"--checkpoint={workdir}", "--benchmark=phantom_vqa",
                   f"--data_dir={run_data}", "--latent_steps=0", "--latency_examples=1", f"--limit={limit}",
                   f"--out={tmp_path / 'eval'}")
    assert res.returncode == 0, res.stderr[-3000:]
    limited = floors(run_data, "test", limit)["closed"]["majority_by_type"]
    assert f"majority per type {100 * limited:.1f}%" in res.stdout, (limit, whole, res.stdout)
    # ... and the files hold it too (it was printed only).
    written = json.load(open(tmp_path / "eval" / "phantom_vqa.metrics.json"))
    assert written["closed_majority_by_type_baseline"] == pytest.approx(limited)


def test_flax_to_hf_shards_a_run_export_at_max_shard_gb(workdir, tmp_path):
    from conversion import flax_to_hf
    from vital_jax.models import safetensors_io

    out = tmp_path / "export"
    assert flax_to_hf.main([f"--checkpoint={workdir}", f"--out={out}", "--max_shard_gb=0.000001"]) == 0
    for folder in (out, out / "scaffolding" / "decoder"):
        assert (folder / safetensors_io.INDEX_FILE).exists() and not (folder / safetensors_io.SINGLE_FILE).exists()


def test_a_bf16_export_of_a_run_records_bfloat16_in_its_configs(workdir, tmp_path):
    """The backbone's and the decoder's config.json were the source's (no dtype in the demo's, "bfloat16" in
    text_config only in the Hub's Qwen3-VL-8B): they now say the dtype the weights were written in, and
    transformers loads them as such with dtype="auto"."""
    from transformers import Qwen3ForCausalLM, Qwen3VLForConditionalGeneration

    from conversion import vital_export

    out = tmp_path / "export"
    vital_export.export_run(workdir, str(out), dtype="bfloat16")
    decoder = out / "scaffolding" / "decoder"
    for folder in (out, decoder):
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16", folder
    assert Qwen3VLForConditionalGeneration.from_pretrained(str(out), dtype="auto").dtype == torch.bfloat16
    assert Qwen3ForCausalLM.from_pretrained(str(decoder), dtype="auto").dtype == torch.bfloat16


def test_a_run_export_killed_in_the_scaffolding_is_redone_by_the_next(workdir, tmp_path, monkeypatch):
    """A kill while the decoder's weights were written (the backbone's already in place) left a folder the next
    export refused ("already holds weights"); it now writes the export again, leaving no temporary file."""
    from conversion import flax_to_hf
    from vital_jax.models import safetensors_io

    out = tmp_path / "export"
    write_file = safetensors_io._write_file

    def killed_in_the_decoder(path, specs, metadata):
        if os.path.join("scaffolding", "decoder") in path:
            open(path + ".tmp", "wb").close()
            raise KeyboardInterrupt
        write_file(path, specs, metadata)
    monkeypatch.setattr(safetensors_io, "_write_file", killed_in_the_decoder)
    with pytest.raises(KeyboardInterrupt):
        flax_to_hf.main([f"--checkpoint={workdir}", f"--out={out}"])
    assert (out / safetensors_io.SINGLE_FILE).exists()
    monkeypatch.setattr(safetensors_io, "_write_file", write_file)
    assert flax_to_hf.main([f"--checkpoint={workdir}", f"--out={out}"]) == 0
    files = [os.path.relpath(os.path.join(root, name), out) for root, _, names in os.walk(out) for name in names]
    assert not [f for f in files if f.endswith(".tmp") or f == safetensors_io.UNFINISHED_FILE], files
    assert {"vital.json", "scaffolding/heads.safetensors", "scaffolding/decoder/model.safetensors"} <= set(files)
    assert json.loads((out / "vital.json").read_text())["curriculum_finished"] is True


def test_grounding_scores_each_trained_step_as_the_single_example_explanation_does(workdir, tmp_path):
    """explain --data_dir --grounding: the pointing game of each latent step over a split, per step over the
    records trained with that many steps, beside chance and the ROI feature itself; each number recomputed here
    from explain_example's per-image agreement and from the ROI arrays."""
    from vital_jax.data.records import RECORDS_FILE, load_roi_arrays, read_records, roi_feature_layer
    from vital_jax.data.roi import load_mask, load_roi_encoder
    from vital_jax.explain import explain_example, grounding, mask_agreement, mask_on_grid
    from vital_jax.vital import interpret

    run = load_run(workdir)
    data = run.paths.data_dir
    records = [r for r in read_records(os.path.join(data, RECORDS_FILE)) if r.split == "val"][:6]
    assert len({r.latent_steps for r in records}) > 1  # records of several K: the per-step counts differ
    scores = grounding(run, data, "val", limit=6, batch_size=4)
    steps, chance, target = [[] for _ in range(4)], [], []
    encoder, params = load_roi_encoder(run.paths.encoder_dir, roi_feature_layer(data))
    roi = load_roi_arrays(data)
    for i, record in enumerate(records):
        image = os.path.join(data, record.image)
        single = explain_example(run, image, record.question, str(tmp_path / str(i)), latent_steps=4,
                                 mask_path=os.path.join(data, record.mask), neighbours=0)
        for step in range(min(record.latent_steps, 4)):
            steps[step].append((record.id, single["heatmaps"][step]))
        mask = load_mask(os.path.join(data, record.mask))
        chance.append(mask_on_grid(mask, single["heatmaps"][0]["grid"][0])[0].mean())
        features = encoder.image_patches(params, np.asarray(Image.open(image).convert("RGB")))
        heat = interpret.patch_heatmaps(jnp.asarray(roi["features"][record.roi_index], jnp.float32)[None, None],
                                        features)
        target.append((record.id, mask_agreement(np.asarray(heat)[0], mask)[0]))
    assert [s["count"] for s in scores["steps"]] == [len(entries) for entries in steps if entries]
    for got, entries in zip(scores["steps"], steps):
        assert got["pointing"] == np.mean([e["peak_in_mask"] for _, e in entries])
        assert got["contrast"] == pytest.approx(np.mean([e["mean_inside"] - e["mean_outside"] for _, e in entries]),
                                                abs=1e-4)
        assert got["hits"] == {i: e["peak_in_mask"] for i, e in entries}  # per record, for paired tests
    assert scores["chance"] == pytest.approx(np.mean(chance))
    assert scores["roi_feature"]["pointing"] == np.mean([t["peak_in_mask"] for _, t in target])
    assert scores["roi_feature"]["hits"] == {i: t["peak_in_mask"] for i, t in target}
    assert scores["roi_feature"]["count"] == 6
    with pytest.raises(ValueError, match="1..K_max=4"):
        grounding(run, data, "val", limit=2, latent_steps=5)
