"""Host memory for XLA:CPU: make glibc's malloc keep freed memory instead of giving it back to the kernel, and
dispatch each CPU computation on the calling thread, so that a program's buffers are not faulted in afresh on every
call. On by default in the commands; `VITAL_JAX_HOST_MALLOC=off` leaves glibc and JAX as they are.

Why: a jitted program on the CPU backend allocates its activations and temporaries from host memory on every
call. glibc serves each allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh
`mmap` and returns it with `munmap` when freed, so every page of a large buffer is faulted in and zeroed by the
kernel on every call: `jnp.exp` over 16 x 784 x 784 float32 took 19 ms with glibc's defaults and 2.6 ms with
freed memory kept, torch's `exp` 20 -> 5 ms. The largest such buffer is a program's temporaries, which XLA:CPU
allocates as one block per call (393 MB for issue #16's peer train step: 97,000 page faults, ~200 ms of the
kernel's CPU time per step) on the thread that dispatches the call. Under JAX's default asynchronous CPU dispatch
that is a worker thread, whose glibc arena maps every block above 64 MiB whatever M_MMAP_MAX says; dispatched
synchronously, the Python thread allocates it from the main arena, where the settings below hold.

`keep_freed_memory()` sets, for the rest of the process: no mmap'ed chunks (`M_MMAP_MAX = 0`: large blocks come
from the heap like small ones) and a trim threshold of 1 GiB (`M_TRIM_THRESHOLD`: free memory at the top of the
heap is returned only beyond that). `dispatch_synchronously()` sets `jax_cpu_enable_async_dispatch=False` before
JAX's backend starts (it applies to single-device computations; a multi-device or multi-process one is dispatched
as before). Measured on this project's 2-core machine (benchmarks/README.md, "Synchronous CPU dispatch"): the peer
train step without any page fault in its steady state, 10-15 % faster; the demo command 193 s against 247 s, the
same results. The price: the process keeps its peak heap (its resident memory does not shrink after the largest
program has run; the demo's peak 3.0 against 2.8 GB), and the Python thread waits for each CPU computation
instead of running ahead (on a CPU backend the computation occupies the cores either way; `batch_ahead`'s
lookahead then prepares the next batch after the step instead of during it). Accelerator hosts
usually run tcmalloc (JAX's TPU images preload it), under which the glibc settings have no effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

TRIM_THRESHOLD_BYTES = 1 << 30
ENV_VAR = "VITAL_JAX_HOST_MALLOC"


class HostMallocError(RuntimeError):
    """glibc refused a setting (it should not: both values are within its documented ranges)."""


def _glibc():
    """The process's C library if it is glibc (it has `mallopt` and `gnu_get_libc_version`), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> str:
    """Apply the settings above (idempotent) -> a one-line description for the caller's log. Not glibc (musl,
    macOS: other allocators, no `mallopt`): nothing is changed, and the line says so."""
    libc = _glibc()
    if libc is None:
        return "host malloc: not glibc, allocator settings left as they are"
    for param, value, name in ((M_MMAP_MAX, 0, "M_MMAP_MAX"),
                               (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "M_TRIM_THRESHOLD")):
        if libc.mallopt(param, value) != 1:
            raise HostMallocError(f"glibc mallopt({name}, {value}) failed")
    return "host malloc: freed memory kept for reuse (no mmap'ed chunks, 1 GiB trim threshold)"


def dispatch_synchronously() -> str:
    """Make JAX's CPU client run each call on the thread that makes it (`jax_cpu_enable_async_dispatch=False`)
    -> a one-line description. Why: XLA:CPU allocates a call's temporaries (one block, 393 MB for the peer train
    step) on the thread that dispatches the call; asynchronously that is a worker thread, whose glibc arena maps
    every block above 64 MiB afresh, while the Python thread allocates from the main arena, where
    `keep_freed_memory`'s settings hold. Must run before JAX's backend starts (the client reads the setting when
    it is created); afterwards it raises, as the setting would silently do nothing."""
    import jax
    from jax._src import xla_bridge  # no public query for "has the backend started"

    line = "CPU dispatch: synchronous (each call's temporaries come from the calling thread's heap)"
    if not jax.config.values["jax_cpu_enable_async_dispatch"]:
        return line
    if xla_bridge.backends_are_initialized():
        raise HostMallocError("synchronous CPU dispatch must be set before JAX's backend starts: call "
                              "`host_memory.apply_environment()` before the first JAX computation")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return line


def apply_environment() -> str | None:
    """What the commands call first (`cli.tune_host_memory`): `keep_freed_memory()` and `dispatch_synchronously()`
    unless `VITAL_JAX_HOST_MALLOC=off` -> the log line, or None when switched off."""
    choice = os.environ.get(ENV_VAR, "keep")
    if choice == "off":
        return None
    if choice != "keep":
        raise ValueError(f"{ENV_VAR} must be 'keep' (the default) or 'off', got {choice!r}")
    return f"{keep_freed_memory()}; {dispatch_synchronously()}"


def restore_defaults() -> None:
    """Large blocks mmap'ed and freed memory trimmed again (M_MMAP_MAX 65,536, M_TRIM_THRESHOLD 128 KiB, glibc's
    initial values), so that a process (the tests) can switch back. Not a fresh process's state: glibc's sliding
    mmap threshold stays off once mallopt was called, which is why `benchmarks/host_memory.py` measures each
    setting in its own process; blocks above 32 MiB, which that threshold never covers, are mmap'ed either way."""
    libc = _glibc()
    if libc is None:
        raise HostMallocError("not glibc: nothing to restore")
    for param, value, name in ((M_MMAP_MAX, 65536, "M_MMAP_MAX"), (M_TRIM_THRESHOLD, 128 * 1024, "M_TRIM_THRESHOLD")):
        if libc.mallopt(param, value) != 1:
            raise HostMallocError(f"glibc mallopt({name}, {value}) failed")
