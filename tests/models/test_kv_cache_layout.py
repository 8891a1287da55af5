"""The KV cache laid out per layer (unrolled layers) or stacked (scanned layers, generation's token loop): the
same logits, cache contents, greedy tokens and gradients either way; `init_cache` picks the layout of the layers;
and the per-layer train-step-like program holds no array of the whole stack (what the layout is for: no padded
cotangents of the stack in the backward pass, `KVCache`'s docstring)."""

import dataclasses
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_reference import save_tiny_qwen3
from vital_jax import generation
from vital_jax.layers.kv_cache import KVCache
from vital_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, init_cache, load_params
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.models.qwen3.generate import generate

PROMPT, CACHE_LEN = 6, 12


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3_cache_layout"))
    save_tiny_qwen3(path, seed=5, num_hidden_layers=3, tie_word_embeddings=False)
    config = Qwen3Config.from_pretrained(path)
    return config, load_params(path, config)


def _empty(config, per_layer: bool, batch: int = 2) -> KVCache:
    return KVCache.init(config.num_hidden_layers, batch, CACHE_LEN, config.num_key_value_heads, config.head_dim,
                        per_layer=per_layer)


def _diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _train_like_loss(model, params, cache, ids, vectors):
    """What a VITAL train step does with the cache: prefill a prompt, append vectors one step at a time (the
    latent loop), teacher-force tokens over the cache in one pass (the answer); a log-likelihood of the result."""
    out = model.apply({"params": params}, input_ids=ids[:, :PROMPT], kv_cache=cache)
    cache = out.kv_cache
    for t in range(vectors.shape[1]):
        cache = model.apply({"params": params}, inputs_embeds=vectors[:, t:t + 1], kv_cache=cache).kv_cache
    answer = model.apply({"params": params}, input_ids=ids[:, PROMPT:-1], kv_cache=cache)
    logp = jax.nn.log_softmax(answer.logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(logp, ids[:, PROMPT + 1:, None], axis=-1))
    return loss, answer.kv_cache


def _inputs(config):
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, config.vocab_size, (2, PROMPT + 4)))
    vectors = jnp.asarray(rng.randn(2, 2, config.hidden_size).astype(np.float32))
    return ids, vectors


def test_init_cache_lays_the_cache_out_like_the_layers(qwen3):
    config, _ = qwen3
    unrolled = init_cache(config, 2, CACHE_LEN)
    assert unrolled.per_layer and len(unrolled.k) == config.num_hidden_layers
    assert unrolled.k[0].shape == (2, CACHE_LEN, config.num_key_value_heads, config.head_dim)
    assert unrolled.max_len == CACHE_LEN
    scanned = init_cache(dataclasses.replace(config, scan_layers=True), 2, CACHE_LEN)
    assert not scanned.per_layer and scanned.max_len == CACHE_LEN
    assert scanned.k.shape == (config.num_hidden_layers, 2, CACHE_LEN, config.num_key_value_heads, config.head_dim)
    assert unrolled.stacked().k.shape == scanned.k.shape and scanned.stacked() is scanned


def test_both_layouts_give_the_same_loss_cache_and_gradients(qwen3):
    config, params = qwen3
    model = Qwen3ForCausalLM(config)
    ids, vectors = _inputs(config)
    results = {}
    for per_layer in (True, False):
        grad_fn = jax.jit(jax.value_and_grad(
            lambda p, c: _train_like_loss(model, p, c, ids, vectors), has_aux=True))
        (loss, cache), grads = grad_fn(params, _empty(config, per_layer))
        assert cache.per_layer == per_layer
        results[per_layer] = loss, cache.stacked(), grads
    (loss_a, cache_a, grads_a), (loss_b, cache_b, grads_b) = results[True], results[False]
    assert abs(float(loss_a) - float(loss_b)) <= 1e-6
    assert _diff((cache_a.k, cache_a.v), (cache_b.k, cache_b.v)) <= 1e-6
    np.testing.assert_array_equal(cache_a.valid, cache_b.valid)
    assert int(cache_a.index) == int(cache_b.index) == PROMPT + 2 + 3
    assert _diff(grads_a, grads_b) <= 1e-6
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_a)) > 0


