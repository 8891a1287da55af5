"""TensorBoard summaries read back with tensorboard's own reader, JSONL, progress output, throughput and MFU."""

import io
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from vital_jax import observability as obs


def read_events(logdir):
    """tensorboard's EventAccumulator over `logdir`, everything kept (no sampling of images or text)."""
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                                    event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return accumulator


def text_summaries(accumulator, tag):
    """[(step, text)] of a text summary written by `TensorBoardWriter.text(step, tag, ...)`."""
    return [(e.step, b"".join(e.tensor_proto.string_val).decode())
            for e in accumulator.Tensors(f"{tag}/text_summary")]


class _Clock:
    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_the_writer_does_not_load_torch_and_leaves_it_importable(tmp_path):
    """tensorboardX's writer imports torch whenever it is installed (seconds and ~200 MB of every training
    process, for nothing): in a fresh process the summaries are written without it, an image included, and torch
    imports normally afterwards. (In this process torch is loaded already: the writer then leaves it alone.)"""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from vital_jax.observability import TensorBoardWriter\n"
        f"with TensorBoardWriter({str(tmp_path)!r}) as w:\n"
        "    w.scalars(1, {'loss': 2.0}); w.image(1, 'im', np.zeros((2, 2, 3), np.uint8)); w.text(1, 't', 'x')\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "import torch\n"
        "print(loaded, torch.ones(2).sum().item())\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.split() == ["[]", "2.0"], (res.stdout, res.stderr[-2000:])
    events = read_events(tmp_path)
    assert events.Scalars("loss")[0].value == 2.0 and len(events.Images("im")) == 1

    import torch

    with obs.TensorBoardWriter(str(tmp_path / "loaded")) as writer:
        writer.scalars(1, {"loss": 1.0})
    assert sys.modules["torch"] is torch


def test_scalars_an_image_and_text_read_back_in_tensorboard(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[1, 2] = (255, 0, 0)
    rgb[4, 7] = (0, 200, 50)
    with obs.TensorBoardWriter(str(tmp_path)) as writer:
        writer.scalars(1, {"train/loss": np.float32(2.5), "lr": jnp.asarray(3e-4)})
        writer.scalars(300, {"train/loss": 1.25, "perf/mfu": 0.4})
        writer.scalars(2**40, {"grad_norm": 7})
        writer.image(300, "probe/heatmap/z1", rgb)
        writer.text(300, "probe/latent_steps", "| step | text |\n|---|---|\n| z1 | left kidney |")
    (name,) = os.listdir(tmp_path)
    assert re.fullmatch(r"events\.out\.tfevents\.\d+\.[^/]+", name)

    events = read_events(tmp_path)
    tags = events.Tags()
    assert sorted(tags["scalars"]) == ["grad_norm", "lr", "perf/mfu", "train/loss"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 300]
    np.testing.assert_allclose([e.value for e in loss], [2.5, 1.25])
    assert events.Scalars("lr")[0].value == pytest.approx(3e-4, rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("grad_norm")] == [(2**40, 7.0)]

    assert tags["images"] == ["probe/heatmap/z1"]
    (image,) = events.Images("probe/heatmap/z1")
    assert (image.step, image.width, image.height) == (300, 8, 6)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, rgb)  # PNG: lossless

    assert text_summaries(events, "probe/latent_steps") == [(300, "| step | text |\n|---|---|\n| z1 | left kidney |")]


def test_two_writers_in_the_same_second_do_not_overwrite(tmp_path):
    first = obs.TensorBoardWriter(str(tmp_path))
    second = obs.TensorBoardWriter(str(tmp_path))
    first.scalars(1, {"a": 1.0})
    second.scalars(1, {"b": 2.0})
    first.close()
    second.close()
    assert len(os.listdir(tmp_path)) == 2
    events = read_events(tmp_path)
    assert sorted(events.Tags()["scalars"]) == ["a", "b"]


def test_bad_summaries_are_rejected_with_their_name(tmp_path):
    with obs.TensorBoardWriter(str(tmp_path)) as writer:
        with pytest.raises(TypeError, match="shape"):
            writer.scalars(1, {"hist": np.ones(3)})
        with pytest.raises(TypeError, match="'name'"):
            writer.scalars(1, {"name": "abc"})
        with pytest.raises(TypeError, match="'heat'.*float32"):
            writer.image(1, "heat", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="closed"):
        writer.scalars(2, {"loss": 1.0})


