"""benchmarks/xla_flops: executed matmul FLOPs from compiled HLO, loop trip counts included (XLA's own
cost_analysis counts a while body once)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.xla_flops import HloFlopsError, matmul_flops


def _nested(x, w, v):
    def inner(c, vi):
        return jnp.tanh(c @ vi), None

    def body(c, wi):
        return jax.lax.scan(inner, jnp.tanh(c @ wi), v)[0], None

    y = jax.lax.scan(body, x, w)[0]
    return jnp.einsum("bij,bjk->bik", y.reshape(4, 16, 32), jnp.ones((4, 32, 8)))


def test_dots_in_nested_scans_count_once_per_iteration():
    x, w, v = jnp.ones((64, 32)), jnp.ones((10, 32, 32)), jnp.ones((3, 32, 32))
    compiled = jax.jit(_nested).lower(x, w, v).compile()
    # 10 outer iterations, each one dot of its own and 3 of the inner scan; then one batched einsum outside.
    expected = 10 * (1 + 3) * 2 * 64 * 32 * 32 + 2 * 4 * 16 * 8 * 32
    assert matmul_flops(compiled.as_text()) == expected
    assert compiled.cost_analysis()["flops"] < expected / 5  # what the counter exists for


def test_a_loop_free_program_agrees_with_xla_cost_analysis():
    def f(a, b, c):
        return (a @ b) @ c

    compiled = jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones((32, 4))).compile()
    assert matmul_flops(compiled.as_text()) == 2 * 8 * 16 * 32 + 2 * 8 * 32 * 4
    assert matmul_flops(compiled.as_text()) == pytest.approx(compiled.cost_analysis()["flops"], rel=0.05)


def test_a_loop_of_unknown_length_is_an_error_not_a_guess():
    def f(x, n):
        return jax.lax.while_loop(lambda c: c[1] < n, lambda c: (jnp.tanh(c[0] @ c[0]), c[1] + 1), (x, 0))[0]

    compiled = jax.jit(f).lower(jnp.ones((8, 8)), 3).compile()
    with pytest.raises(HloFlopsError, match="without a known trip count"):
        matmul_flops(compiled.as_text())
