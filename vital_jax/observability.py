"""Training observability: TensorBoard summaries, JSONL metrics, a progress line, throughput and MFU.

The training loop makes one `MetricsLogger.log` call per logged step:

    logger = MetricsLogger(workdir, total_steps=config.steps, flops_per_step=flops, peak_flops=peak)
    for step in range(start, config.steps + 1):
        params, opt_state, metrics = train_step(params, opt_state, batch)
        if step % config.log_every == 0:
            logger.log(step, metrics, samples=global_batch, tokens=global_batch * seq_len)
    logger.close()

which writes `<workdir>/tensorboard/events.out.tfevents.*`, appends to `<workdir>/metrics.jsonl` and draws a
progress bar (or log lines when stderr is not a terminal). Only the primary process writes anything.
Event files are written by tensorboardX (no tensorflow needed); `logger.tensorboard` also takes images and text
(the training probe, vital_jax/probe.py, writes its heatmaps and decoded latent steps there).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Metric values.

def to_python_scalar(value: Any) -> Any:
    """A Python bool/int/float for a numpy or jax scalar (or size-1 array); other JSON-able values unchanged.

    Reading a jax array waits for the computation that produces it, so call this only on logged steps."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "biuf":
        raise TypeError(f"expected a numeric scalar, got {type(value).__name__} with shape {array.shape}")
    return array.reshape(()).item()


def _as_float(tag: str, value: Any) -> float:
    scalar = to_python_scalar(value)
    if isinstance(scalar, str) or scalar is None:
        raise TypeError(f"metric {tag!r}: expected a numeric scalar, got {scalar!r}")
    return float(scalar)


# ---------------------------------------------------------------------------------------------------------------
# Writers.