def test_jsonl_records_convert_numpy_and_jax_scalars(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with obs.JsonlWriter(str(path), clock=_Clock(5.0)) as writer:
        writer.write(np.int64(10), {"loss": jnp.float32(0.5), "tokens": np.int32(7), "finite": np.bool_(True),
                                    "phase": "warmup"})
        assert json.loads(path.read_text())["loss"] == 0.5  # flushed before close
    (line,) = path.read_text().splitlines()
    assert json.loads(line) == {"step": 10, "time": 5.0, "loss": 0.5, "tokens": 7, "finite": True,
                                "phase": "warmup"}


def test_jsonl_appends_when_a_run_resumes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with obs.JsonlWriter(str(path)) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.0})
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-line
    with obs.JsonlWriter(str(path)) as writer:
        writer.write(3, {"loss": 1.0})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines[:2]] == [1, 2]
    assert lines[2] == '{"step": 3, "lo'
    assert json.loads(lines[3])["loss"] == 1.0


def test_jsonl_rewind_moves_the_records_after_the_resumed_step_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with obs.JsonlWriter(str(path)) as writer:
        for step in (1, 2, 3, 4):
            writer.write(step, {"loss": 1.0 / step, "stage": "backbone"})
        writer.write(2, {"loss": 0.5, "stage": "decoder"})
        writer.write(3, {"loss": 0.4, "stage": "decoder"})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-line
    with obs.JsonlWriter(str(path)) as writer:
        assert writer.rewind(2, where={"stage": "decoder"}) == 2  # only that stage's rows (and the torn line)
        assert writer.rewind(2) == 2
        writer.write(3, {"loss": 0.3, "stage": "backbone"})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "backbone"), (2, "backbone"), (2, "decoder"),
                                                        (3, "backbone")]
    assert rows[-1]["loss"] == 0.3
    rewound = (tmp_path / "metrics.rewound.jsonl").read_text().splitlines()
    assert rewound[1] == '{"step": 4, "lo' and len(rewound) == 4  # nothing lost
    assert sorted((json.loads(r)["step"], json.loads(r)["stage"]) for r in rewound if r != rewound[1]) == [
        (3, "backbone"), (3, "decoder"), (4, "backbone")]


