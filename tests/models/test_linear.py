"""LoRA's input dropout (`layers.linear.lora_dropout`): 16-bit masks, unbiased, and what `Linear` does with it;
the adapter product's own backward pass (`layers.linear.low_rank_product`) against autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vital_jax.layers.linear import (DROPOUT_BITS, Linear, LoraConfig, lora_dropout, low_rank_product, random_uint16,
                                     threefry2x32)


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_lora_dropout_keeps_the_quantised_fraction_and_is_unbiased(rate):
    x = jnp.asarray(np.random.RandomState(0).rand(64, 301).astype(np.float32) + 0.5)  # odd width: a half word
    out = np.asarray(lora_dropout(x, rate, jax.random.PRNGKey(1)))
    keep = round((1 - rate) * 2 ** DROPOUT_BITS) / 2 ** DROPOUT_BITS
    kept = out != 0
    # Binomial with n = 19,264: 5 standard deviations.
    assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / kept.size)
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / keep, rtol=1e-6)
    # All four 16-bit quarters of every hash evaluation are used, independently: the kept fraction holds at every
    # column position mod 4.
    for quarter in range(4):
        column = kept[:, quarter::4]
        assert abs(column.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / column.size)
    # Averaged over masks the output is x (inverted dropout's expectation), per element.
    x1 = jnp.ones((4, 8), jnp.float32)
    masks = jax.jit(jax.vmap(lambda key: lora_dropout(x1, rate, key)))(jax.vmap(jax.random.PRNGKey)(jnp.arange(2000)))
    mean = np.asarray(masks).mean(axis=0)
    assert np.abs(mean - 1.0).max() < 6 * np.sqrt((1 - keep) / keep / 2000)
    # Another key, another mask; the same key, the same mask.
    assert not np.array_equal(out, np.asarray(lora_dropout(x, rate, jax.random.PRNGKey(2))))
    np.testing.assert_array_equal(out, np.asarray(lora_dropout(x, rate, jax.random.PRNGKey(1))))


def test_threefry2x32_is_jax_randoms_hash_and_compiles_without_a_loop():
    # jax.random.bits (partitionable Threefry, 32 bits) of shape (n,) XORs the hash's two words at counters (0, i).
    n = 1001
    with jax.threefry_partitionable(True):
        for seed in (0, 1, 12345):
            key = jax.random.PRNGKey(seed)
            word1, word2 = threefry2x32(key[0], key[1], jnp.zeros(n, jnp.uint32), jnp.arange(n, dtype=jnp.uint32))
            np.testing.assert_array_equal(np.asarray(word1 ^ word2), np.asarray(jax.random.bits(key, (n,),
                                                                                                  jnp.uint32)))
    # Typed keys give the same values as their raw words; the counters are the flat index (rows differ).
    values = np.asarray(random_uint16(jax.random.PRNGKey(3), (3, 5, 301)))
    np.testing.assert_array_equal(values, np.asarray(random_uint16(jax.random.key(3), (3, 5, 301))))
    assert values.dtype == np.uint16 and len({values[i, j].tobytes() for i in range(3) for j in range(5)}) == 15
    assert abs(values.mean() / 65535 - 0.5) < 0.01
    # The reason it exists: jax.random lowers Threefry on CPU as a while loop whose carries XLA copies each round.
    compiled = jax.jit(lambda k: random_uint16(k, (64, 512))).lower(jax.random.PRNGKey(0)).compile().as_text()
    assert " while(" not in compiled


def test_lora_dropout_rejects_impossible_rates_and_passes_rate_zero_through():
    x = jnp.ones((2, 3))
    assert lora_dropout(x, 0.0, jax.random.PRNGKey(0)) is x
    for rate in (1.0, -0.1, 1 - 1e-7):
        with pytest.raises(ValueError, match="dropout rate"):
            lora_dropout(x, rate, jax.random.PRNGKey(0))


def test_linear_applies_dropout_to_the_adapter_input_only_in_training():
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    layer = Linear(9, lora=lora)  # in 4 -> out 9, rank 4: A B (4, 9) has full row rank, so x_drop is recoverable
    x = jnp.asarray(np.random.RandomState(0).rand(16, 4).astype(np.float32) + 0.5)
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    params = {**params, "lora_b": jnp.asarray(np.random.RandomState(1).randn(4, 9).astype(np.float32))}
    base = np.asarray(x @ params["kernel"])
    ab = np.asarray(params["lora_a"] @ params["lora_b"], np.float64)
    np.testing.assert_allclose(layer.apply({"params": params}, x), base + lora.scaling * np.asarray(x) @ ab,
                               atol=1e-5)  # eval: no dropout
    train = layer.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(7)})
    # The frozen path sees x itself; the adapter sees x with entries dropped (0) or kept and scaled by 1 / q.
    x_drop = (np.asarray(train, np.float64) - base) / lora.scaling @ np.linalg.pinv(ab)
    q = round(0.5 * 2 ** DROPOUT_BITS) / 2 ** DROPOUT_BITS
    dropped = np.abs(x_drop) < 1e-3
    np.testing.assert_allclose(x_drop[~dropped], np.asarray(x)[~dropped] / q, rtol=1e-3)
    assert 0.25 < dropped.mean() < 0.75
    again = layer.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(8)})
    assert not np.allclose(np.asarray(again), np.asarray(train))


@pytest.mark.parametrize("dtype, leading", [(jnp.float32, (7,)), (jnp.float32, (2, 5)), (jnp.bfloat16, (2, 5))])
def test_low_rank_product_gradients_match_autodiff(dtype, leading):
    rng = np.random.RandomState(0)
    x, a, b, dy = (jnp.asarray(rng.randn(*shape).astype(np.float32), dtype)
                   for shape in ((*leading, 12), (12, 4), (4, 9), (*leading, 9)))

    def plain(x, a, b):
        return jnp.dot(jnp.dot(x, a), b)

    np.testing.assert_array_equal(np.asarray(low_rank_product(x, a, b), np.float32),
                                  np.asarray(plain(x, a, b), np.float32))
    ours = jax.vjp(low_rank_product, x, a, b)[1](dy)
    reference = jax.vjp(plain, x, a, b)[1](dy)
    # float32: the same products summed in another order; bfloat16: each gradient rounded once more or less.
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, got, want in zip(("dx", "da", "db"), ours, reference):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        assert err <= tol * scale, (name, err, scale)
    # Through a Linear's adapters under jit: the gradients of lora_a, lora_b and the input are those of the
    # explicit formula y = x W + s (x A) B (dropout's masking of the adapter input is tested above).
    if dtype == jnp.float32:
        lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
        layer = Linear(9, lora=lora)
        params = layer.init(jax.random.PRNGKey(0), x)["params"]
        params = {**params, "lora_b": jnp.asarray(rng.randn(4, 9).astype(np.float32))}

        def loss(p, x):
            return jnp.sum(layer.apply({"params": p}, x) * dy)

        def explicit(p, x):
            return jnp.sum((x @ p["kernel"] + lora.scaling * plain(x, p["lora_a"], p["lora_b"])) * dy)

        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        want = jax.grad(explicit, argnums=(0, 1))(params, x)
        for key in ("lora_a", "lora_b", "kernel"):
            np.testing.assert_allclose(got[0][key], want[0][key], rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