_WRITER_IDS = itertools.count()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported here rather than at the top (protobuf: a fraction of a second) and
    without torch. tensorboardX's writer module imports torch whenever it is installed, only to accept torch
    tensors (this module passes numpy), so every training process on a machine with torch (tests, HF export
    checks) loaded it for nothing: 1.3-4.6 s of start-up and ~200 MB of memory per process, measured on the
    project's CPU machines. While tensorboardX is first imported, `sys.modules["torch"] = None` makes its
    `import torch` raise the ImportError it catches; torch is left alone when it is loaded already, and
    importable again afterwards."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter:
    """Scalar, image and text summaries in `<logdir>/events.out.tfevents.*`, through tensorboardX's SummaryWriter.

    File names end in `.<pid>.<n>` (as tensorflow's own writer names them), so two writers opened on one logdir
    in the same second, e.g. a run resumed at once, each get their own file instead of truncating the other's.
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._writer = _summary_writer_class()(logdir, filename_suffix=f".{os.getpid()}.{next(_WRITER_IDS)}")

    def _open(self):
        if self._writer is None:
            raise ValueError("TensorBoardWriter is closed")
        return self._writer

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One scalar summary per (tag, value) at `step` (numeric scalars: numpy/jax values are read here)."""
        writer = self._open()
        floats = {str(tag): _as_float(tag, value) for tag, value in values.items()}
        for tag, value in floats.items():
            writer.add_scalar(tag, value, int(step))

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        """An RGB image summary: `rgb` (H, W, 3) uint8, stored as PNG."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise TypeError(f"image {tag!r}: expected (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
        self._open().add_image(tag, rgb, int(step), dataformats="HWC")

    def text(self, step: int, tag: str, markdown: str) -> None:
        """A text summary (rendered as Markdown by TensorBoard; stored under `<tag>/text_summary`)."""
        self._open().add_text(tag, str(markdown), int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlWriter:
    """Appends one JSON object per line, `{"step": ..., "time": ..., **metrics}`, flushed after every line.

    The file is opened in append mode, so a run resumed from a checkpoint continues the same file; `rewind` to
    the checkpoint's step first moves out the records logged after it, so that each step appears once. A line
    left half-written by a crash is terminated before the first new record so it cannot corrupt it. numpy and
    jax scalars become Python numbers; non-finite floats are written as NaN / Infinity (which Python's json and
    pandas read back)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._clock = clock
        self._file: TextIO | None = open(path, "a", encoding="utf-8")
        if self._file.tell() > 0:
            with open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    self._file.write("\n")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends the record for `step` and flushes it to the OS."""
        if self._file is None:
            raise ValueError("JsonlWriter is closed")
        record = {"step": int(step), "time": self._clock()}
        record.update({str(key): to_python_scalar(value) for key, value in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def rewind(self, step: int, where: Mapping[str, Any] | None = None) -> int:
        """Resuming from a checkpoint at `step`: move the records after it (among those whose fields equal
        `where`, e.g. one pretraining stage) and any half-written lines out of the file, into
        `<name>.rewound.jsonl` beside it (appended: nothing is lost). The file is rewritten atomically. Returns
        how many lines were moved."""
        if self._file is None:
            raise ValueError("JsonlWriter is closed")
        self._file.close()
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        keep, moved = [], []
        for line in (line if line.endswith("\n") else line + "\n" for line in lines if line.strip()):
            try:
                record = json.loads(line)
            except ValueError:
                moved.append(line)
                continue
            rewound = (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
                       and all(record.get(k) == v for k, v in (where or {}).items()))
            (moved if rewound else keep).append(line)
        if moved:
            root, ext = os.path.splitext(self.path)
            with open(f"{root}.rewound{ext}", "a", encoding="utf-8") as f:
                f.writelines(moved)
                f.flush()
                os.fsync(f.fileno())
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        return len(moved)

    def last(self, where: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The metrics of the last record whose fields equal `where` (without its "step" and "time"); {} when
        there is none. A rerun of a finished stage logs nothing, and reports what its last run logged."""
        if self._file is None:
            raise ValueError("JsonlWriter is closed")
        self._file.flush()
        found: dict[str, Any] = {}
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:   # a line half-written by a crash
                    continue
                if isinstance(record, dict) and all(record.get(k) == v for k, v in (where or {}).items()):
                    found = record
        return {k: v for k, v in found.items() if k not in ("step", "time")}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Progress.

