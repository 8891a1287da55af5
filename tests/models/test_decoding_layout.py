"""`qwen3_vl.params.decoding_layout`, the layout evaluation decodes in: unrolled text layers, float32 LoRA adapters
folded into their kernels, fused q|k|v and gate|up (`Qwen3Config.fused_projections`). It must compute what the
trained model computes: prefill and cached steps of a scanned LoRA model against the decoding layout of the same
weights (float32, max abs diff <= 1e-5 on logits of magnitude ~1); transformers parity of the fused layout is in
test_qwen3_vl (cached decode) and the benchmarks' first-token check."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from tests.hf_reference import save_tiny_qwen3_vl
from tests.models.test_qwen3_vl import IMG, _pixels, _prompt
from vital_jax.layers.linear import LoraConfig
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, get_rope_index, init_cache
from vital_jax.models.qwen3_vl import load_params, vision_inputs
from vital_jax.models.qwen3_vl.params import STACK_PATH, abstract_params, decoding_layout

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("decoding_layout"))
    save_tiny_qwen3_vl(path, seed=21)
    return path


def _with_random_adapters(config, params, lora, seed=0):
    """`params` plus every adapter `lora` adds, all non-zero (lora_b too), so folding them in is exercised."""
    abstract = abstract_params(config, lora)
    rng = np.random.RandomState(seed)
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    leaves = [flat[path] if path in flat else jnp.asarray(0.05 * rng.randn(*leaf.shape).astype(np.float32))
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def _prefill_and_steps(config, params, lora):
    """Logits of a prefill with an image and of three cached steps (two token ids, one input vector): (1, 4, V)."""
    rng = np.random.RandomState(3)
    grids = [(1, 4, 6)]
    ids = _prompt(rng, grids, [3, 4])[None]
    positions, _ = get_rope_index(ids, None, grids, IMG)
    model = Qwen3VLForConditionalGeneration(config, lora)
    out = model.apply({"params": params}, input_ids=jnp.asarray(ids), positions=jnp.asarray(positions),
                      pixel_patches=jnp.asarray(_pixels(rng, grids, config)),
                      vision_inputs=vision_inputs(grids, config.vision),
                      kv_cache=init_cache(config, 1, ids.shape[1] + 4))
    cache, logits = out.kv_cache, [out.logits[:, -1:]]
    for token in rng.randint(0, 180, 2):
        out = model.apply({"params": params}, input_ids=jnp.full((1, 1), token), kv_cache=cache)
        cache, logits = out.kv_cache, logits + [out.logits]
    vector = jnp.asarray(rng.randn(1, 1, config.text.hidden_size).astype(np.float32))
    logits.append(model.apply({"params": params}, inputs_embeds=vector, kv_cache=cache).logits)
    return np.asarray(jnp.concatenate(logits, 1))


def test_decoding_layout_of_a_scanned_lora_model_computes_what_it_computes(checkpoint):
    config = Qwen3VLConfig.from_pretrained(checkpoint, scan_layers=True)
    params = _with_random_adapters(config, load_params(checkpoint, config), LORA)
    want = _prefill_and_steps(config, params, LORA)
    base = _prefill_and_steps(config, {**params, "language_model": jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if p[-1].key == "lora_b" else x, params["language_model"])}, LORA)
    assert np.max(np.abs(want - base)) > 1e-2  # the adapters matter, so folding them in is tested

    dec_config, dec_params, dec_lora = decoding_layout(config, params, LORA)
    assert dec_lora is None and dec_config.text.fused_projections and not dec_config.text.scan_layers
    layer = dec_params["language_model"]["model"]["layers_1"]
    assert sorted(layer["self_attn"]) == ["k_norm", "o_proj", "q_norm", "qkv_proj"]
    assert sorted(layer["mlp"]) == ["down_proj", "gate_up_proj"]
    text = config.text
    assert layer["self_attn"]["qkv_proj"]["kernel"].shape == (
        text.hidden_size, (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim)
    assert not any("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(dec_params)[0])
    got = _prefill_and_steps(dec_config, dec_params, dec_lora)
    assert float(np.max(np.abs(got - want))) <= 1e-5


def test_bfloat16_weights_keep_their_adapters_and_projections(checkpoint):
    """Folding an adapter into a bf16 kernel would round small deltas away (issue #18): the layout keeps them, and
    with them the separate projections that they adapt; it still unrolls."""
    config = Qwen3VLConfig.from_pretrained(checkpoint, scan_layers=True, param_dtype=jnp.bfloat16)
    params = _with_random_adapters(config, load_params(checkpoint, config), LORA)
    dec_config, dec_params, dec_lora = decoding_layout(config, params, LORA)
    assert dec_lora == LORA and not dec_config.text.fused_projections and not dec_config.text.scan_layers
    assert "lora_b" in dec_params["language_model"]["model"]["layers_0"]["self_attn"]["q_proj"]
    # Adapters on the output projections only leave q|k|v and gate|up free to fuse.
    out_only = dataclasses.replace(LORA, targets=("o", "down"))
    params = _with_random_adapters(config, load_params(checkpoint, config), out_only)
    dec_config, dec_params, dec_lora = decoding_layout(config, params, out_only)
    assert dec_lora == out_only and dec_config.text.fused_projections
    assert "lora_a" in dec_params["language_model"]["model"]["layers_0"]["mlp"]["down_proj"]


def test_fused_projections_refuse_adapters_on_their_parts(checkpoint):
    config = Qwen3VLConfig.from_pretrained(checkpoint)
    fused = dataclasses.replace(config, text=dataclasses.replace(config.text, fused_projections=True))
    with pytest.raises(ValueError, match=r"fused_projections: LoRA on \['gate', 'k', 'q', 'up', 'v'\]"):
        Qwen3VLForConditionalGeneration(fused, LORA).init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 2), jnp.int32))
    params = _with_random_adapters(config, load_params(checkpoint, config), LORA)
    with pytest.raises(ValueError, match=r"language_model/model/layers_0/self_attn/q_proj holds \['kernel', 'lora_a'"):
        qwen3_params.fuse_projections(params, STACK_PATH)


def while_bodies_hold(jaxpr, primitive: str, loop: str = "while") -> bool:
    """Whether any `loop` ("while" or "scan") of `jaxpr` (at any depth) runs an equation of `primitive` in its
    body."""
    def contains(jx, name):
        for eqn in jx.eqns:
            if eqn.primitive.name == name:
                return True
            for sub in jaxprs_in_params(eqn.params):
                if contains(sub, name):
                    return True
        return False

    def find(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == loop and any(contains(sub, primitive)
                                                  for sub in jaxprs_in_params(eqn.params)):
                return True
            if any(find(sub) for sub in jaxprs_in_params(eqn.params)):
                return True
        return False

    return find(jaxpr.jaxpr)


def test_decode_relays_a_training_layout_out_inside_the_program(checkpoint):
    """`cached.decode` under jit, from a cache the scanned LoRA model wrote: relaid out its token loop runs no layer
    scan (each step would otherwise slice every layer's weights out of the stacks) and produces the tokens and
    lengths of the training layout; the default relays out unless the mesh splits the weights; a tree already in
    the decoding layout comes back as it is."""
    from vital_jax import generation
    from vital_jax.models.qwen3_vl import cached

    config = Qwen3VLConfig.from_pretrained(checkpoint, scan_layers=True)
    params = _with_random_adapters(config, load_params(checkpoint, config), LORA)
    model = Qwen3VLForConditionalGeneration(config, LORA)
    rng = np.random.RandomState(5)
    grids = [(1, 4, 6)] * 2
    ids = np.stack([_prompt(rng, grids[:1], [3, 4]) for _ in grids])
    prefix = cached.prefix_inputs(ids, np.ones(ids.shape, bool), np.asarray(grids), _pixels(rng, grids, config),
                                  config)
    sampling = generation.SamplingConfig(max_new_tokens=6)

    def run(p, relayout):
        kv_cache, last_hidden = cached.encode_prefix(model, p, prefix, ids.shape[1] + 6)
        return cached.decode(model, p, kv_cache, last_hidden, sampling, relayout=relayout)

    for relayout, scans in ((True, False), (None, False), (False, True)):
        assert while_bodies_hold(jax.make_jaxpr(lambda p: run(p, relayout))(params), "scan") == scans
    # The default (None) keeps weights split over fsdp or tensor as they are.
    for shape, scans in (((1, 2, 1), True), ((1, 1, 2), True), ((2, 1, 1), False)):
        mesh = jax.sharding.AbstractMesh(shape, ("data", "fsdp", "tensor"),
                                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
        with jax.sharding.use_abstract_mesh(mesh):
            assert while_bodies_hold(jax.make_jaxpr(lambda p: run(p, None))(params), "scan") == scans
    want = jax.jit(lambda p: run(p, False))(params)
    got = jax.jit(lambda p: run(p, True))(params)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))

    dec_model, dec_params = cached.decoding_model(model, params)
    assert dec_model.lora is None and dec_model.config.text.fused_projections
    again_model, again_params = cached.decoding_model(dec_model, dec_params)
    assert again_model is dec_model
    assert all(a is b for a, b in zip(jax.tree.leaves(again_params), jax.tree.leaves(dec_params), strict=True))
