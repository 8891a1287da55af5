"""vital_jax.compilation_cache: programs compiled inside the block land in the cache directory, and the process's
settings are back afterwards (nothing more is written there)."""

import os

import jax
import jax.numpy as jnp

from vital_jax import compilation_cache


def _entries(path):
    return sorted(name for name in os.listdir(path) if not name.startswith("."))


def test_persistent_cache_writes_inside_the_block_and_restores_after(tmp_path):
    cache_dir = str(tmp_path / "xla_cache")
    before = jax.config.jax_compilation_cache_dir
    # JAX settles caching at a process's first compile: the block must take effect after one.
    jax.jit(lambda x: x * 2.0 + 1.0)(jnp.ones((2, 2))).block_until_ready()
    with compilation_cache.persistent(cache_dir, min_compile_seconds=0.0) as path:
        assert jax.config.jax_compilation_cache_dir == os.path.abspath(cache_dir) == path
        jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)(jnp.ones((7, 5))).block_until_ready()
    written = _entries(cache_dir)
    assert written, "a program compiled inside the block was not cached"
    assert jax.config.jax_compilation_cache_dir == before
    jax.jit(lambda x: jnp.cos(x) - 2.0)(jnp.ones((3, 11))).block_until_ready()
    assert _entries(cache_dir) == written, "the cache was still written after the block"