def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class ProgressReporter:
    """Training progress: a bar redrawn in place on a terminal, plain log lines elsewhere (files, CI logs).

    On a stream whose `isatty()` is true every `update` redraws one line (carriage return, no newline) showing
    step/total, loss, samples/s and ETA. Otherwise a full line is written when at least `every` steps have passed
    since the last one, and at the final step. The ETA extrapolates the mean time per step since the first
    `update`, so a resumed run's ETA covers only the steps still to go.
    """

    BAR_WIDTH = 24

    def __init__(self, total_steps: int, desc: str = "train", stream: TextIO | None = None, every: int = 100,
                 *, clock: Callable[[], float] = time.perf_counter, unit: str = "step"):
        if total_steps <= 0 or every <= 0:
            raise ValueError(f"total_steps and every must be positive, got {total_steps} and {every}")
        self.total_steps, self.desc, self.every = total_steps, desc, every
        self.unit = unit  # what is counted, in the plain-line form ("step 5/10", "question 5/10")
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self._clock = clock
        self._first: tuple[int, float] | None = None
        self._last_printed_step: int | None = None
        self._line_width = 0

    def eta_seconds(self, step: int) -> float | None:
        """Seconds to `total_steps` at the mean pace since the first update; None before two updates."""
        if self._first is None or step <= self._first[0]:
            return None
        first_step, first_time = self._first
        per_step = (self._clock() - first_time) / (step - first_step)
        return max(self.total_steps - step, 0) * per_step

    def _describe(self, step: int, loss: float | None, samples_per_sec: float | None) -> list[str]:
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if samples_per_sec is not None:
            parts.append(f"{samples_per_sec:.1f} samples/s")
        eta = self.eta_seconds(step)
        parts.append(f"ETA {_format_duration(eta)}" if eta is not None else "ETA --:--")
        return parts

    def update(self, step: int, loss: Any = None, samples_per_sec: float | None = None) -> None:
        """Reports that `step` (1-based, out of total_steps) is done."""
        if self._first is None:
            self._first = (step, self._clock())
        loss = None if loss is None else _as_float("loss", loss)
        fraction = min(max(step / self.total_steps, 0.0), 1.0)
        details = self._describe(step, loss, samples_per_sec)
        if self.interactive:
            filled = int(fraction * self.BAR_WIDTH)
            bar = "#" * filled + "." * (self.BAR_WIDTH - filled)
            line = f"{self.desc} [{bar}] {step}/{self.total_steps} {fraction:4.0%} | " + " | ".join(details)
            # Pad over the remains of a longer previous line; `\r` alone would leave them visible.
            self.stream.write("\r" + line.ljust(self._line_width))
            self._line_width = len(line)
        else:
            due = (self._last_printed_step is None or step - self._last_printed_step >= self.every
                   or step >= self.total_steps)
            if not due:
                return
            self._last_printed_step = step
            self.stream.write(f"{self.desc} {self.unit} {step}/{self.total_steps} ({fraction:.1%}) "
                              + " ".join(details) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the in-place line on a terminal so later output starts on a fresh line."""
        if self.interactive and self._line_width:
            self.stream.write("\n")
            self.stream.flush()
            self._line_width = 0


# ---------------------------------------------------------------------------------------------------------------
# Throughput and MFU.

# Dense bf16 peak FLOP/s per chip, by a substring of `jax.Device.device_kind` (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("B200", 2250e12),
                   ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
                   ("TPU v5", 459e12), ("TPU v6", 918e12))


def peak_flops_per_device(device_kind: str) -> float | None:
    """The dense bf16 peak of one device of this kind, or None when unknown (CPUs, unlisted chips)."""
    return next((peak for name, peak in PEAK_BF16_FLOPS if name.lower() in device_kind.lower()), None)


def estimate_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> int:
    """Training FLOPs per token of a decoder transformer: 6·N + 12·L·H·S (Kaplan et al. 2020; PaLM App. B).

    6·N: every parameter takes part in one multiply-add (2 FLOPs) per token in the forward pass, and the backward
    pass costs twice the forward (gradients with respect to activations and to weights): 2 + 4 = 6.
    12·L·H·S: attention scores (Q·Kᵀ) and the weighted sum of values (A·V) are parameter-free matmuls of
    2·S·H FLOPs each per token and layer in the forward pass (H = hidden size, S = sequence length), again
    tripled for training: 3 · 2 · 2·S·H = 12·S·H per layer. Causal masking is not discounted (PaLM's
    convention), and embedding-lookup FLOPs are not subtracted from N.
    Multiply by the tokens in a global batch for `MetricsLogger(flops_per_step=...)`.
    """
    for name, value in (("num_params", num_params), ("num_layers", num_layers), ("hidden", hidden),
                        ("seq_len", seq_len)):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    return 6 * int(num_params) + 12 * int(num_layers) * int(hidden) * int(seq_len)


class MetricsLogger:
    """TensorBoard + JSONL + progress for a training run; only the primary process writes anything.

    Files: `<workdir>/tensorboard/events.out.tfevents.*` and `<workdir>/metrics.jsonl` (appended across resumes).
    `is_primary` defaults to `jax.process_index() == 0`; on other processes `log` still computes and returns the
    throughput metrics but creates no directory, file or output.

    Throughput is measured over the wall time between consecutive `log` calls, so the first call (which usually
    includes compilation) only starts the clock. Call `reset_timer` after a pause that is not training
    (evaluation, a synchronous checkpoint) so it is not counted. `samples` and `tokens` are per training step
    for the global batch (all processes); calls may be several steps apart. Reported (under `perf/`):

        steps_per_sec   = (step - previous_step) / elapsed
        samples_per_sec = samples · steps_per_sec,   tokens_per_sec = tokens · steps_per_sec
        mfu             = achieved FLOP/s / peak FLOP/s = flops_per_step · steps_per_sec / peak_flops

    `flops_per_step` is the model FLOPs of one global step (e.g. `estimate_flops_per_token(...) · tokens`);
    `peak_flops` is the aggregate peak of all devices running the step (per-chip dense peak for the training
    dtype × `jax.device_count()`). Model FLOPs exclude rematerialisation, so MFU does not reward recomputation.
    """

    def __init__(self, workdir: str, total_steps: int, is_primary: bool | None = None, *, desc: str = "train",
                 flops_per_step: float | None = None, peak_flops: float | None = None,
                 stream: TextIO | None = None, progress_every: int = 100, tensorboard: bool = True,
                 jsonl: bool = True, progress: bool = True, clock: Callable[[], float] = time.perf_counter):
        if is_primary is None:
            import jax
            is_primary = jax.process_index() == 0
        if flops_per_step is not None and peak_flops is None:
            # (peak_flops alone is fine: the FLOPs then come with each `log` call.)
            raise ValueError("MFU needs both flops_per_step and peak_flops")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive, got {peak_flops}")
        self.is_primary = is_primary
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self._clock = clock
        self._last: tuple[int, float] | None = None
        self.tensorboard = self.jsonl = self.progress = None
        if is_primary:
            if tensorboard:
                self.tensorboard = TensorBoardWriter(os.path.join(workdir, "tensorboard"))
            if jsonl:
                self.jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
            if progress:
                self.progress = ProgressReporter(total_steps, desc, stream, every=progress_every, clock=clock)

    def reset_timer(self, step: int) -> None:
        """Restarts throughput measurement at `step` (after evaluation, checkpointing or another pause)."""
        self._last = (step, self._clock())

    def throughput(self, step: int, samples: int | None = None, tokens: int | None = None,
                   flops: float | None = None) -> dict[str, float]:
        """The `perf/` metrics since the previous call (empty on the first call), and restarts the clock.

        flops: model FLOPs per step of the steps since the previous call, when they vary (prompt buckets);
        overrides the constructor's `flops_per_step`. MFU needs `peak_flops`."""
        now = self._clock()
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        steps_per_sec = (step - last[0]) / (now - last[1])
        out = {"perf/steps_per_sec": steps_per_sec}
        if samples is not None:
            out["perf/samples_per_sec"] = samples * steps_per_sec
        if tokens is not None:
            out["perf/tokens_per_sec"] = tokens * steps_per_sec
        flops = self.flops_per_step if flops is None else flops
        if flops is not None and self.peak_flops is not None:
            out["perf/mfu"] = flops * steps_per_sec / self.peak_flops
        return out

    def log(self, step: int, metrics: Mapping[str, Any], samples: int | None = None,
            tokens: int | None = None, flops: float | None = None) -> dict[str, float]:
        """Records `metrics` (scalars; numpy/jax values are read here) at `step`; returns the `perf/` metrics.

        Non-numeric values (strings) go to the JSONL file only. `flops`: see `throughput`."""
        perf = self.throughput(step, samples, tokens, flops)
        if not self.is_primary:
            return perf
        values = {**{key: to_python_scalar(value) for key, value in metrics.items()}, **perf}
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, {k: v for k, v in values.items() if isinstance(v, (bool, int, float))})
            self.tensorboard.flush()
        if self.jsonl is not None:
            self.jsonl.write(step, values)
        if self.progress is not None:
            self.progress.update(step, values.get("loss"), perf.get("perf/samples_per_sec"))
        return perf

    def close(self) -> None:
        for part in (self.progress, self.tensorboard, self.jsonl):
            if part is not None:
                part.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
