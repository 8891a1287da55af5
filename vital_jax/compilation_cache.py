"""JAX's persistent compilation cache, switched on for one piece of work (the study; the test suite sets the
same cache for its whole session, subprocesses included, through the environment in tests/conftest.py).

XLA compiles every program of a run (train step per prompt bucket and K, evaluation's prefill and decode) from
scratch in each process, and on a CPU that is tens of seconds per run. A study trains the same programs for every
seed and for rows that differ only in their loss weights, so with the cache on disk all but the first compile of
each program is a file read (measured: ~50 s less per run at the study's sizes, results bit-identical).

The cache is JAX's own (`jax_compilation_cache_dir`); a command-line user can set it for any command with the
environment variable JAX_COMPILATION_CACHE_DIR. JAX treats the cache as trusted code: keep it in a directory only
you can write to (the study puts it in its own workdir).
"""

from __future__ import annotations

import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

# Programs that compile faster than this are not worth a file (the tiny element-wise ones).
MIN_COMPILE_SECONDS = 0.5


@contextlib.contextmanager
def persistent(path: str, min_compile_seconds: float = MIN_COMPILE_SECONDS):
    """Within the block, compiled programs are read from / written to `path` (created if missing). The previous
    settings are restored afterwards. JAX decides once per process whether and where to cache, at the first
    compile, so the cache is reset on entry and on exit for a change to take effect in a process that has
    already compiled something."""
    os.makedirs(path, exist_ok=True)
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    _jax_cache.reset_cache()
    try:
        yield os.path.abspath(path)
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        _jax_cache.reset_cache()