def test_jsonl_last_is_the_newest_matching_record_without_step_and_time(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with obs.JsonlWriter(str(path)) as writer:
        assert writer.last() == {}
        writer.write(1, {"loss": 1.0, "stage": "warmup"})
        writer.write(2, {"loss": 0.5, "stage": "warmup"})
        writer.write(3, {"reward_mean": 0.25, "stage": "ccr"})
        assert writer.last({"stage": "warmup"}) == {"loss": 0.5, "stage": "warmup"}  # read before close: flushed
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-line is skipped
    with obs.JsonlWriter(str(path)) as writer:
        assert writer.last() == {"reward_mean": 0.25, "stage": "ccr"}
        assert writer.last({"stage": "imt"}) == {}


def test_progress_bar_redraws_one_line_on_a_terminal():
    stream, clock = _FakeTTY(), _Clock(0.0)
    progress = obs.ProgressReporter(100, "train", stream=stream, every=10, clock=clock)
    progress.update(10, loss=2.0, samples_per_sec=64.0)
    clock.now = 20.0
    progress.update(20, loss=jnp.float32(1.5), samples_per_sec=32.0)
    progress.close()
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n") and out.count("\r") == 2
    first, second = out[1:-1].split("\r")
    assert "10/100" in first and "loss 2.0000" in first and "64.0 samples/s" in first and "ETA --:--" in first
    # 10 steps took 20 s, 80 to go: 160 s.
    assert "20/100" in second and "loss 1.5000" in second and "32.0 samples/s" in second and "ETA 02:40" in second
    assert "[####" in second and "20%" in second


def test_progress_writes_plain_lines_every_n_steps_off_a_terminal():
    stream, clock = io.StringIO(), _Clock(0.0)
    progress = obs.ProgressReporter(50, "train", stream=stream, every=20, clock=clock)
    for step in range(5, 51, 5):
        clock.now = step
        progress.update(step, loss=1.0)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [int(re.search(r"step (\d+)/50", line).group(1)) for line in lines] == [5, 25, 45, 50]
    assert lines[1] == "train step 25/50 (50.0%) loss 1.0000 ETA 00:25"


def test_non_primary_process_writes_nothing(tmp_path):
    stream = _FakeTTY()
    workdir = tmp_path / "run"
    logger = obs.MetricsLogger(str(workdir), 10, is_primary=False, stream=stream, flops_per_step=1.0,
                               peak_flops=1.0)
    logger.log(1, {"loss": 1.0}, samples=4, tokens=40)
    logger.log(2, {"loss": 0.5}, samples=4, tokens=40)
    logger.close()
    assert not workdir.exists() and stream.getvalue() == ""


def test_throughput_and_mfu_on_hand_computed_inputs(tmp_path):
    clock = _Clock(100.0)
    logger = obs.MetricsLogger(str(tmp_path), 100, is_primary=True, stream=io.StringIO(), clock=clock,
                               flops_per_step=2e12, peak_flops=1e13)
    assert logger.log(10, {"loss": 1.0}, samples=8, tokens=1024) == {}  # the first call only starts the clock
    clock.now = 104.0  # 10 steps in 4 s
    perf = logger.log(20, {"loss": 0.5}, samples=8, tokens=1024)
    assert perf == pytest.approx({"perf/steps_per_sec": 2.5, "perf/samples_per_sec": 20.0,
                                  "perf/tokens_per_sec": 2560.0, "perf/mfu": 0.5})  # 2e12 * 2.5 / 1e13
    clock.now = 200.0  # an evaluation pause
    logger.reset_timer(20)
    clock.now = 201.0
    assert logger.log(21, {"loss": 0.4}, samples=8)["perf/samples_per_sec"] == pytest.approx(8.0)
    logger.close()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 21]
    assert records[1]["perf/mfu"] == pytest.approx(0.5) and "perf/mfu" not in records[0]
    events = read_events(tmp_path / "tensorboard")
    at_20 = {tag: [e.value for e in events.Scalars(tag) if e.step == 20] for tag in events.Tags()["scalars"]}
    assert at_20 == pytest.approx({"loss": [0.5], "perf/steps_per_sec": [2.5], "perf/samples_per_sec": [20.0],
                                   "perf/tokens_per_sec": [2560.0], "perf/mfu": [0.5]})
    assert [e.step for e in events.Scalars("loss")] == [10, 20, 21]


def test_mfu_needs_both_flops_and_peak(tmp_path):
    with pytest.raises(ValueError, match="both"):
        obs.MetricsLogger(str(tmp_path), 10, is_primary=False, flops_per_step=1.0)


def test_flops_given_per_log_call_override_the_constant_and_need_a_peak(tmp_path):
    """Training passes each step's FLOPs (prompt buckets vary); without a known peak no MFU is reported."""
    clock = iter([0.0, 2.0, 4.0]).__next__
    logger = obs.MetricsLogger(str(tmp_path), 10, is_primary=False, peak_flops=1e12, clock=clock)
    logger.log(0, {})
    assert logger.log(2, {}, flops=3e11)["perf/mfu"] == pytest.approx(0.3)  # 1 step/s x 0.3 TFLOP / 1 TFLOP/s
    no_peak = obs.MetricsLogger(str(tmp_path), 10, is_primary=False, clock=iter([0.0, 1.0]).__next__)
    no_peak.log(0, {})
    assert "perf/mfu" not in no_peak.log(1, {}, flops=1e12)


def test_peak_flops_come_from_the_device_kind():
    assert obs.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert obs.peak_flops_per_device("TPU v5 lite") == 197e12 and obs.peak_flops_per_device("TPU v5p") == 459e12
    assert obs.peak_flops_per_device("cpu") is None


def test_estimate_flops_per_token_is_6n_plus_12lhs():
    assert obs.estimate_flops_per_token(1000, 2, 8, 16) == 6 * 1000 + 12 * 2 * 8 * 16
    # Qwen3-1.7B-like: 1.7e9 params, 28 layers, hidden 2048, 4096 tokens.
    assert obs.estimate_flops_per_token(1_700_000_000, 28, 2048, 4096) == 10_200_000_000 + 2_818_572_288
