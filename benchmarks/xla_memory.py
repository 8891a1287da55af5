"""What the memory benchmarks share: lower and compile a jitted program under a mesh, timed, and read XLA's own
per-device memory analysis of the result (bytes by kind, as `Compiled.memory_analysis()` reports them)."""

from __future__ import annotations

import contextlib
import time

import jax


def memory_bytes(compiled, fields: tuple[str, ...]) -> dict:
    """{field: bytes} for each of `fields` ("argument", "output", "alias", "temp", "generated_code")."""
    analysis = compiled.memory_analysis()
    return {f: float(getattr(analysis, f"{f}_size_in_bytes")) for f in fields}


def compile_measured(fn, fn_args: tuple, fields: tuple[str, ...], mesh=None) -> tuple[object, dict]:
    """Lower `fn` (a jax.jit function) for `fn_args` (abstract or concrete) under `mesh`, compile it, and return
    (compiled, memory_bytes + lower_s + compile_s)."""
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        lowered = fn.lower(*fn_args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return compiled, dict(memory_bytes(compiled, fields), lower_s=t1 - t0, compile_s=t2 - t1)
