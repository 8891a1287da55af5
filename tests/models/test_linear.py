"""LoRA's input dropout (`layers.linear.lora_dropout`): 16-bit masks, unbiased, and what `Linear` does with it;
the adapter product's own backward pass (`layers.linear.low_rank_product`) against autodiff; the base product's
one-row split on the CPU (`layers.linear.project`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from vital_jax.layers import linear
from vital_jax.layers.attention import Attention
from vital_jax.layers.linear import (DROPOUT_BITS, Linear, LoraConfig, apply_lora_dropout, lora_dropout,
                                     lora_dropout_keeps, low_rank_product, project, random_uint16, threefry2x32)
from vital_jax.layers.mlp import SwiGLU
from vital_jax.sharding import make_mesh


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


def test_one_draw_gives_independent_masks_of_each_input_and_linear_applies_a_given_mask():
    rate = 0.3
    q = round((1 - rate) * 2 ** DROPOUT_BITS) / 2 ** DROPOUT_BITS
    shapes = [(8, 50, 64), (8, 50, 64), (8, 50, 160)]
    keeps = lora_dropout_keeps(jax.random.PRNGKey(4), rate, shapes)
    assert [k.shape for k in keeps] == shapes and all(k.dtype == jnp.bool_ for k in keeps)
    for keep in keeps:
        keep = np.asarray(keep)
        assert abs(keep.mean() - q) < 5 * np.sqrt(q * (1 - q) / keep.size)
    # Two inputs of the same shape get different masks, agreeing only as often as independent ones would.
    agree = (np.asarray(keeps[0]) == np.asarray(keeps[1])).mean()
    assert abs(agree - (q * q + (1 - q) ** 2)) < 0.01
    with pytest.raises(ValueError, match="leading dimensions"):
        lora_dropout_keeps(jax.random.PRNGKey(4), rate, [(8, 50, 64), (8, 49, 64)])
    # Linear with a given mask: y = x W + s (dropout(x) A) B with exactly that mask.
    lora = LoraConfig(rank=4, alpha=8.0, dropout=rate)
    layer = Linear(6, lora=lora)
    x = jnp.asarray(np.random.RandomState(0).randn(8, 50, 64).astype(np.float32))
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    params = {**params, "lora_b": jnp.asarray(np.random.RandomState(1).randn(4, 6).astype(np.float32))}
    got = layer.apply({"params": params}, x, deterministic=False, dropout_keep=keeps[0])
    x_drop = np.where(np.asarray(keeps[0]), np.asarray(x) / q, 0.0)
    want = np.asarray(x) @ np.asarray(params["kernel"]) + lora.scaling * (
        x_drop @ np.asarray(params["lora_a"]) @ np.asarray(params["lora_b"]))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    np.testing.assert_allclose(np.asarray(apply_lora_dropout(x, keeps[0], rate)), x_drop, rtol=1e-6)


def _threefry_draws(fn, *args) -> int:
    """How many Threefry hashes the traced program writes out (each has 20 rotations, i.e. 20 shift_lefts)."""
    jaxpr = jax.make_jaxpr(fn)(*args)

    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "shift_left"
            for sub in jaxprs_in_params(eqn.params):
                n += count(sub)
        return n

    shifts = count(jaxpr.jaxpr)
    assert shifts % 20 == 0, shifts
    return shifts // 20


@pytest.mark.parametrize("module", ["attention", "mlp"])
def test_an_adapted_attention_or_mlp_draws_its_dropout_masks_once(module):
    """Every adapted projection of the module gets a mask (training differs from eval in each projection's
    adapter path), yet the program holds one Threefry draw, not one per projection: each draw is ~260 HLO ops,
    and XLA's compile time grows with them."""
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.2)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 32).astype(np.float32))
    if module == "attention":
        layer = Attention(num_heads=4, num_kv_heads=2, head_dim=8, lora=lora)
        cos, sin = jnp.ones((2, 5, 8)), jnp.zeros((2, 5, 8))
        mask = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)
        args = (x, cos, sin, mask)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
    else:
        layer, args, names = SwiGLU(48, lora=lora), (x,), ("gate_proj", "up_proj", "down_proj")
    params = layer.init(jax.random.PRNGKey(0), *args)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) * 0.1 if path[-1].key == "lora_b" else v, params)

    def only(name):
        """The params with every adapter but `name`'s zeroed: training then differs from eval only through that
        projection's mask."""
        return {k: ({**v, "lora_b": jnp.zeros_like(v["lora_b"])} if k != name and "lora_b" in v else v)
                for k, v in params.items()}

    def run(params, deterministic=False):
        out = layer.apply({"params": params}, *args, deterministic=deterministic,
                          rngs={"dropout": jax.random.PRNGKey(1)})
        return out[0] if module == "attention" else out

    assert _threefry_draws(run, params) == 1
    for name in names:
        trained, evaluated = run(only(name)), run(only(name), deterministic=True)
        assert not np.allclose(np.asarray(trained), np.asarray(evaluated), atol=1e-4), name


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


