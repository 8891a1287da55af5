"""`vital_jax.host_memory`: glibc stops serving large blocks with mmap once `keep_freed_memory` ran, and the
commands' environment switch applies it only when asked. Observed through glibc's own counter of mmap'ed chunks
(`mallinfo2().hblks`)."""

from __future__ import annotations

import ctypes
import inspect

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


@pytest.mark.parametrize("value", [None, "default"])
def test_the_environment_switch_is_off_unless_asked(monkeypatch, restored, value):
    if value is None:
        monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(host_memory.ENV_VAR, value)
    assert host_memory.apply_environment() is None
    assert _mmapped_chunks_while_holding_a_big_block() == 1


def test_the_commands_hook_applies_it_when_asked_and_rejects_unknown_values(monkeypatch, restored, capsys):
    """`cli.tune_host_memory` (called by `cli.begin` and by evaluate/explain) is what the commands run."""
    from vital_jax import evaluate, explain

    monkeypatch.setenv(host_memory.ENV_VAR, "keep")
    cli.tune_host_memory()
    assert "freed memory kept" in capsys.readouterr().err
    assert _mmapped_chunks_while_holding_a_big_block() == 0
    for fn in (cli.begin, evaluate.main, explain.main):
        assert "tune_host_memory()" in inspect.getsource(fn), fn
    monkeypatch.setenv(host_memory.ENV_VAR, "tcmalloc")
    with pytest.raises(SystemExit) as exit_info:
        cli.tune_host_memory()
    assert exit_info.value.code == 2
    assert f"{host_memory.ENV_VAR} must be 'keep' or 'default', got 'tcmalloc'" in capsys.readouterr().err
