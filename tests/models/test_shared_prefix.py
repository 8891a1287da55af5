"""A prompt shared by G continuations (`KVCache.share_prefix`, `attend_shared_prefix`): the same attention as each
row's own copy of its prompt, forward and gradients, for one query (decode) and many (teacher forcing); and a
Qwen3 decoder (loop and scanned layers) continuing two left-padded prompts three ways each gives transformers'
logits for every row's whole sequence (float32, max abs diff <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.hf_reference import save_tiny_qwen3
from vital_jax.layers.attention import attend, attend_shared_prefix
from vital_jax.layers.kv_cache import KVCache
from vital_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, init_cache, load_params

TOL = 1e-4


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _case(rng, prompts, group, t, s, sp, heads, kv_heads, h):
    """Queries of B = prompts * group rows over their own s slots (causal, some invisible) and a prompt of sp
    slots (some padding) per `group` rows."""
    b = prompts * group
    arrays = [jnp.asarray(rng.randn(*shape).astype(np.float32)) for shape in
              [(b, t, heads, h), (b, s, kv_heads, h), (b, s, kv_heads, h), (prompts, sp, kv_heads, h),
               (prompts, sp, kv_heads, h)]]
    prefix_valid = rng.rand(prompts, sp) > 0.3
    prefix_valid[:, -1] = True
    own_valid = rng.rand(b, s) > 0.3
    query_slots = np.arange(s - t, s)
    mask = (np.arange(s)[None, None, :] <= query_slots[None, :, None]) & own_valid[:, None, :]
    return (*arrays, jnp.asarray(mask), jnp.asarray(prefix_valid))


def _copied(q, k, v, mask, prefix_k, prefix_v, prefix_valid, impl="xla", dtype=jnp.float32):
    """The reference: each row's own copy of its prompt in front of its own slots, through `attend`."""
    b, t = q.shape[:2]
    group, sp = b // prefix_k.shape[0], prefix_k.shape[1]
    keys = jnp.concatenate([jnp.repeat(prefix_k, group, 0), k], 1)
    values = jnp.concatenate([jnp.repeat(prefix_v, group, 0), v], 1)
    prefix_mask = jnp.broadcast_to(jnp.repeat(prefix_valid, group, 0)[:, None], (b, t, sp))
    return attend(q, keys, values, jnp.concatenate([prefix_mask, mask], 2), impl, dtype)


