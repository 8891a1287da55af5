"""benchmarks/xla_collectives: the bytes a compiled program's collectives move per device, once per call and per
iteration of each loop of unknown length. Run in a subprocess: the 4 CPU devices must be set before jax starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _run(program: str, *args: str) -> dict:
    """The JSON line a program prints, run in its own process (its device count is set before jax starts)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", program, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


PROGRAM = r"""
import json, os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from benchmarks.xla_collectives import collective_bytes

mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
split, whole = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P())

def program(w, x, layers):
    # A decode-like loop of unknown length whose carried weight stays split: gathered whole at every iteration.
    def cond(c):
        i, w, x = c
        return (i < 5) & (jnp.max(x) < 1e30)
    def body(c):
        i, w, x = c
        full = jax.lax.with_sharding_constraint(w, whole)
        return i + 1, jax.lax.with_sharding_constraint(w * 1.5, split), jnp.tanh(x @ full)
    _, w, x = jax.lax.while_loop(cond, body, (0, w, x))
    # A scan of 3 known iterations, each gathering one (16, 32) layer: counted 3 times, per call.
    def layer(x, wi):
        return jnp.tanh(x @ jax.lax.with_sharding_constraint(wi, whole)), None
    return jax.lax.scan(layer, x, layers)[0], w

w = jax.device_put(jnp.ones((32, 32), jnp.float32), split)
layers = jax.device_put(jnp.ones((3, 32, 32), jnp.bfloat16), NamedSharding(mesh, P(None, "fsdp", None)))
x = jax.device_put(jnp.ones((8, 32), jnp.float32), whole)
with jax.set_mesh(mesh):
    compiled = jax.jit(program, out_shardings=(whole, split)).lower(w, x, layers.astype(jnp.float32)).compile()
moved = collective_bytes(compiled.as_text())
print(json.dumps({"program": dict(moved["program"]), "loops": [dict(c) for c in moved["loops"].values()]}))
"""


def test_collectives_are_counted_per_call_and_per_iteration_of_an_unbounded_loop():
    out = _run(PROGRAM)
    # The while loop: one (32, 32) float32 weight gathered per iteration, nothing else.
    assert out["loops"] == [{"all-gather": 32 * 32 * 4}], out
    # Per call: the scan's three (32, 32) float32 layers.
    assert out["program"].get("all-gather") == 3 * 32 * 32 * 4, out


# Loop-invariant code motion off, as medsynapse_8b compiles (benchmarks/memory_8b.py says why): whether XLA hoists
# a loop-invariant gather itself is its own heuristic (it weighs the buffer's growth), which this must not rely on.
HEAD_PROGRAM = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
                           " --xla_disable_hlo_passes=while-loop-invariant-code-motion")
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from benchmarks.xla_collectives import collective_bytes
from vital_jax import sharding

mesh = sharding.make_mesh((1, 4, 1))
gather_first = sys.argv[1] == "gathered"

def program(params, x):
    if gather_first:
        params = sharding.gathered_before_loop(params, ("lm_head",), "kernel")
    def cond(c):
        i, x = c
        return (i < 5) & (jnp.max(x) < 1e30)
    def body(c):   # a token step: the head read through its layer's constraint, as `Linear` does
        i, x = c
        kernel = sharding.constrain_weight(params["lm_head"]["kernel"], ("lm_head",), "kernel")
        return i + 1, jnp.tanh(x @ kernel @ kernel.T)
    return jax.lax.while_loop(cond, body, (0, x))[1]

kernel = jax.device_put(jnp.ones((64, 256), jnp.float32), NamedSharding(mesh, P("fsdp", None)))
x = jax.device_put(jnp.ones((8, 64), jnp.float32), NamedSharding(mesh, P()))
with jax.set_mesh(mesh):
    compiled = jax.jit(program).lower({"lm_head": {"kernel": kernel}}, x).compile()
moved = collective_bytes(compiled.as_text())
print(json.dumps({"program": dict(moved["program"]), "loops": [dict(c) for c in moved["loops"].values()]}))
"""


def test_a_head_gathered_before_the_loop_is_gathered_once_not_at_every_iteration():
    """`sharding.gathered_before_loop` (the output heads of `cached.decode` and `interpret.decode_latents`)."""
    out = {mode: _run(HEAD_PROGRAM, mode) for mode in ("gathered", "as_held")}
    head_bytes = 64 * 256 * 4
    assert out["as_held"]["loops"][0].get("all-gather", 0) >= head_bytes, out   # the check below can fail
    assert out["gathered"]["loops"][0].get("all-gather", 0) == 0, out
    assert out["gathered"]["program"].get("all-gather", 0) >= head_bytes, out
