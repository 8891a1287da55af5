"""Qwen3 in Flax against transformers on tiny random checkpoints (float32, max abs diff <= 1e-4)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.hf_reference import prefill_then_vector_steps, save_tiny_qwen3
from vital_jax.generation import SamplingConfig
from vital_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, init_cache, load_params
from vital_jax.models.qwen3.generate import generate

TOL = 1e-4

CONFIGS = {
    # GQA ratio 2, tied head (like Qwen3-1.7B).
    "gqa2_tied": dict(),
    # Odd hidden size, no GQA (ratio 1), untied head, head_dim * heads != hidden.
    "odd_gqa1_untied": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=3, head_dim=20,
                            intermediate_size=100, tie_word_embeddings=False, num_hidden_layers=3),
    # GQA ratio 4, untied.
    "gqa4_untied": dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                        intermediate_size=160, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model = save_tiny_qwen3(path, seed=len(request.param), **CONFIGS[request.param])
    config = Qwen3Config.from_pretrained(path)
    return hf_model, config, load_params(path, config)


@pytest.fixture(scope="module")
def gqa2(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gqa2_untied"))
    hf_model = save_tiny_qwen3(path, seed=3, tie_word_embeddings=False)
    config = Qwen3Config.from_pretrained(path)
    return hf_model, config, load_params(path, config)


def _forward(config, params, **kwargs):
    return jax.jit(lambda p, kw: Qwen3ForCausalLM(config).apply({"params": p}, **kw))(params, kwargs)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_logits_and_hidden_states_match_transformers(converted):
    hf_model, config, params = converted
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 9))
    out = _forward(config, params, input_ids=jnp.asarray(ids))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), output_hidden_states=True)
    assert _max_diff(out.logits, ref.logits) <= TOL
    assert _max_diff(out.hidden_states, ref.hidden_states[-1]) <= TOL


def test_prefill_then_decode_steps_match_full_forward(gqa2):
    _, config, params = gqa2
    ids = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (2, 10)))
    full = _forward(config, params, input_ids=ids)
    cache = init_cache(config, 2, 16)
    step = jax.jit(lambda p, ids, c: Qwen3ForCausalLM(config).apply({"params": p}, input_ids=ids, kv_cache=c))
    out = step(params, ids[:, :6], cache)
    logits = [out.logits]
    cache = out.kv_cache
    for t in range(6, 10):
        out = step(params, ids[:, t:t + 1], cache)
        cache = out.kv_cache
        logits.append(out.logits)
    assert int(cache.index) == 10 and np.all(np.asarray(cache.lengths) == 10)
    assert _max_diff(jnp.concatenate(logits, axis=1), full.logits) <= TOL


def test_decode_steps_fed_as_embeddings_match_transformers_cache(gqa2):
    """Steps fed as input vectors (as the latent loop does) equal transformers inputs_embeds + its KV cache."""
    hf_model, config, params = gqa2
    rng = np.random.RandomState(2)
    ids = rng.randint(0, config.vocab_size, (2, 5))
    vectors = rng.randn(2, 3, config.hidden_size).astype(np.float32)
    model = Qwen3ForCausalLM(config)
    _, ours, _, _, theirs = prefill_then_vector_steps(model, params, hf_model, ids, vectors, 8)
    assert _max_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_examples_run_alone(gqa2, side):
    _, config, params = gqa2
    rng = np.random.RandomState(3)
    lengths = [7, 4]
    width = max(lengths)
    ids = np.zeros((2, width), np.int32)
    valid = np.zeros((2, width), bool)
    rows = [rng.randint(0, config.vocab_size, n) for n in lengths]
    for b, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, sl], valid[b, sl] = row, True
    batched = _forward(config, params, input_ids=jnp.asarray(ids), token_valid=jnp.asarray(valid))
    for b, row in enumerate(rows):
        alone = _forward(config, params, input_ids=jnp.asarray(row[None]))
        assert _max_diff(np.asarray(batched.logits)[b][valid[b]], alone.logits[0]) <= TOL


def test_greedy_generation_equals_transformers_generate(converted):
    hf_model, config, params = converted
    ids = np.random.RandomState(4).randint(0, config.vocab_size, (2, 6))
    sampling = SamplingConfig(max_new_tokens=12)
    tokens, lengths = generate(params, jnp.asarray(ids, jnp.int32), jnp.ones((2, 6), bool), config, sampling)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                                do_sample=False, max_new_tokens=12, min_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(tokens), ref[:, 6:].numpy())
    assert np.all(np.asarray(lengths) == 12)


def test_generation_stops_per_example_at_eos_and_padding_is_invisible(gqa2):
    _, config, params = gqa2
    rng = np.random.RandomState(5)
    rows = [rng.randint(0, config.vocab_size, 6), rng.randint(0, config.vocab_size, 3)]
    alone = [np.asarray(generate(params, jnp.asarray(r[None], jnp.int32), jnp.ones((1, len(r)), bool), config,
                                 SamplingConfig(max_new_tokens=8))[0])[0] for r in rows]
    # Use a token that example 0 emits at step 3 as EOS: it must stop there, example 1 must be unaffected
    # unless it emits the same token.
    eos = int(alone[0][3])
    ids = np.zeros((2, 6), np.int32)
    valid = np.zeros((2, 6), bool)
    ids[0], valid[0] = rows[0], True
    ids[1, 3:], valid[1, 3:] = rows[1], True  # left padding
    tokens, lengths = generate(params, jnp.asarray(ids), jnp.asarray(valid), config,
                               SamplingConfig(max_new_tokens=8, eos_token_ids=(eos,), pad_token_id=0))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for b in range(2):
        stop = next((i for i, t in enumerate(alone[b]) if t == eos), 7) + 1
        assert lengths[b] == stop
        np.testing.assert_array_equal(tokens[b, :stop], alone[b][:stop])
        assert np.all(tokens[b, stop:] == 0)


def test_sampling_is_seeded_and_top_k_1_is_greedy(gqa2):
    _, config, params = gqa2
    ids = jnp.asarray(np.random.RandomState(6).randint(0, config.vocab_size, (2, 5)), jnp.int32)
    valid = jnp.ones((2, 5), bool)
    greedy = generate(params, ids, valid, config, SamplingConfig(max_new_tokens=6))[0]
    top1 = generate(params, ids, valid, config, SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=1),
                    jax.random.PRNGKey(0))[0]
    np.testing.assert_array_equal(greedy, top1)
    hot = SamplingConfig(max_new_tokens=6, temperature=5.0)
    a = generate(params, ids, valid, config, hot, jax.random.PRNGKey(1))[0]
    b = generate(params, ids, valid, config, hot, jax.random.PRNGKey(1))[0]
    c = generate(params, ids, valid, config, hot, jax.random.PRNGKey(2))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_bf16_forward_stays_close_to_fp32(gqa2):
    """bf16 params and activations: 8 mantissa bits give ~0.4% relative error per op; through two layers on
    O(1) logits we allow 0.1 absolute and require the argmax to agree on most positions."""
    _, config, params = gqa2
    ids = jnp.asarray(np.random.RandomState(7).randint(0, config.vocab_size, (2, 12)))
    ref = _forward(config, params, input_ids=ids).logits
    bf16 = dataclasses.replace(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out = _forward(bf16, params16, input_ids=ids)
    assert out.hidden_states.dtype == jnp.bfloat16
    assert out.logits.dtype == jnp.float32  # losses are computed from fp32 logits
    assert _max_diff(out.logits, ref) <= 0.1
    assert np.mean(np.argmax(out.logits, -1) == np.argmax(ref, -1)) >= 0.9


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_logits_are_float32_products_not_rounded_to_bf16(gqa2, tied):
    """The output head's bf16 product was rounded to bf16 before the cast: logits of 16-32 off by up to 0.125,
    noise that MedSynapse-V's r_causal (a difference of two log-probability sums) adds up."""
    _, config, params = gqa2
    config = dataclasses.replace(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, tie_word_embeddings=tied)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    if tied:
        params = {k: v for k, v in params.items() if k != "lm_head"}
    ids = jnp.asarray(np.random.RandomState(9).randint(0, config.vocab_size, (2, 12)))
    out = _forward(config, params, input_ids=ids)
    weight = params["embed_tokens"]["embedding"].T if tied else params["lm_head"]["kernel"]
    exact = jnp.dot(out.hidden_states.astype(jnp.float32), weight.astype(jnp.float32))  # bf16 x bf16 is exact
    assert out.logits.dtype == jnp.float32 and _max_diff(out.logits, exact) <= 1e-5 * float(jnp.abs(exact).max())
    assert _max_diff(exact, exact.astype(jnp.bfloat16)) > 1e-3  # what rounding to bf16 would have lost


def test_remat_gives_same_loss_and_gradients(gqa2):
    _, config, params = gqa2
    ids = jnp.asarray(np.random.RandomState(8).randint(0, config.vocab_size, (2, 8)))

    def loss(p, cfg):
        logits = Qwen3ForCausalLM(cfg).apply({"params": p}, input_ids=ids).logits
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1]) * jax.nn.one_hot(ids[:, 1:], cfg.vocab_size))

    plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config)
    remat = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, dataclasses.replace(config, remat=True))
    assert abs(float(plain[0]) - float(remat[0])) <= 1e-6
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain[1], remat[1]))) <= 1e-6
