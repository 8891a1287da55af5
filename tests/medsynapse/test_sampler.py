"""The Diagnostic Memory Sampler P_phi (§2.2): shapes, initial scale, the attention against torch, and the
structural properties its design promises (order-free pool, probes coupled only through self-attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, MultiHeadAttention, SamplerConfig

D_F, D_H = 32, 48


def _init(cfg, feature_map, seed=0):
    sampler = DiagnosticMemorySampler(cfg)
    params = sampler.init(jax.random.PRNGKey(seed), feature_map)["params"]
    return sampler, params


def _features(shape=(2, 3, 5, D_F), seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def test_sampler_maps_a_feature_map_to_n_memory_vectors_at_token_embedding_scale():
    cfg = SamplerConfig(hidden_size=D_H, num_queries=16, num_heads=4)
    features = _features()
    sampler, params = _init(cfg, features)
    memory = sampler.apply({"params": params}, features)
    assert memory.shape == (2, 16, D_H) and memory.dtype == jnp.float32
    assert params["probes"].shape == (16, D_F)
    assert params["output_proj"]["kernel"].shape == (D_F, D_H)
    assert sorted(k for k in params if k.startswith("layers_")) == ["layers_0", "layers_1"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    # Memory starts at the RMS of token embeddings (0.02), not at ~0.6 per element.
    assert 0.015 < float(jnp.sqrt(jnp.mean(memory ** 2))) < 0.025


def test_memory_does_not_depend_on_the_order_of_the_feature_pool_or_on_other_examples():
    cfg = SamplerConfig(hidden_size=D_H, num_queries=4, num_heads=4)
    features = _features()
    sampler, params = _init(cfg, features)
    apply = jax.jit(lambda f: sampler.apply({"params": params}, f))
    memory = apply(features)
    flat = features.reshape(2, 15, D_F)[:, np.random.RandomState(1).permutation(15)]
    np.testing.assert_allclose(apply(flat.reshape(2, 5, 3, D_F)), memory, atol=1e-5)
    np.testing.assert_allclose(apply(features[1:]), memory[1:], atol=1e-5)


def test_probes_interact_only_through_query_self_attention():
    features = _features()
    for self_attention in (True, False):
        cfg = SamplerConfig(hidden_size=D_H, num_queries=4, num_heads=4, query_self_attention=self_attention)
        sampler, params = _init(cfg, features)
        # A random direction: a constant shift of a probe would pass every LayerNorm unseen.
        shift = jnp.asarray(np.random.RandomState(2).randn(D_F).astype(np.float32))
        moved = dict(params, probes=params["probes"].at[1].add(shift))
        before = sampler.apply({"params": params}, features)
        after = sampler.apply({"params": moved}, features)
        row0_changed = float(jnp.max(jnp.abs(after[:, 0] - before[:, 0])))
        assert float(jnp.max(jnp.abs(after[:, 1] - before[:, 1]))) > 1e-4
        if self_attention:
            assert row0_changed > 1e-5
        else:
            assert row0_changed == 0.0
        assert ("self_attn" in params["layers_0"]) == self_attention


def test_attention_matches_torch_multihead_attention():
    rng = np.random.RandomState(3)
    q = rng.randn(2, 4, D_F).astype(np.float32)
    kv = rng.randn(2, 7, D_F).astype(np.float32)
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(D_F, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
        expected = ref(torch.tensor(q), torch.tensor(kv), torch.tensor(kv), need_weights=False)[0].numpy()
    w, b = ref.in_proj_weight.detach().numpy(), ref.in_proj_bias.detach().numpy()
    params = {f"{name}_proj": {"kernel": w[i * D_F:(i + 1) * D_F].T, "bias": b[i * D_F:(i + 1) * D_F]}
              for i, name in enumerate("qkv")}
    params["out_proj"] = {"kernel": ref.out_proj.weight.detach().numpy().T,
                          "bias": ref.out_proj.bias.detach().numpy()}
    ours = MultiHeadAttention(4).apply({"params": params}, jnp.asarray(q), jnp.asarray(kv))
    np.testing.assert_allclose(ours, expected, atol=1e-5)
