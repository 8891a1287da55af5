"""The training probe: heatmap rendering, the probe example, and a short demo run with the probe on whose
TensorBoard images and text are read back with tensorboard's own reader."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import demo_test_config
from tests.test_observability import read_events, text_summaries
from vital_jax import probe as probe_lib
from vital_jax import train
from vital_jax.data.records import RECORDS_FILE, read_records
from vital_jax.models.hf_config import ConfigError


def test_heatmap_images_are_the_explain_step_figures_on_one_colour_scale():
    from vital_jax.eval import figures

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    maps = rng.normal(size=(2, 3, 3)).astype(np.float32)
    images = probe_lib.heatmap_images(image, maps, ["left kidney", "bright"])
    assert len(images) == 2 and all(i.dtype == np.uint8 and i.ndim == 3 and i.shape[-1] == 3 for i in images)
    # Step 1 drawn as explain draws it, on the range of both maps (not its own): the same pixels.
    shared = figures.step_figure(image, maps[0], "z1: left kidney", figures.heatmap_range(maps))
    np.testing.assert_array_equal(images[0], probe_lib.figure_rgb(shared))
    own = figures.step_figure(image, maps[0], "z1: left kidney")
    assert not np.array_equal(images[0], probe_lib.figure_rgb(own))


def test_probe_example_is_the_first_val_record_or_the_named_one(demo_assets):
    data = os.path.join(demo_assets, "data")
    records = read_records(os.path.join(data, RECORDS_FILE))
    first_val = next(r for r in records if r.split == "val")
    assert probe_lib.select_record(data) == first_val
    assert probe_lib.select_record(data, records[3].id) == records[3]
    with pytest.raises(ConfigError, match="probe_record='nope'"):
        probe_lib.select_record(data, "nope")


def test_markdown_lists_every_decoded_step_beside_the_teacher_step(demo_assets):
    data = os.path.join(demo_assets, "data")
    record = next(r for r in read_records(os.path.join(data, RECORDS_FILE)) if len(r.reasoning_chain) >= 2)
    k = len(record.reasoning_chain)
    texts = [f"step | {i}\nline" for i in range(k)]
    text = probe_lib.markdown(record, probe_lib.ProbeOutput("yes", texts, None))
    rows = [line for line in text.splitlines() if line.startswith("| z")]
    assert [row.split(" | ")[0] for row in rows] == [f"| z{i + 1}" for i in range(k)]
    assert rows[0] == f"| z1 | step \\| 0 line | {' '.join(record.reasoning_chain[0].split())} |"
    assert record.question.split()[0] in text and "**A:** yes" in text


def test_training_with_the_probe_writes_heatmaps_and_decoded_steps_at_every_nth_step(tmp_path, demo_assets,
                                                                                      monkeypatch):
    workdir = tmp_path / "probe_run"
    shutil.copytree(demo_assets, workdir / "demo")
    c = demo_test_config()
    c.curriculum.max_k, c.curriculum.epochs, c.curriculum.min_k = (4,), (1,), ()
    c.logging.probe_every_steps = 2
    data = os.path.join(str(workdir), "demo", "data")
    # A multi-step record (the first val record is K = 1), named by id: one heatmap per latent step.
    record = next(r for r in read_records(os.path.join(data, RECORDS_FILE))
                  if r.split == "val" and r.latent_steps > 1)
    c.logging.probe_record = record.id
    probes = []

    class RecordingProbe(probe_lib.Probe):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            probes.append(self)

    monkeypatch.setattr(probe_lib, "Probe", RecordingProbe)
    summary = train.train(c, str(workdir))
    total = summary["step"]
    assert total >= 4, "too few steps to see the probe repeat"
    expected_steps = list(range(2, total + 1, 2))

    (probe,) = probes
    assert probe.record == record and probe.k == record.latent_steps
    assert probe._run._cache_size() == 1  # compiled once, reused at every probe step

    events = read_events(workdir / "tensorboard")
    tags = events.Tags()
    image_tags = [probe_lib.IMAGE_TAG.format(k) for k in range(1, record.latent_steps + 1)]
    assert sorted(tags["images"]) == sorted(image_tags)
    for tag in image_tags:
        images = events.Images(tag)
        assert [e.step for e in images] == expected_steps
        rgb = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
        assert rgb.shape[0] > 200 and rgb.shape[1] > 200 and rgb.std() > 0
    texts = text_summaries(events, probe_lib.TEXT_TAG)
    assert [step for step, _ in texts] == expected_steps
    rows = [line for line in texts[-1][1].splitlines() if line.startswith("| z")]
    assert len(rows) == record.latent_steps
    assert " ".join(record.question.split()) in texts[-1][1]
    # The scalars are still there, at the logged steps.
    logged = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert [e.step for e in events.Scalars("loss")] == logged


def _probe(workdir: str, record_id: str = "", latent_steps_cap: int | None = None, **path_changes):
    """(the trained demo run in `workdir`, its probe as training builds it): of the record `record_id` (default:
    the first val record), the model's K capped at `latent_steps_cap` when given, the paths changed by
    `path_changes`."""
    import dataclasses

    from vital_jax import sharding
    from vital_jax.run import load_run

    run = load_run(workdir)
    run.config.logging.probe_record = record_id
    model = run.model
    if latent_steps_cap is not None:
        model = dataclasses.replace(model, config=dataclasses.replace(model.config, latent_steps_cap=latent_steps_cap))
    return run, probe_lib.Probe(model, run.config, dataclasses.replace(run.paths, **path_changes),
                                sharding.mesh_from_config(run.config))


def test_a_run_without_an_roi_encoder_dir_probes_with_the_encoder_its_roi_features_came_from(trained_demo_run):
    """model.roi_encoder_dir is empty outside the demo: the probe drew no heatmaps though the dataset's
    roi_features.json names the encoder."""
    _, probe = _probe(trained_demo_run, encoder_dir="")
    assert probe.patch_features is not None and probe.patch_features.shape[1] == 8 * 8  # the tiny SigLIP's grid


def test_the_probe_runs_its_record_at_the_k_training_capped_it_to(trained_demo_run):
    """The probe ran its record at min(K, K_max), ignoring vital.latent_steps_cap: a run trained at K <= 2 (the
    paper's Table 3 rows, the study's controls) was probed at K steps it never trained."""
    from vital_jax.vital import trainable

    data = os.path.join(trained_demo_run, "demo", "data")
    record = next(r for r in read_records(os.path.join(data, RECORDS_FILE)) if r.split == "val" and r.latent_steps > 2)
    outputs = {}
    for cap in (2, 0):
        run, probe = _probe(trained_demo_run, record.id, latent_steps_cap=cap)
        assert probe.k == cap
        outputs[cap] = probe(*trainable.split(run.params, trainable.trainable_mask(run.params,
                                                                                  run.config.vital.train_decoder)))
    assert len(outputs[2].step_texts) == 2 and outputs[2].heatmaps.shape == (2, 8, 8)
    # K = 0 (the no-latent control): the answer alone, no step to decode or draw.
    assert outputs[0].answer and outputs[0].step_texts == [] and outputs[0].heatmaps is None
    assert not [line for line in probe_lib.markdown(record, outputs[0]).splitlines() if line.startswith("| z")]


def test_the_probe_reads_a_16_bit_image_as_the_pipeline_and_the_predictor_do(trained_demo_run, tmp_path):
    """The probe read its image with qwen3_vl.preprocessing.load_image, which refuses 16-bit files that the
    pipeline, the predictor and explain window to 8 bits (vital_jax.data.images.load_image)."""
    from vital_jax.data.images import load_image

    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(trained_demo_run, "demo", "data"), data)
    record = next(r for r in read_records(os.path.join(data, RECORDS_FILE)) if r.split == "val")
    path = os.path.join(data, record.image)
    gray = np.asarray(Image.open(path).convert("L"), np.uint16) * 16  # 12-bit data in a 16-bit file
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I;16")
    _, probe = _probe(trained_demo_run, record.id, data_dir=data)
    np.testing.assert_array_equal(probe.image_rgb, load_image(path))


def test_a_probe_without_an_encoder_warns_from_process_0_only(trained_demo_run, tmp_path, monkeypatch):
    """Every process of a multi-host run builds the probe from the same files, and each printed the same two
    warnings (the missing encoder, no heatmaps): process 0 alone prints them now."""
    import logging

    from vital_jax import distributed
    from vital_jax.data.records import ROI_PROVENANCE_FILE

    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(trained_demo_run, "demo", "data"), data)
    os.remove(os.path.join(data, ROI_PROVENANCE_FILE))  # no encoder named anywhere: no heatmaps
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    warned = {}
    for index in (1, 0):
        monkeypatch.setattr(distributed, "process_position", lambda index=index: (index, 2))
        seen = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: seen.append(record.getMessage())
        absl_logger.addHandler(handler)
        try:
            _, probe = _probe(trained_demo_run, data_dir=data, encoder_dir="")
        finally:
            absl_logger.removeHandler(handler)
        assert probe.patch_features is None
        warned[index] = [m for m in seen if "heatmaps" in m]
        assert absl_logger.level == level  # restored after the probe is built
    assert warned[1] == [] and len(warned[0]) == 2, warned
