"""`vital_jax.host_memory`: glibc stops serving large blocks with mmap once `keep_freed_memory` ran, and the
commands apply it unless switched off. Observed through glibc's own counter of mmap'ed chunks
(`mallinfo2().hblks`), and for a jitted program's buffers through the page faults of its calls."""

from __future__ import annotations

import ctypes
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

from vital_jax import cli, host_memory

BIG = 96 << 20  # far above glibc's largest mmap threshold (32 MiB)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_chunks_while_holding_a_big_block() -> int:
    """glibc's count of live mmap'ed chunks while one freshly allocated BIG-byte numpy buffer is alive, minus the
    count before it (1 if the block was mmap'ed, 0 if it came from the heap)."""
    libc = host_memory._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = _Mallinfo2
    before = libc.mallinfo2().hblks
    block = np.empty(BIG, np.uint8)
    block[::4096] = 1  # touch it, so nothing is lazily deferred
    during = libc.mallinfo2().hblks
    del block
    return during - before


@pytest.fixture
def restored():
    host_memory.restore_defaults()
    yield
    host_memory.restore_defaults()


def test_keep_freed_memory_serves_large_blocks_from_the_heap(restored):
    assert _mmapped_chunks_while_holding_a_big_block() == 1  # glibc's default: a big block is its own mapping
    line = host_memory.keep_freed_memory()
    assert "kept" in line, line
    assert _mmapped_chunks_while_holding_a_big_block() == 0
    assert host_memory.keep_freed_memory() == line  # idempotent
    host_memory.restore_defaults()
    assert _mmapped_chunks_while_holding_a_big_block() == 1


def test_the_environment_switch_off_leaves_glibc_alone(monkeypatch, restored):
    monkeypatch.setenv(host_memory.ENV_VAR, "off")
    assert host_memory.apply_environment() is None
    assert _mmapped_chunks_while_holding_a_big_block() == 1


@pytest.mark.parametrize("value", [None, "keep"])
def test_the_commands_hook_applies_it_by_default_and_rejects_unknown_values(monkeypatch, restored, capsys, value):
    """`cli.tune_host_memory` (called by `cli.begin` and by evaluate/explain) is what the commands run."""
    from vital_jax import evaluate, explain
    from vital_jax.data import build, roi, roi_grid_search

    if value is None:
        monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(host_memory.ENV_VAR, value)
    # This worker's JAX backend may be running already; the child processes of the page-fault test below apply
    # the dispatch setting for real.
    monkeypatch.setattr(host_memory, "dispatch_synchronously", lambda: "CPU dispatch: synchronous")
    cli.tune_host_memory()
    assert capsys.readouterr().err == ""  # silent: the commands' stderr carries their one-line errors
    assert _mmapped_chunks_while_holding_a_big_block() == 0
    for fn in (cli.begin, evaluate.main, explain.main, build.main, roi.main, roi_grid_search.main):
        assert "tune_host_memory()" in inspect.getsource(fn), fn
    monkeypatch.setenv(host_memory.ENV_VAR, "tcmalloc")
    with pytest.raises(SystemExit) as exit_info:
        cli.tune_host_memory()
    assert exit_info.value.code == 2
    assert f"{host_memory.ENV_VAR} must be 'keep' (the default) or 'off', got 'tcmalloc'" in capsys.readouterr().err


# A child process: the commands' hook, then a jitted program whose 96 MiB intermediate (h) is written by one op and
# read by the next, called until steady; prints its calls' minor page faults per call and h's page count.
_FAULTS_PROGRAM = """
import resource
from vital_jax import cli
cli.tune_host_memory()
import jax, jax.numpy as jnp
rows, width = 4096, 6144
f = jax.jit(lambda x, w, w2: (jnp.tanh(x @ w) @ w2).sum())
args = jnp.ones((rows, 16)), jnp.full((16, width), 1e-3), jnp.ones((width, 4))
for _ in range(3):
    f(*args).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(*args).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3, rows * width * 4 // 4096)
"""


def _faults_per_call(setting: str | None) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_VAR}
    if setting is not None:
        env[host_memory.ENV_VAR] = setting
    res = subprocess.run([sys.executable, "-c", _FAULTS_PROGRAM], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    faults, pages = res.stdout.split()[-2:]
    return float(faults), int(pages)


def test_kept_memory_and_synchronous_dispatch_stop_a_programs_page_faults_per_call():
    """With glibc's defaults each call maps its large buffers afresh and faults in every page; with the setting
    the calling thread reuses its heap (XLA:CPU would allocate them on a worker thread under asynchronous dispatch,
    where glibc maps large blocks whatever M_MMAP_MAX says) and the steady state faults in nothing."""
    if host_memory._glibc() is None:
        pytest.skip("needs glibc")
    faults, pages = _faults_per_call("off")
    assert faults >= 0.9 * pages, (faults, pages)
    faults, pages = _faults_per_call(None)  # the commands' default
    assert faults < 0.01 * pages, (faults, pages)


def test_synchronous_dispatch_refuses_once_the_backend_runs():
    """Set after JAX's CPU client exists, the setting would change nothing: an error says when to apply it."""
    import jax
    import jax.numpy as jnp

    jnp.ones(2).block_until_ready()  # the backend is up in this process
    if not jax.config.values["jax_cpu_enable_async_dispatch"]:
        pytest.skip("this process already dispatches synchronously")
    with pytest.raises(host_memory.HostMallocError, match="before JAX's backend starts"):
        host_memory.dispatch_synchronously()
    assert jax.config.values["jax_cpu_enable_async_dispatch"]
