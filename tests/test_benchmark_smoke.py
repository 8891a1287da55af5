"""CI smoke test of the benchmarks (MedSynapse-V's, the train-step profile, the two peer comparisons and their
floors, the host allocator comparison, the model-level latencies against transformers, the latent overhead, the
data side, the vision tower's slices): the `--quick` variant of each runs to its final report line.

Each runs in a subprocess: `medsynapse_8b` must set the CPU device count before jax is imported, and a benchmark's
timings should not share a process with the test session. The subprocesses inherit the session's XLA flags and
compilation cache (tests/conftest.py): they compile with tests/fast_compile.py's flags (XLA CPU level 0, the older
fusion emitters). Only the printed lines are checked, not the numbers (a busy CI machine).
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"[0-9]+(\.[0-9]+)?"


def run_quick(name: str, *extra: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", *extra], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{name} --quick failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res.stdout.strip().splitlines()


def test_medsynapse_latency_quick_prints_the_table_and_ratios_against_the_backbone():
    lines = run_quick("medsynapse_latency")
    for program in ("backbone", "teacher", "deployed", "vital K=4"):
        assert any(re.match(rf"{program} +{NUMBER} +{NUMBER} ", line) for line in lines), (program, lines)
    ratio = rf"latency {NUMBER}x \(of the minima {NUMBER}x\), peak memory {NUMBER}x$"
    assert [line.split(":")[0] for line in lines[-3:]] == [
        "ratio teacher / backbone", "ratio deployed / backbone", "ratio vital K=4 / backbone"], lines
    assert all(re.search(ratio, line) for line in lines[-3:]), lines[-3:]


def test_grpo_throughput_quick_prints_both_rates_and_the_ratio():
    """In the 8B recipe's layout (scanned text layers, LoRA), with the rollout decoded as held and the rollout with
    a prompt cache copy per completion beside it."""
    lines = run_quick("grpo_throughput", "--scan_layers", "--lora_rank", "4", "--compare_relayout",
                      "--compare_prompt_copies")
    assert "text layers scanned" in lines[-6], lines
    assert re.search(rf"grpo.rollout .* -> +{NUMBER} tokens/s$", lines[-5]), lines
    assert re.search(rf"no relayout\): .* -> +{NUMBER} tokens/s \({NUMBER}x the relaid-out time\)$", lines[-4]), lines
    assert re.search(rf"copy per completion: .* \({NUMBER}x the shared-prompt time\); XLA temporaries {NUMBER} MiB "
                     rf"shared, {NUMBER} MiB copied \({NUMBER}x\)$", lines[-3]), lines
    assert re.search(rf"transformers generate: .* -> +{NUMBER} tokens/s$", lines[-2]), lines
    assert re.fullmatch(rf"ratio vital_jax / transformers: {NUMBER}x tokens/s", lines[-1]), lines


def test_medsynapse_8b_quick_compiles_every_stage_and_every_leaf_has_a_sharding_rule():
    lines = run_quick("medsynapse_8b")
    summary = lines.index("summary, per device at 2 layers:")
    for stage, line in zip(("stage1", "stage2", "stage2_rollout", "stage3"), lines[summary + 1:]):
        assert re.fullmatch(rf"  {stage}: peak {NUMBER} (MiB|GiB) \(.*\), lower \+ compile {NUMBER}s", line), line
    assert len(lines) == summary + 5, lines[summary:]
    checks = [line for line in lines if re.match(r"  stage[123] (trainable state|frozen) ", line)]
    assert len(checks) == 8 and all("every parameter has a rule" in line for line in checks), checks
    # Under FSDP (the default mesh) the rollouts decode in the layout held (`rollout_relayout` unset): every
    # decode step gathers the layers' weights again.
    per_step = [float(x) for x in re.findall(r"per decode step \((\d+) bytes\)", "\n".join(lines))]
    assert len(per_step) == 2 and all(x > 100 * 1024 for x in per_step), lines


def test_medsynapse_8b_relaid_out_rollouts_move_nothing_per_decode_step():
    """Relaid out, the text layers and the output head (`cached.output_head_gathered`) are gathered once per call:
    what the Stage II and III decode loops still move is the step's token ids and stop flags (bytes, not weights;
    laid out as held, hundreds of KiB even at these sizes, above)."""
    lines = run_quick("medsynapse_8b", "--stages=stage2_rollout,stage3", "--rollout_relayout=true")
    per_step = re.findall(r"per decode step \((\d+) bytes\), ([\d.]+) (?:MiB|GiB) once per call", "\n".join(lines))
    assert len(per_step) == 2 and all(int(n) < 1024 and float(once) > 0 for n, once in per_step), lines


def test_profile_train_step_quick_attributes_the_step_to_model_parts():
    lines = run_quick("profile_train_step")
    header = next(i for i, line in enumerate(lines) if line.startswith("part "))
    rows = lines[header + 1:-1]
    parts = {re.split(r"\s{2,}", row)[0] for row in rows}
    # A VITAL step with LoRA dropout and both auxiliary terms: each of these parts executes ops.
    for part in ("vision tower", "auxiliary decoder", "LoRA dropout (RNG + mask)", "MLP",
                 "optimizer (AdamW, clipping)"):
        assert part in parts, (part, rows)
    shares = [float(row.split()[-1].rstrip("%")) for row in rows]
    assert abs(sum(shares) - 100.0) < 1.0, rows
    assert re.fullmatch(rf"summed op time {NUMBER} ms per step; wall {NUMBER} ms per step \(ratio {NUMBER}\)",
                        lines[-1]), lines[-1]


def test_peer_inference_quick_checks_both_sides_answer_alike_and_prints_the_ratios():
    """The script exits non-zero when vital_jax's first answer tokens differ from transformers' (same weights)."""
    lines = run_quick("peer_inference")
    assert any(re.search(r"\d+ CPUs, (AVX-512|AVX2|no AVX2)", line) for line in lines), lines
    for k in (0, 4):
        assert any(re.match(rf"K={k}: vital_jax +{NUMBER} ms \(compile {NUMBER} s\) +transformers +{NUMBER} ms +"
                            rf"ratio {NUMBER}x$", line) for line in lines), (k, lines)
    assert re.fullmatch(rf"latent overhead K=4 / K=0: vital_jax {NUMBER}, transformers {NUMBER}", lines[-2]), lines
    assert re.fullmatch(rf"ratio at K=4 \(transformers / vital_jax\): {NUMBER}x", lines[-1]), lines


def test_inference_floor_quick_times_each_phase_against_this_machines_limits():
    """Also exits non-zero when vital_jax's first answer tokens differ from transformers'."""
    lines = run_quick("inference_floor")
    assert re.fullmatch(rf"this machine: matmul {NUMBER} GFLOP/s, weight streaming {NUMBER} GB/s; .*", lines[1]), lines
    for phase in ("vision tower", "prefix \\(vision \\+ prefill\\)", "4 latent steps", "4 answer tokens",
                  "whole program"):
        assert any(re.match(rf"{phase} +{NUMBER} +{NUMBER} ", line) for line in lines), (phase, lines)
    assert re.fullmatch(rf"most any implementation could reach here \(transformers / floor\): {NUMBER}x",
                        lines[-1]), lines


def test_train_floor_quick_counts_the_steps_work_and_prints_the_ceiling():
    lines = run_quick("train_floor")
    assert re.fullmatch(rf"work per step: model {NUMBER} GFLOP \(vital.accounting\), XLA's dots {NUMBER} GFLOP "
                        rf"\({NUMBER}x\)", lines[-4]), lines
    assert re.match(rf"vital_jax {NUMBER} ms/step .* transformers \+ peft {NUMBER} ms/step .* floor {NUMBER} ms$",
                    lines[-3]), lines
    assert re.fullmatch(rf"ratio today \(transformers / vital_jax\): {NUMBER}x", lines[-2]), lines
    assert re.fullmatch(rf"most any implementation could reach here \(transformers / floor\): {NUMBER}x",
                        lines[-1]), lines


def test_peer_train_step_quick_trains_both_sides_with_peft_adapters_and_prints_the_ratio():
    lines = run_quick("peer_train_step")
    assert any("LoRA: peft" in line for line in lines), lines
    # The header names the CPU: the ratio moves with the machine kind (benchmarks.machine).
    assert any(re.search(r"\d+ CPUs, (AVX-512|AVX2|no AVX2)", line) for line in lines), lines
    assert re.match(rf"jax +train step: first call \(compile\) {NUMBER}s, then {NUMBER} ms/step", lines[-3]), lines
    assert re.match(rf"torch train step: first call {NUMBER}s, then {NUMBER} ms/step", lines[-2]), lines
    assert re.fullmatch(rf"ratio jax/torch samples/s: {NUMBER}x", lines[-1]), lines


def test_qwen3_latency_quick_checks_both_sides_compute_alike_and_prints_both_ratios():
    """The script exits non-zero when the prefill logits differ by more than 1e-3 (not the same computation)."""
    lines = run_quick("qwen3_latency")
    assert re.search(rf"prefill logits max \|jax - torch\| {NUMBER}e[-+][0-9]+$", lines[-3]), lines
    for i, row in ((-2, "prefill"), (-1, "decode step")):
        assert re.fullmatch(rf"{row} +jax +{NUMBER} ms +torch +{NUMBER} ms +ratio torch/jax +{NUMBER}x",
                            lines[i]), lines


def test_qwen3_vl_latency_quick_checks_both_sides_compute_alike_and_prints_three_ratios():
    """The script exits non-zero when the prefill logits differ by more than 1e-3 (not the same computation)."""
    lines = run_quick("qwen3_vl_latency")
    assert re.search(rf"prefill logits max \|jax - torch\| {NUMBER}e[-+][0-9]+$", lines[-4]), lines
    for i, row in ((-3, "vision"), (-2, "prefill"), (-1, "decode step")):
        assert re.fullmatch(rf"{row} +jax +{NUMBER} ms +torch +{NUMBER} ms +ratio torch/jax +{NUMBER}x",
                            lines[i]), lines


def test_latent_overhead_quick_times_each_k_and_one_latent_step_against_one_decode_step():
    lines = run_quick("latent_overhead")
    for k in (0, 1):
        assert re.fullmatch(rf"K={k}: +{NUMBER} ms +\({NUMBER}x K=0\) +shared K_max program: +{NUMBER} ms",
                            lines[-3 + k]), lines
    assert re.match(rf"latent step {NUMBER} ms vs decode step {NUMBER} ms: ratio {NUMBER}x ", lines[-1]), lines


def test_data_throughput_quick_rates_roi_extraction_and_the_input_pipeline_against_their_references():
    lines = run_quick("data_throughput")
    assert re.fullmatch(rf"ROI extraction +vital_jax +{NUMBER} images/s \| transformers eager reference +{NUMBER} "
                        rf"images/s \| ratio {NUMBER}x", lines[-2]), lines
    assert re.fullmatch(rf"input pipeline +grain \(2 read threads\) +{NUMBER} samples/s \| plain loop +{NUMBER} "
                        rf"samples/s \| ratio {NUMBER}x", lines[-1]), lines


def test_vision_slices_quick_compiles_both_layouts_and_prints_their_ratios():
    lines = run_quick("vision_slices")
    for i, layout in ((-3, r"one packing \(N x N scores\)"), (-2, "2 slices")):
        assert re.fullmatch(rf"  {layout} +temp +{NUMBER} MiB \| +{NUMBER} GFLOP \| compiled in {NUMBER}s",
                            lines[i]), lines
    assert re.fullmatch(rf"ratio one packing / slices: temp {NUMBER}x, FLOPs {NUMBER}x", lines[-1]), lines


def test_train_step_quick_trains_both_sides_with_plain_adapters_and_prints_the_ratio():
    lines = run_quick("train_step")
    assert any("LoRA: plain" in line for line in lines), lines
    assert re.match(rf"jax +train step: first call \(compile\) {NUMBER}s, then {NUMBER} ms/step", lines[-3]), lines
    assert re.match(rf"torch train step: first call {NUMBER}s, then {NUMBER} ms/step", lines[-2]), lines
    assert re.fullmatch(rf"ratio jax/torch samples/s: {NUMBER}x", lines[-1]), lines


def test_host_memory_quick_times_both_allocator_settings_in_their_own_processes():
    lines = run_quick("host_memory")
    assert "one process per setting" in lines[0], lines
    for label in ("vision tower forward", "train step"):
        assert any(re.fullmatch(rf"{label}: off +{NUMBER} ms \(min {NUMBER}\) +kept +{NUMBER} ms \(min "
                                rf"{NUMBER}\) +ratio {NUMBER}x", line) for line in lines), (label, lines)
    assert re.fullmatch(rf"ratio off / kept, train step: {NUMBER}x", lines[-1]), lines


def test_mfu_8b_quick_trains_a_truncated_8b_shaped_step_and_counts_its_flops(tmp_path):
    """The accelerator benchmark of issue #16 at one layer: on CPU its optimized program keeps its dots, so the
    executed-FLOP line (remat included) must appear, and at least the model FLOPs. With --trace_dir it keeps one
    traced step and its program at the folder's top (where the device tool can bring them back)."""
    lines = run_quick("mfu_8b", f"--trace_dir={tmp_path}")
    assert sorted(os.listdir(tmp_path)) == ["step.trace.json.gz", "step_hlo.txt.gz"], os.listdir(tmp_path)
    with gzip.open(tmp_path / "step_hlo.txt.gz", "rt") as f:
        assert "HloModule" in f.read(200)
    assert "trace: no accelerator lanes (/device:...) in this trace: the host ran the step" in lines, lines
    assert re.fullmatch(rf"loss {NUMBER}; step {NUMBER} ms \(median of 1\); {NUMBER} samples/s", lines[-3]), lines
    model = re.fullmatch(rf"model FLOPs/step ({NUMBER}) T -> {NUMBER} TFLOP/s", lines[-2])
    executed = re.fullmatch(rf"executed matmul FLOPs/step ({NUMBER}) T \(({NUMBER})x model, remat included\) -> "
                            rf"{NUMBER} TFLOP/s", lines[-1])
    assert model and executed, lines[-2:]
    assert float(executed.group(3)) >= 1.0, lines[-1]


