"""`scan_layers`: decoder layers as one nn.scan over stacked parameters, against transformers and the loop layout.

The scan layout must be a pure re-layout: converted from the same HF checkpoint it gives transformers' logits
(float32, max abs diff <= 1e-4), through the KV cache too, and its gradients equal the loop layout's.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_reference import prefill_then_vector_steps, save_tiny_qwen3, save_tiny_qwen3_vl
from tests.models.test_qwen3_vl import CONFIGS as VL_CONFIGS, IMG, _pixels, _prompt, _theirs
from vital_jax import sharding
from vital_jax.layers.linear import LoraConfig
from vital_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, get_rope_index, vision_inputs
from vital_jax.models.qwen3_vl import init_cache as vl_init_cache
from vital_jax.models.qwen3_vl import params as vl_params
from vital_jax.vital import trainable

TOL = 1e-4


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3_scan"))
    hf_model = save_tiny_qwen3(path, seed=11, tie_word_embeddings=False, num_hidden_layers=3)
    config = Qwen3Config.from_pretrained(path, scan_layers=True)
    return hf_model, config, qwen3_params.load_params(path, config), path


def test_scan_layout_stacks_every_layer_and_round_trips(qwen3):
    _, config, params, path = qwen3
    assert "layers_0" not in params["model"]
    q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (3, config.hidden_size, config.num_attention_heads * config.head_dim)
    loop = qwen3_params.load_params(path, dataclasses.replace(config, scan_layers=False))
    np.testing.assert_array_equal(q[1], loop["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"])
    back = qwen3_params.to_layout(params, scan_layers=False)
    assert jax.tree.structure(back) == jax.tree.structure(loop)
    jax.tree.map(np.testing.assert_array_equal, back, loop)
    # The layout the model itself initialises is the one the loader produces.
    abstract = qwen3_params.abstract_params(config)
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(np.shape, params)


def test_scanned_qwen3_matches_transformers_full_and_cached(qwen3):
    hf_model, config, params, _ = qwen3
    rng = np.random.RandomState(0)
    ids = rng.randint(0, config.vocab_size, (2, 6))
    vectors = rng.randn(2, 2, config.hidden_size).astype(np.float32)
    model = Qwen3ForCausalLM(config)
    full = model.apply({"params": params}, input_ids=jnp.asarray(ids))
    out, ours, cache, ref_prefill, theirs = prefill_then_vector_steps(model, params, hf_model, ids, vectors, 9)
    assert _diff(full.logits, ref_prefill) <= TOL
    assert _diff(out.logits, ref_prefill) <= TOL
    assert _diff(ours, theirs) <= TOL
    assert cache.k.shape[0] == config.num_hidden_layers and int(cache.index) == 8


def test_scanned_remat_gradients_equal_the_loop_layout_with_lora(qwen3):
    """Loss and every gradient (base weights and LoRA adapters) agree between layouts, remat on for the scan."""
    _, config, params, _ = qwen3
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (2, 7)))
    loop_config = dataclasses.replace(config, scan_layers=False)
    loop_model = Qwen3ForCausalLM(loop_config, lora)
    loop_params = loop_model.init(jax.random.PRNGKey(0), ids)["params"]
    # Non-zero adapters, so their gradients and their effect on the loss are both exercised.
    loop_params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if getattr(p[-1], "key", "") == "lora_b" else x, loop_params)
    scan_params = qwen3_params.to_layout(loop_params, scan_layers=True)

    def loss(p, cfg):
        logits = Qwen3ForCausalLM(cfg, lora).apply({"params": p}, input_ids=ids).logits
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1]) * jax.nn.one_hot(ids[:, 1:], cfg.vocab_size))

    loss_and_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    loop_loss, loop_grads = loss_and_grads(loop_params, loop_config)
    scan_loss, scan_grads = loss_and_grads(scan_params, dataclasses.replace(config, remat=True))
    assert abs(float(loop_loss) - float(scan_loss)) <= 1e-6
    scan_grads = qwen3_params.to_layout(scan_grads, scan_layers=False)
    assert jax.tree.structure(scan_grads) == jax.tree.structure(loop_grads)
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: _diff(a, b) / (float(jnp.max(jnp.abs(a))) + 1e-12),
                                             loop_grads, scan_grads)))
    assert worst <= 1e-5


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    """Deepstack into decoder layers 0 and 2 of 4: the scan must add them inside the loop at the right layers."""
    path = str(tmp_path_factory.mktemp("qwen3_vl_scan"))
    hf_model = save_tiny_qwen3_vl(path, seed=5, **VL_CONFIGS["deep_gqa4_tied"])
    config = Qwen3VLConfig.from_pretrained(path, scan_layers=True)
    return hf_model, config, vl_params.load_params(path, config)


def test_scanned_qwen3_vl_with_deepstack_matches_transformers_and_caches(qwen3_vl):
    hf_model, config, params = qwen3_vl
    assert config.text.scan_layers and not hasattr(config.vision, "scan_layers")
    assert params["language_model"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 4
    rng = np.random.RandomState(3)
    grids = [(1, 4, 6)]
    ids = _prompt(rng, grids, [3, 4])[None]
    valid = np.ones(ids.shape, bool)
    pixels = _pixels(rng, grids, config)
    positions, _ = get_rope_index(ids, valid, grids, IMG)
    model = Qwen3VLForConditionalGeneration(config)
    images = dict(pixel_patches=jnp.asarray(pixels), vision_inputs=vision_inputs(grids, config.vision))
    full = model.apply({"params": params}, input_ids=jnp.asarray(ids), token_valid=jnp.asarray(valid),
                       positions=jnp.asarray(positions), **images)
    cached = model.apply({"params": params}, input_ids=jnp.asarray(ids), token_valid=jnp.asarray(valid),
                         positions=jnp.asarray(positions), kv_cache=vl_init_cache(config, 1, ids.shape[1] + 2),
                         **images)
    theirs = _theirs(hf_model, ids, valid, grids, pixels)
    assert _diff(full.logits, theirs.logits) <= TOL
    assert _diff(cached.logits, theirs.logits) <= TOL
    # The loop layout of the same weights gives the same cache contents.
    loop_config = vl_params.loop_layout_config(config)
    loop = Qwen3VLForConditionalGeneration(loop_config).apply(
        {"params": vl_params.to_layout(params, scan_layers=False)}, input_ids=jnp.asarray(ids),
        token_valid=jnp.asarray(valid), positions=jnp.asarray(positions),
        kv_cache=vl_init_cache(loop_config, 1, ids.shape[1] + 2), **images)
    loop_cache = loop.kv_cache.stacked()  # laid out per layer, like the loop's layers
    assert _diff(loop_cache.k, cached.kv_cache.k) <= TOL and _diff(loop_cache.v, cached.kv_cache.v) <= TOL


def test_stacked_parameters_shard_like_their_layers_and_decay_like_them():
    """The sharding rules, the weight-decay mask and LoRA merging see through the leading layer axis."""
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    axes = sharding.param_logical_axes("backbone/language_model/model/layers/self_attn/q_proj/kernel", (3, 8, 8))
    assert axes == ("layers", "embed", "heads")
    spec, notes = sharding.spec_for(axes, (3, 8, 8), mesh)
    assert tuple(spec) == (None, "fsdp", "tensor") and not notes
    assert sharding.param_logical_axes("decoder/model/layers/input_layernorm/scale", (3, 8)) == ("layers", "norm")

    tree = {"model": {"layers": {"input_layernorm": {"scale": jnp.ones((3, 8))},
                                 "mlp": {"up_proj": {"kernel": jnp.ones((3, 8, 4))}}},
                      "norm": {"scale": jnp.ones((8,))}}}
    mask = trainable.weight_decay_mask(tree)
    assert mask["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert not mask["model"]["layers"]["input_layernorm"]["scale"] and not mask["model"]["norm"]["scale"]
    assert not trainable.weight_decay_mask({"pause_embeddings": jnp.ones((3, 8))})["pause_embeddings"]  # documented

    rng = np.random.RandomState(0)
    lora = LoraConfig(rank=2, alpha=4.0)
    stacked = {name: rng.randn(*shape).astype(np.float32) for name, shape in
               (("kernel", (3, 5, 4)), ("lora_a", (3, 5, 2)), ("lora_b", (3, 2, 4)))}
    merged = trainable.merge_lora({"proj": stacked}, lora)["proj"]["kernel"]
    for i in range(3):
        one = trainable.merge_lora({"proj": {k: v[i] for k, v in stacked.items()}}, lora)["proj"]["kernel"]
        np.testing.assert_allclose(merged[i], one, rtol=1e-6)


def test_remat_policies_keep_what_they_name(qwen3):
    """What each policy saves for the backward pass: the residuals of `jax.vjp` (the leaves of its backward
    function) that are per-layer activations, (layers, B, T, features). "projections" keeps the projections'
    outputs the backward pass reads, once each (base and adapter summed), and the layer input; "dots" keeps the
    base and adapter products apart (and the rank-r products); "full" only the layer input."""
    _, config, _, _ = qwen3
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    ids = jnp.zeros((2, 7), jnp.int32)
    params = Qwen3ForCausalLM(config, lora).init(jax.random.PRNGKey(0), ids)["params"]
    layers, hidden = config.num_hidden_layers, config.hidden_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size

    def saved_activations(policy):
        cfg = dataclasses.replace(config, remat=True, remat_policy=policy)
        _, backward = jax.vjp(lambda p: Qwen3ForCausalLM(cfg, lora).apply({"params": p}, input_ids=ids).logits, params)
        return sorted(x.shape[-1] for x in jax.tree.leaves(backward) if x.shape[:3] == (layers, 2, 7))

    assert saved_activations("full") == [hidden]
    projections = saved_activations("projections")
    # The layer input, q k v o, gate up; not down's output: it is only added to the residual stream, whose sum
    # the next layer saves as its input.
    assert projections == sorted([hidden, q, kv, kv, hidden, inter, inter])
    dots = saved_activations("dots")
    assert sum(dots) > sum(projections) and dots.count(lora.rank) == 7, dots


def test_remat_policy_is_validated_and_reaches_the_text_decoder_only(tmp_path):
    from vital_jax.models.hf_config import ConfigError
    from vital_jax.models.qwen3.config import REMAT_POLICIES

    save_tiny_qwen3_vl(str(tmp_path), seed=2)
    config = Qwen3VLConfig.from_pretrained(str(tmp_path), remat=True, remat_policy="dots")
    assert config.text.remat_policy == "dots" and config.vision.remat  # the vision tower has no such field
    assert Qwen3VLConfig.from_pretrained(str(tmp_path)).text.remat_policy == "full"
    with pytest.raises(ConfigError, match="remat_policy='offload' is not one of"):
        Qwen3VLConfig.from_pretrained(str(tmp_path), remat_policy="offload")
    assert tuple(REMAT_POLICIES) == ("full", "dots", "projections") and REMAT_POLICIES["full"] is None


def test_lora_a_starts_at_the_same_scale_scanned_or_not(qwen3):
    """Each layer's A ~ U(+-1/sqrt(in)) in both layouts. The stacked (L, in, r) shape was read as a receptive
    field: fan_in = in * L, so scanned adapters started sqrt(L) smaller than unrolled ones (the 8B recipes scan)."""
    from vital_jax.layers.linear import LORA_A_INIT
    from vital_jax.vital.model import add_missing_lora

    _, config, params, _ = qwen3
    lora = LoraConfig(rank=8, alpha=16.0)
    model = Qwen3ForCausalLM(config, lora)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 1), jnp.int32)))
    stacked = add_missing_lora(jax.random.PRNGKey(0), params, abstract["params"])
    a = np.asarray(stacked["model"]["layers"]["self_attn"]["q_proj"]["lora_a"])
    bound = 1 / np.sqrt(config.hidden_size)
    assert a.shape == (3, config.hidden_size, 8)
    for layer in a:  # uniform on +-bound: the largest entry is near the bound, the std bound / sqrt(3)
        assert 0.95 * bound < np.abs(layer).max() <= bound
        assert np.std(layer) == pytest.approx(bound / np.sqrt(3), rel=0.15)
    one = np.asarray(LORA_A_INIT(jax.random.PRNGKey(1), (config.hidden_size, 8)))
    assert 0.95 * bound < np.abs(one).max() <= bound