def _dot_batch_sizes(fn, *args) -> list[int]:
    """The batch size of each dot_general in fn's jaxpr (0 for a dot without batch dimensions)."""
    sizes = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
                sizes.append(int(np.prod([eqn.invars[0].aval.shape[d] for d in lhs_batch])) if lhs_batch else 0)
            for sub in jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)  # a new function: JAX caches traces by function
    return sizes


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_one_row_product_on_the_cpu_is_split_across_the_threads_and_computes_the_same(monkeypatch, threads, dtype):
    """One row (a decode step at batch 1): as many partial products as CPU threads (a divisor of the input
    features: 3 threads and 96 features give 3, 4 threads and 90 give 3), the same numbers as one dot, in value
    and gradients; several rows: one ordinary dot."""
    monkeypatch.setattr(linear, "cpu_threads", lambda: threads)
    rng = np.random.RandomState(threads)
    for features_in in (96, 90):
        kernel = jnp.asarray(rng.randn(features_in, 40), dtype)
        one_row = jnp.asarray(rng.randn(1, 1, features_in), dtype)
        blocks = max(b for b in range(1, threads + 1) if features_in % b == 0)
        assert _dot_batch_sizes(project, one_row, kernel) == [blocks]
        assert _dot_batch_sizes(project, jnp.concatenate([one_row, one_row], axis=1), kernel) == [0]
        split = project(one_row, kernel, jnp.float32)
        assert split.shape == (1, 1, 40) and split.dtype == jnp.float32
        assert project(one_row, kernel).dtype == dtype  # no output dtype: the input's, as jnp.dot
        exact = np.asarray(one_row, np.float64) @ np.asarray(kernel, np.float64)
        # Both accumulate in float32 (bf16 inputs are exact in it): only the summation order differs.
        np.testing.assert_allclose(split, exact, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(split, jnp.dot(one_row, kernel, preferred_element_type=jnp.float32), atol=1e-5)
        if dtype == jnp.float32:  # gradients of <project(x, W), c>: c W^T and x^T c
            c = rng.randn(1, 1, 40).astype(np.float32)
            dx, dw = jax.grad(lambda x, w: jnp.sum(project(x, w) * c), argnums=(0, 1))(one_row, kernel)
            np.testing.assert_allclose(dx, c.astype(np.float64) @ np.asarray(kernel, np.float64).T, atol=1e-5,
                                       rtol=1e-5)
            np.testing.assert_allclose(dw, np.asarray(one_row, np.float64)[0].T @ c[0], atol=1e-5, rtol=1e-5)


def test_linear_splits_only_a_single_row_on_the_cpu_and_not_under_a_mesh_or_on_one_thread(monkeypatch):
    monkeypatch.setattr(linear, "cpu_threads", lambda: 2)

    class Block(nn.Module):  # the Linear at a path the sharding rules cover, for the mesh below
        @nn.compact
        def __call__(self, x):
            return Linear(32, name="q_proj")(x)

    layer = Block()
    x1 = jnp.ones((1, 1, 16))
    params = layer.init(jax.random.PRNGKey(0), x1)
    assert _dot_batch_sizes(lambda x: layer.apply(params, x), x1) == [2]
    assert _dot_batch_sizes(lambda x: layer.apply(params, x), jnp.ones((2, 1, 16))) == [0]
    with jax.set_mesh(make_mesh((1, 1, 1), devices=jax.devices()[:1])):
        assert _dot_batch_sizes(lambda x: layer.apply(params, x), x1) == [0]
    monkeypatch.setattr(linear, "cpu_threads", lambda: 1)
    assert _dot_batch_sizes(lambda x: layer.apply(params, x), x1) == [0]
    monkeypatch.setattr(linear, "cpu_threads", lambda: 2)
    monkeypatch.setattr(linear.jax, "default_backend", lambda: "gpu")  # an accelerator: one dot
    assert _dot_batch_sizes(lambda x: layer.apply(params, x), x1) == [0]