def test_attention_kernels_quick_compares_the_impls_here_and_names_those_it_cannot_run():
    lines = run_quick("attention_kernels")
    assert any(line.startswith("cudnn: not run here: attention_impl='cudnn'") for line in lines), lines
    for impl in ("xla", "dot_product"):
        row = rf" +{impl} +forward\+backward +{NUMBER} ms \| max \|diff\|.* \| XLA temporaries {NUMBER} MiB$"
        rows = [line for line in lines if re.match(row, line)]
        assert len(rows) == 2, (impl, lines)   # text prefill and vision tower
    assert re.fullmatch(rf"ratio xla / dot_product \(text prefill, forward\+backward\): {NUMBER}x", lines[-1]), lines


def test_latency_8b_quick_times_k0_and_k4_and_their_parts():
    lines = run_quick("latency_8b")
    assert re.fullmatch(rf"prefix \(vision tower \+ prefill\): {NUMBER} ms", lines[-5]), lines
    assert re.fullmatch(rf"one answer token: -?{NUMBER} ms; one latent step: -?{NUMBER} ms", lines[-4]), lines
    for line, k in zip(lines[-3:-1], (0, 4)):
        assert re.fullmatch(rf"K={k}: +{NUMBER} ms +\(compile {NUMBER} s\)", line), lines
    assert re.fullmatch(rf"latent overhead K=4 / K=0: {NUMBER} \(paper, 8B: 353 / 325 = 1.086\)", lines[-1]), lines