def test_a_scanned_stack_takes_a_per_layer_cache(qwen3):
    config, params = qwen3
    ids, _ = _inputs(config)
    scanned_config = dataclasses.replace(config, scan_layers=True)
    scanned_params = qwen3_params.to_layout(params, scan_layers=True)
    out = {}
    for per_layer in (True, False):
        out[per_layer] = Qwen3ForCausalLM(scanned_config).apply(
            {"params": scanned_params}, input_ids=ids, kv_cache=_empty(config, per_layer))
    assert not out[True].kv_cache.per_layer
    assert _diff(out[True].logits, out[False].logits) <= 1e-6
    assert _diff(out[True].kv_cache.k, out[False].kv_cache.k) <= 1e-6


def test_generation_decodes_a_per_layer_cache_like_a_stacked_one(qwen3):
    config, params = qwen3
    model = Qwen3ForCausalLM(config)
    ids, _ = _inputs(config)

    def step_fn(p, ids_b1, valid_b1, cache):
        out = model.apply({"params": p}, input_ids=ids_b1, token_valid=valid_b1, kv_cache=cache)
        return out.logits[:, -1], out.kv_cache

    tokens = {}
    for per_layer in (True, False):
        prefill = model.apply({"params": params}, input_ids=ids[:, :PROMPT], kv_cache=_empty(config, per_layer))
        tokens[per_layer], _ = jax.jit(lambda p, logits, cache: generation.decode(
            step_fn, p, logits, cache, generation.SamplingConfig(max_new_tokens=5)))(
                params, prefill.logits[:, -1], prefill.kv_cache)
    np.testing.assert_array_equal(tokens[True], tokens[False])


def _stacks(jaxpr) -> int:
    """How many stackings or concatenations into a 5-D array (of per-layer keys or values) the program holds."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("stack", "concatenate") and eqn.outvars[0].aval.ndim == 5:
            count += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _stacks(sub)
    return count


def test_generation_prefills_the_stacked_cache_its_token_loop_runs_on(qwen3):
    """`qwen3.generate` creates the stacked cache itself: no stacking of a per-layer one before the loop (which
    would hold both for a moment); handed a per-layer cache, `generation.decode` stacks it (the check can fail)."""
    config, params = qwen3
    ids, _ = _inputs(config)
    sampling = generation.SamplingConfig(max_new_tokens=3)
    jaxpr = jax.make_jaxpr(lambda p: generate(p, ids, jnp.ones(ids.shape, bool), config, sampling))(params)
    assert _stacks(jaxpr.jaxpr) == 0
    decode = jax.make_jaxpr(lambda p, c: generation.decode(
        lambda *a: (jnp.zeros((2, config.vocab_size)), a[-1]), p, jnp.zeros((2, config.vocab_size)), c, sampling))
    assert _stacks(decode(params, _empty(config, True)).jaxpr) == 2
    assert _stacks(decode(params, _empty(config, False)).jaxpr) == 0


def test_the_per_layer_backward_holds_no_array_of_the_whole_stack(qwen3):
    """The stacked layout's backward pads each layer's cotangent to the whole (L, B, S, K, H) stack; with one
    array per layer no array of that shape is left in the program (the check fails on the stacked layout)."""
    config, params = qwen3
    model = Qwen3ForCausalLM(config)
    ids, vectors = _inputs(config)
    stack = "x".join(str(n) for n in (config.num_hidden_layers, 2, CACHE_LEN, config.num_key_value_heads,
                                      config.head_dim))
    stack_arrays = re.compile(rf"tensor<{stack}xf32>")

    def program(per_layer: bool) -> str:
        grad_fn = jax.grad(lambda p, c: _train_like_loss(model, p, c, ids, vectors)[0])
        return jax.jit(grad_fn).lower(params, _empty(config, per_layer)).as_text()

    stacked_text = program(False)
    assert len(stack_arrays.findall(stacked_text)) > 0 and "stablehlo.pad" in stacked_text
    assert not stack_arrays.findall(program(True))
