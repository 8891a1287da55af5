"""What `vital_jax.host_memory` (the commands' default on CPU) saves: the same jitted programs, timed in two fresh
processes, one with `VITAL_JAX_HOST_MALLOC=off` (glibc's malloc and JAX's asynchronous CPU dispatch untouched) and
one with freed memory kept and synchronous dispatch (a process's allocator history cannot be undone, and the
dispatch mode is fixed when JAX's backend starts, so the two settings cannot alternate in one process).

    python -m benchmarks.host_memory [--rounds 7 --quick]

Programs, at issue #16's peer sizes (`benchmarks.peer_train_step.PEER`: random Qwen3-VL text 512 x 8 layers,
vision 256 x 4, LoRA r64 on the 7 projections, Qwen3 decoder 256 x 4): the vision tower's forward on one
448 x 448 image (784 patches), and the full VITAL train step (batch 2, K = 4, AdamW); medians of `--rounds` calls
after compilation. The last line is the train step's ratio (off ms / kept ms).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import apply_host_setting
from benchmarks.peer_train_step import PEER
from benchmarks.train_step import QUICK, build_hf, jax_step, synthetic
from vital_jax import host_memory
from vital_jax.models.qwen3_vl import Qwen3VLConfig, load_params
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from vital_jax.models.qwen3_vl.vision import vision_inputs

SETTINGS = ("off", "kept")
RESULT = "result: "


def medians(run, rounds: int) -> tuple[float, float]:
    """(median, min) ms of `rounds` calls of `run()`."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.min(times))


def measure(sizes, rounds: int) -> dict:
    """This process's timings: {"vision": (median, min), "train_step": (median, min)} in ms."""
    with tempfile.TemporaryDirectory() as path:
        hf_backbone, _ = build_hf(path, sizes)
        vis = hf_backbone.config.vision_config
        patch_dim = vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2
        config = Qwen3VLConfig.from_pretrained(f"{path}/backbone")
        params = load_params(f"{path}/backbone", config)
        model = Qwen3VLForConditionalGeneration(config)
        inputs = jax.device_put(vision_inputs([sizes.grid], config.vision))
        patches = jnp.asarray(np.random.default_rng(0).standard_normal((int(np.prod(sizes.grid)), patch_dim)),
                              jnp.float32)
        encode = jax.jit(lambda p_, x, v: model.apply({"params": p_}, x, v, method=model.encode_images))
        step, _ = jax_step(path, synthetic(patch_dim, sizes=sizes), sizes)
    run_encode = lambda: jax.block_until_ready(encode(params, patches, inputs))  # noqa: E731
    run_encode(), run_encode()  # compile, warm up
    vision = medians(run_encode, rounds)
    step(), step()
    return {"vision": vision, "train_step": medians(step, rounds)}


def child(setting: str, quick: bool, rounds: int) -> dict:
    """Run `--setting` in a fresh process (glibc and JAX untouched for "off") -> its `measure` dict."""
    env = dict(os.environ, **{host_memory.ENV_VAR: "keep" if setting == "kept" else "off"})
    cmd = [sys.executable, "-m", "benchmarks.host_memory", "--setting", setting, "--rounds", str(rounds)]
    res = subprocess.run(cmd + (["--quick"] if quick else []), env=env, capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith(RESULT)]
    if res.returncode != 0 or len(lines) != 1:
        raise SystemExit(f"the {setting!r} process failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[0][len(RESULT):])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 round, for the CI smoke test")
    p.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # the child processes
    args = p.parse_args(argv)
    sizes, rounds = (QUICK, 1) if args.quick else (PEER, args.rounds)
    if args.setting:
        # The parent set the environment for this setting, as a user would for a command (before JAX's backend
        # starts: the dispatch mode is fixed then).
        print(apply_host_setting(), file=sys.stderr)
        print(RESULT + json.dumps(measure(sizes, rounds)), flush=True)
        return
    if jax.default_backend() != "cpu":
        raise SystemExit(f"this benchmark measures the CPU backend; JAX's is {jax.default_backend()}")

    print(f"jax {jax.__version__} on cpu; vision {sizes.vision_hidden} x {sizes.vision_depth}, image patches "
          f"{sizes.grid}; text {sizes.text_hidden} x {sizes.text_layers}, LoRA r{sizes.lora_rank}; train step "
          f"batch {sizes.batch}, K {sizes.latent_steps}; medians of {rounds} calls, one process per setting")
    results = {setting: child(setting, args.quick, rounds) for setting in SETTINGS}
    for name, label in (("vision", "vision tower forward"), ("train_step", "train step")):
        (d_med, d_min), (k_med, k_min) = results["off"][name], results["kept"][name]
        print(f"{label}: off {d_med:8.1f} ms (min {d_min:.1f})   kept {k_med:8.1f} ms (min {k_min:.1f})   "
              f"ratio {d_med / k_med:.2f}x")
    ratio = results["off"]["train_step"][0] / results["kept"]["train_step"][0]
    print(f"ratio off / kept, train step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
