"""TensorBoard event files read back by an independent decoder, JSONL, progress output, throughput and MFU."""

import io
import json
import os
import re
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from vital_jax import observability as obs


# An independent reader: bitwise CRC32C (no table) and a generic protobuf field decoder.

def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path):
    with open(path, "rb") as f:
        data = f.read()
    records, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert length_crc == _masked(header), f"bad length CRC at byte {pos}"
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert payload_crc == _masked(payload), f"bad payload CRC at byte {pos}"
        records.append(payload)
        pos += 16 + length
    assert pos == len(data)
    return records


def _read_varint(buf, pos):
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf):
    """{field number: [raw values]}: ints for varints, bytes for fixed32/fixed64/length-delimited."""
    out, pos = {}, 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.setdefault(field, []).append(value)
    return out


def _decode_event(payload):
    fields = _fields(payload)
    event = {"wall_time": struct.unpack("<d", fields[1][0])[0], "step": fields.get(2, [0])[0]}
    if 3 in fields:
        event["file_version"] = fields[3][0].decode()
    if 5 in fields:
        event["values"] = {}
        for value in _fields(fields[5][0])[1]:
            value_fields = _fields(value)
            tag = value_fields[1][0].decode()
            event["values"][tag] = struct.unpack("<f", value_fields[2][0])[0]
    return event


class _Clock:
    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_crc32c_matches_known_vectors():
    assert obs.crc32c(b"123456789") == 0xE3069283
    assert obs.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert obs.crc32c(b"\xff" * 32) == 0x62A8AB43
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    assert obs.crc32c(data) == _crc32c_bitwise(data)
    assert obs.masked_crc32c(data) == _masked(data)


def test_event_file_round_trips_tags_steps_and_values(tmp_path):
    clock = _Clock(1_700_000_000.25)
    with obs.TensorBoardWriter(str(tmp_path), clock=clock) as writer:
        writer.scalars(1, {"loss": np.float32(2.5), "lr": jnp.asarray(3e-4)})
        clock.now += 1.5
        writer.scalars(300, {"loss": 1.25, "perf/mfu": 0.4})
        writer.scalars(2**40, {"grad_norm": 7})
    (name,) = os.listdir(tmp_path)
    assert re.fullmatch(r"events\.out\.tfevents\.1700000000\.[^/]+", name)
    events = [_decode_event(r) for r in _read_records(os.path.join(tmp_path, name))]
    assert events[0] == {"wall_time": 1_700_000_000.25, "step": 0, "file_version": "brain.Event:2"}
    assert [e["step"] for e in events[1:]] == [1, 300, 2**40]
    assert events[2]["wall_time"] == 1_700_000_001.75
    assert events[1]["values"] == {"loss": 2.5, "lr": pytest.approx(3e-4, rel=1e-6)}
    assert events[2]["values"] == {"loss": 1.25, "perf/mfu": pytest.approx(0.4, rel=1e-6)}
    assert events[3]["values"] == {"grad_norm": 7.0}


def test_corrupted_event_file_fails_the_crc_check(tmp_path):
    with obs.TensorBoardWriter(str(tmp_path)) as writer:
        writer.scalars(1, {"loss": 1.0})
    path = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 0x01  # inside the last float
    open(path, "wb").write(bytes(data))
    with pytest.raises(AssertionError, match="payload CRC"):
        _read_records(path)


def test_two_writers_in_the_same_second_do_not_overwrite(tmp_path):
    clock = _Clock()
    first = obs.TensorBoardWriter(str(tmp_path), clock=clock)
    second = obs.TensorBoardWriter(str(tmp_path), clock=clock)
    first.scalars(1, {"a": 1.0})
    second.scalars(1, {"b": 2.0})
    first.close()
    second.close()
    assert first.path != second.path and len(os.listdir(tmp_path)) == 2
    assert _decode_event(_read_records(first.path)[1])["values"] == {"a": 1.0}


def test_non_scalar_metric_is_rejected_with_its_name(tmp_path):
    with obs.TensorBoardWriter(str(tmp_path)) as writer:
        with pytest.raises(TypeError, match="shape"):
            writer.scalars(1, {"hist": np.ones(3)})
        with pytest.raises(TypeError, match="'name'"):
            writer.scalars(1, {"name": "abc"})


def test_event_file_reads_in_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with obs.TensorBoardWriter(str(tmp_path)) as writer:
        for step in (1, 2, 3):
            writer.scalars(step, {"train/loss": 1.0 / step, "perf/mfu": 0.25})
    accumulator = event_accumulator.EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["perf/mfu", "train/loss"]
    loss = accumulator.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in loss], [1.0, 0.5, 1 / 3], rtol=1e-6)


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
    (event_file,) = os.listdir(tmp_path / "tensorboard")
    events = [_decode_event(r) for r in _read_records(str(tmp_path / "tensorboard" / event_file))]
    assert events[2]["step"] == 20
    assert events[2]["values"] == pytest.approx({"loss": 0.5, "perf/steps_per_sec": 2.5, "perf/samples_per_sec": 20.0,
                                                 "perf/tokens_per_sec": 2560.0, "perf/mfu": 0.5})


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