def test_device_kernel_ms_sums_only_the_accelerator_lanes():
    from benchmarks.mfu_8b import device_kernel_ms

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "name": "gemm", "dur": 1500.0}, {"ph": "X", "pid": 1, "name": "gemm", "dur": 500.0},
              {"ph": "X", "pid": 1, "name": "loop_fusion", "dur": 250.0},
              {"ph": "X", "pid": 2, "name": "gemm", "dur": 9000.0}, {"ph": "i", "pid": 1, "name": "marker"}]
    by_name, lanes = device_kernel_ms(events)
    assert lanes == 1 and dict(by_name) == {"gemm": 2.0, "loop_fusion": 0.25}
    assert device_kernel_ms(events[1:2] + events[5:6]) == ({}, 0)


def test_a_saved_trace_is_attributed_to_model_parts_through_the_programs_op_names(monkeypatch):
    # Importing the profiler module sets XLA:CPU's per-op trace flag in the environment unless it is there: set it
    # for this test only, so later subprocesses of this worker keep the suite's flags.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true")
    from benchmarks.profile_train_step import attribute_trace

    names = {"fusion.1": "jit(train_step)/jvp(VitalModel.forward)/layers_0/self_attn/q_proj/dot_general",
             "fusion.2": "jit(train_step)/transpose(jvp(VitalModel.forward))/layers_0/mlp/down_proj/dot_general"}
    events = [{"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 4, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 3, "name": "sm90_gemm_a", "dur": 1000.0, "args": {"hlo_op": "fusion.1"}},
              {"ph": "X", "pid": 3, "name": "fusion.2", "dur": 3000.0},  # named by its instruction
              {"ph": "X", "pid": 3, "name": "memcpy", "dur": 500.0},
              {"ph": "X", "pid": 4, "name": "fusion.1", "dur": 9000.0}]  # host lanes are ignored beside a device's
    table, by_op, matched, unmatched = attribute_trace(events, names)
    assert table == {("attention projections", "forward"): 1.0, ("MLP", "backward"): 3.0}
    assert (matched, unmatched) == (4.0, 0.5) and sorted(by_op.values()) == [1.0, 3.0]
