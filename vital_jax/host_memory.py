"""Host memory for XLA:CPU, opt-in: make glibc's malloc keep freed memory instead of giving it back to the kernel.

Why: a jitted program on the CPU backend allocates its activations and temporaries from host memory on every
call. glibc serves each allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh
`mmap` and returns it with `munmap` when freed, so a program whose large buffers are written once each (an
element-wise op over a fresh 40 MB array) spends most of its time in page faults: `jnp.exp` over 16 x 784 x 784
float32 took 19 ms with glibc's defaults and 2.6 ms with these settings, torch's `exp` 20 -> 5 ms.

Measured on whole programs (`python -m benchmarks.host_memory`, one fresh process per setting, issue #16's peer
sizes, this 2-core machine): the vision tower's forward on one 448 x 448 image is 1.12-1.18x faster (two runs);
the VITAL train step showed no difference beyond this machine's noise (0.88x-1.06x over four comparisons). So it
is off by default: `VITAL_JAX_HOST_MALLOC=keep` turns it on for the training, pretraining, study, evaluation and
explanation commands (`apply_environment`, called first by each), e.g. for CPU evaluation runs where the vision
tower is a large share of the time.

`keep_freed_memory()` sets, for the rest of the process: no mmap'ed chunks (`M_MMAP_MAX = 0`: large blocks come
from the heap like small ones) and a trim threshold of 1 GiB (`M_TRIM_THRESHOLD`: free memory at the top of the
heap is returned only beyond that). What it does not cover: a program's temporaries, which XLA:CPU allocates as
one block per call on a worker thread (393 MB for the peer train step): glibc serves a thread arena's blocks above
64 MiB with mmap whatever M_MMAP_MAX says, so that block is still faulted in on every call. Limiting glibc to one
arena (M_ARENA_MAX = 1, effective only before any other thread allocates) removes those faults too, and measured
no faster (benchmarks/README.md, "The train step's page faults"). The price: the process keeps its peak heap
(its resident memory does not shrink after the largest program has run). Accelerator hosts usually get this from
tcmalloc (JAX's TPU images preload it), under which these glibc settings have no effect.
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


def apply_environment() -> str | None:
    """What the commands call first: `keep_freed_memory()` when `VITAL_JAX_HOST_MALLOC=keep`, nothing when it is
    unset or `default` -> the log line, or None when nothing was asked."""
    choice = os.environ.get(ENV_VAR, "default")
    if choice == "default":
        return None
    if choice != "keep":
        raise ValueError(f"{ENV_VAR} must be 'keep' or 'default', got {choice!r}")
    return keep_freed_memory()


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