@pytest.mark.parametrize("prompts, group, t, heads, kv_heads", [
    (2, 3, 1, 4, 2),   # decode: one query per row, GQA
    (2, 2, 4, 6, 2),   # teacher forcing: several queries per row
    (3, 2, 3, 2, 1),   # one kv head
])
def test_shared_prefix_attention_equals_a_copy_per_row_with_gradients(prompts, group, t, heads, kv_heads):
    q, k, v, prefix_k, prefix_v, mask, prefix_valid = _case(np.random.RandomState(prompts * 7 + t), prompts, group,
                                                            t, 6, 20, heads, kv_heads, 16)
    args = (q, k, v, prefix_k, prefix_v)

    def shared(q, k, v, prefix_k, prefix_v):
        return attend_shared_prefix(q, k, v, mask, prefix_k, prefix_v, prefix_valid, "xla")

    def copied(q, k, v, prefix_k, prefix_v):
        return _copied(q, k, v, mask, prefix_k, prefix_v, prefix_valid)

    assert _diff(jax.jit(shared)(*args), copied(*args)) <= 1e-6
    weights = jnp.asarray(np.random.RandomState(1).randn(*q.shape[:2], heads * 16).astype(np.float32))
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=range(5)))(*args)
             for f in (shared, copied)]
    for got, want in zip(*grads):
        assert _diff(got, want) <= 1e-5
    program = jax.make_jaxpr(shared)(*args).jaxpr
    # Nothing in the program is as large as the prompt repeated per row (what `copied` builds).
    assert max(int(np.prod(var.aval.shape)) for eqn in program.eqns for var in eqn.outvars) < group * prefix_k.size
    if t == 1:  # one query reads the prompt cache as it lies: no transposed copy of it (the block-diagonal
        # queries and the scores are smaller than the cache when, as in real models, Sp > G * N)
        transposed = [e.invars[0].aval.size for e in program.eqns if e.primitive.name == "transpose"]
        assert max(transposed, default=0) < prefix_k.size
    # The other implementations get the prompt repeated per row for several queries (the same result), and one
    # query takes the "xla" path (no prompt repeated per row in its program either).
    dot = attend_shared_prefix(q, k, v, mask, prefix_k, prefix_v, prefix_valid, "dot_product")
    assert _diff(dot, copied(*args)) <= 1e-5
    dot_program = jax.make_jaxpr(lambda *a: attend_shared_prefix(
        *a[:3], mask, *a[3:], prefix_valid, "dot_product"))(*args).jaxpr
    largest = max(int(np.prod(var.aval.shape)) for eqn in dot_program.eqns for var in eqn.outvars)
    assert (largest >= group * prefix_k.size) == (t > 1), (largest, t)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attend_shared_prefix(q, k, v, mask, prefix_k, prefix_v, prefix_valid, "flash")
    # bfloat16 inputs and compute: float32 scores and softmax, bfloat16 out, as `attend`.
    args16 = [x.astype(jnp.bfloat16) for x in args]
    got16 = attend_shared_prefix(*args16[:3], mask, *args16[3:], prefix_valid, "xla", jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16
    assert _diff(got16, _copied(*args16[:3], mask, *args16[3:], prefix_valid, "xla", jnp.bfloat16)) <= 2e-2


def test_a_cache_sharing_a_prompt_continues_its_positions_and_refuses_a_second_prefix():
    prompt = KVCache.init(2, 3, 5, 2, 4).replace(lengths=jnp.asarray([5, 3, 4]), index=jnp.asarray(5),
                                                 position_offset=jnp.asarray([0, 2, 7]))
    shared = KVCache.share_prefix(prompt, 2, 6)
    assert shared.has_shared_prefix and not prompt.has_shared_prefix
    assert shared.k.shape == (2, 6, 6, 2, 4) and shared.prefix_k.shape == (2, 3, 5, 2, 4)
    assert shared.lengths.tolist() == [5, 5, 3, 3, 4, 4] and shared.position_offset.tolist() == [0, 0, 2, 2, 7, 7]
    assert int(shared.index) == 0 and not bool(shared.valid.any())
    assert shared.next_positions(jnp.ones((6, 1), bool))[:, 0].tolist() == [5, 5, 5, 5, 11, 11]
    with pytest.raises(ValueError, match="already has a shared prefix"):
        KVCache.share_prefix(shared, 2, 1)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3_shared_prefix"))
    hf_model = save_tiny_qwen3(path, seed=5, tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16)
    return hf_model, path


@pytest.mark.parametrize("scan_layers", [False, True])
def test_qwen3_continuing_a_shared_prompt_matches_transformers_on_every_row(qwen3, scan_layers):
    """Two left-padded prompts (5 and 3 tokens), three continuations each: two tokens teacher-forced in one pass,
    then two one-token steps, one of them invisible in one row (a finished row in decoding)."""
    hf_model, path = qwen3
    config = Qwen3Config.from_pretrained(path, scan_layers=scan_layers)
    params = load_params(path, config)
    model = Qwen3ForCausalLM(config)
    rng = np.random.RandomState(0)
    prompts, group, tp = 2, 3, 5
    prompt_ids = rng.randint(0, config.vocab_size, (prompts, tp))
    prompt_valid = np.ones((prompts, tp), bool)
    prompt_valid[1, :2] = False
    rows = prompts * group
    new_ids = rng.randint(0, config.vocab_size, (rows, 4))
    new_valid = np.ones((rows, 4), bool)
    new_valid[4, 2] = False

    apply = jax.jit(lambda p, ids, valid, cache: model.apply({"params": p}, input_ids=ids, token_valid=valid,
                                                             kv_cache=cache))
    prefill = apply(params, jnp.asarray(prompt_ids), jnp.asarray(prompt_valid), init_cache(config, prompts, tp))
    cache = KVCache.share_prefix(prefill.kv_cache, group, 4)
    logits = []
    for start, stop in [(0, 2), (2, 3), (3, 4)]:
        out = apply(params, jnp.asarray(new_ids[:, start:stop]), jnp.asarray(new_valid[:, start:stop]), cache)
        logits.append(np.asarray(out.logits))
        cache = out.kv_cache
    logits = np.concatenate(logits, axis=1)
    assert cache.prefix_k.shape[1] == prompts and int(cache.index) == 4
    for r in range(rows):
        b = r // group
        ids = list(prompt_ids[b][prompt_valid[b]]) + list(new_ids[r][new_valid[r]])
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()
        n_prompt = int(prompt_valid[b].sum())
        ours = logits[r][new_valid[r]]
        assert _diff(ours, ref[n_prompt:]) <= TOL, r
