"""The attention switch (`attention_impl`): "dot_product" (jax.nn.dot_product_attention) matches the reference
einsums and transformers in float32 (max abs diff <= 1e-4), in prefill, cached decode, padding, Qwen3-VL with images
and the VITAL latent loop; the config carries it to both Qwen3-VL towers (the vision tower's per-slice attention goes
through the same `attend`). "pallas_flash" (JAX's Pallas TPU flash-attention kernels) runs here in Pallas' TPU
interpret mode (`pallas_interpret`): forward and gradients against the reference, Qwen3 prefill and decode and
Qwen3-VL with images against transformers; outside interpret mode on a CPU it refuses with a clear error. "cudnn"
(cuDNN's flash attention, NVIDIA GPUs only) cannot run here: its tests replace the kernel by JAX's XLA formulation of
the same function behind a stand-in that enforces cuDNN's input constraints, so they check what reaches the kernel
(dtype, even lengths, the mask, which calls) and that the padding and routing around it change no number."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.hf_reference import save_tiny_qwen3, save_tiny_qwen3_vl
from tests.models.test_qwen3_vl import IMG, _ours, _pixels, _prompt, _theirs
from vital_jax.layers.attention import ATTENTION_IMPLS, attend, pallas_interpret, query_chunk_for_score_budget
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, init_cache, load_params
from vital_jax.models.qwen3_vl import Qwen3VLConfig
from vital_jax.models.qwen3_vl import load_params as load_vl_params
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from vital_jax.models.qwen3_vl.vision import vision_inputs
from vital_jax.models.qwen3_vl.vision_config import Qwen3VLVisionConfig

TOL = 1e-4


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2), (6, 1)])
def test_dot_product_attend_equals_the_reference_on_every_visible_row(heads, kv_heads):
    """Grouped heads (query head i reads kv head i // (N / K)), a causal mask over a longer cache, padding; rows
    with no visible key are the callers' to mask and are left out."""
    rng = np.random.RandomState(heads * 10 + kv_heads)
    b, t, s, h = 3, 5, 9, 16
    q = jnp.asarray(rng.randn(b, t, heads, h).astype(np.float32))
    k = jnp.asarray(rng.randn(b, s, kv_heads, h).astype(np.float32))
    v = jnp.asarray(rng.randn(b, s, kv_heads, h).astype(np.float32))
    query_slots = np.arange(s - t, s)
    key_valid = rng.rand(b, s) > 0.3
    key_valid[:, -1] = True
    mask = (np.arange(s)[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :]
    ref = attend(q, k, v, jnp.asarray(mask), "xla")
    fused = attend(q, k, v, jnp.asarray(mask), "dot_product")
    assert ref.shape == fused.shape == (b, t, heads * h)
    seen = mask.any(-1)
    assert seen.sum() >= b * t - 2
    assert _diff(np.asarray(fused)[seen], np.asarray(ref)[seen]) <= 1e-5
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attend(q, k, v, jnp.asarray(mask), "flash")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3_gqa4"))
    hf_model = save_tiny_qwen3(path, seed=7, hidden_size=96, num_attention_heads=8, num_key_value_heads=2,
                               head_dim=16, intermediate_size=160, tie_word_embeddings=False)
    config = Qwen3Config.from_pretrained(path, attention_impl="dot_product")
    return hf_model, config, load_params(path, config)


def test_qwen3_with_dot_product_attention_matches_transformers_in_prefill_decode_and_padding(qwen3):
    hf_model, config, params = qwen3
    assert config.attention_impl == "dot_product"
    model = Qwen3ForCausalLM(config)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, config.vocab_size, (2, 10))
    full = jax.jit(lambda p, i: model.apply({"params": p}, input_ids=i))(params, jnp.asarray(ids))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids))
    assert _diff(full.logits, ref.logits) <= TOL
    # Prefill 6 tokens into a longer cache, then one token at a time: the decode path uses the same switch.
    step = jax.jit(lambda p, i, c: model.apply({"params": p}, input_ids=i, kv_cache=c))
    out = step(params, jnp.asarray(ids[:, :6]), init_cache(config, 2, 16))
    logits, cache = [out.logits], out.kv_cache
    for t in range(6, 10):
        out = step(params, jnp.asarray(ids[:, t:t + 1]), cache)
        logits.append(out.logits)
        cache = out.kv_cache
    assert _diff(jnp.concatenate(logits, axis=1), ref.logits) <= TOL
    # Left padding: the padded example equals itself run alone.
    valid = np.ones((2, 10), bool)
    valid[1, :4] = False
    padded = jax.jit(lambda p, i, v: model.apply({"params": p}, input_ids=i, token_valid=v))(
        params, jnp.asarray(ids), jnp.asarray(valid))
    alone = jax.jit(lambda p, i: model.apply({"params": p}, input_ids=i))(params, jnp.asarray(ids[1:, 4:]))
    assert _diff(np.asarray(padded.logits)[1, 4:], alone.logits[0]) <= TOL


def test_qwen3_vl_with_dot_product_attention_matches_transformers_with_images(tmp_path):
    hf_model = save_tiny_qwen3_vl(str(tmp_path), seed=4)
    config = Qwen3VLConfig.from_pretrained(str(tmp_path), attention_impl="dot_product")
    assert config.text.attention_impl == config.vision.attention_impl == "dot_product"
    params = load_vl_params(str(tmp_path), config)
    rng = np.random.RandomState(1)
    grids = [(1, 4, 6), (1, 8, 4)]
    rows = [_prompt(rng, grids[:1], [3, 5]), _prompt(rng, grids[1:], [2, 3])]
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), np.int64)
    valid = np.zeros((2, width), bool)
    for b, row in enumerate(rows):  # left padding
        ids[b, width - len(row):], valid[b, width - len(row):] = row, True
    pixels = _pixels(rng, grids, config)
    ours = _ours(config, params, ids, valid, grids, pixels)
    theirs = _theirs(hf_model, ids, valid, grids, pixels)
    assert _diff(np.asarray(ours.logits)[valid], theirs.logits.numpy()[valid]) <= TOL
    assert int((ids == IMG).sum()) == sum(t * h * w // 4 for t, h, w in grids)


def test_vital_latent_loop_with_dot_product_attention_equals_the_reference(tmp_path):
    """Training forward (prefix, latent scan, teacher-forced answer, all three terms) and inference: the same
    numbers under both implementations."""
    from tests.vital.vital_fixtures import build, forward, make_batch

    tiny = build(tmp_path)
    model = tiny.model
    fused = dataclasses.replace(model, backbone_config=dataclasses.replace(
        model.backbone_config, text=dataclasses.replace(model.backbone_config.text, attention_impl="dot_product")),
        decoder_config=dataclasses.replace(model.decoder_config, attention_impl="dot_product"))
    batch, _ = make_batch(model, seed=2, latent_steps=(1, 3))
    ref, out = forward(model, tiny.params, batch), forward(fused, tiny.params, batch)
    for name in ("loss", "task_per_example", "text_per_example", "visual_per_example", "z", "answer_logits"):
        assert _diff(getattr(out, name), getattr(ref, name)) <= TOL, name
    from vital_jax.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=4)
    gen = [jax.jit(lambda bp, pre, k, m=m: m.generate(bp, pre, k, sampling))(
        tiny.params["backbone"], batch.prefix, batch.latent_steps) for m in (model, fused)]
    np.testing.assert_array_equal(np.asarray(gen[0][0]), np.asarray(gen[1][0]))


def test_attention_impl_is_validated_and_reaches_both_towers(tmp_path):
    save_tiny_qwen3_vl(str(tmp_path), seed=2)
    config = Qwen3VLConfig.from_pretrained(str(tmp_path), attention_impl="dot_product", remat=True)
    assert config.text.attention_impl == config.vision.attention_impl == "dot_product" and config.vision.remat
    assert Qwen3VLConfig.from_pretrained(str(tmp_path)).vision.attention_impl == "xla"
    with pytest.raises(ConfigError, match="attention_impl='flash' is not one of"):
        Qwen3VLConfig.from_pretrained(str(tmp_path), attention_impl="flash")
    with pytest.raises(ConfigError, match="vision_config.*attention_impl='flash' is not one of"):
        Qwen3VLVisionConfig.from_pretrained(str(tmp_path), attention_impl="flash")
    assert ATTENTION_IMPLS == ("xla", "dot_product", "cudnn", "pallas_flash")
    assert Qwen3VLConfig.from_pretrained(str(tmp_path), attention_impl="pallas_flash").vision.attention_impl == \
        "pallas_flash"


# ------------------------------------------------------------------------------------------- pallas_flash
def _masked_case(rng, b, t, s, heads, kv_heads, h):
    q = jnp.asarray(rng.randn(b, t, heads, h).astype(np.float32))
    k = jnp.asarray(rng.randn(b, s, kv_heads, h).astype(np.float32))
    v = jnp.asarray(rng.randn(b, s, kv_heads, h).astype(np.float32))
    query_slots = np.arange(s - t, s)  # the queries are the last t slots of a cache of s (decode: t = 1)
    key_valid = rng.rand(b, s) > 0.3
    key_valid[:, -1] = True
    mask = (np.arange(s)[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :]
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("b, t, s, heads, kv_heads, h", [
    (2, 5, 9, 4, 2, 16),      # GQA, ragged lengths padded to one block, a causal mask with a cache offset
    (1, 1, 20, 4, 4, 32),     # one decode query (the "xla" one-query path, below)
    (1, 130, 133, 2, 1, 16),  # two query blocks and two key blocks (128 + padding)
])
def test_pallas_flash_attend_and_its_gradients_equal_the_reference(b, t, s, heads, kv_heads, h):
    q, k, v, mask = _masked_case(np.random.RandomState(t + s), b, t, s, heads, kv_heads, h)
    seen = jnp.asarray(np.asarray(mask).any(-1))[:, :, None]  # rows with no visible key are the callers' to mask

    def loss(impl, q, k, v):
        return jnp.sum(jnp.where(seen, attend(q, k, v, mask, impl), 0.0) ** 2)

    ref, ref_grads = jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    with pallas_interpret():
        out = jax.jit(lambda q, k, v: attend(q, k, v, mask, "pallas_flash"))(q, k, v)
        val, grads = jax.jit(jax.value_and_grad(functools.partial(loss, "pallas_flash"), argnums=(0, 1, 2)))(q, k, v)
    assert out.shape == (b, t, heads * h)
    assert _diff(np.where(seen, out, 0.0), np.where(seen, attend(q, k, v, mask, "xla"), 0.0)) <= 1e-5
    assert abs(float(val) - float(ref)) <= 1e-4 * abs(float(ref))
    for name, got, want in zip("qkv", grads, ref_grads):
        assert _diff(got, want) <= 1e-4, name


def test_pallas_flash_with_segment_ids_masks_by_segment_without_a_bias_array():
    """Self-attention within groups (the vision tower's frames): same output as the reference with the equality
    mask, and the traced program holds no (B, N, T, S) float array (the bias path would)."""
    rng = np.random.RandomState(4)
    b, t, heads, h = 2, 40, 2, 16
    q, k, v = (jnp.asarray(rng.randn(b, t, heads, h).astype(np.float32)) for _ in range(3))
    segments = jnp.asarray(np.sort(rng.randint(0, 4, (b, t)), axis=1))
    mask = segments[:, :, None] == segments[:, None, :]
    ref = attend(q, k, v, mask, "xla")
    fn = jax.jit(lambda q, k, v: attend(q, k, v, mask, "pallas_flash", segment_ids_bt=segments))
    with pallas_interpret():
        out = fn(q, k, v)
        program = str(jax.make_jaxpr(fn)(q, k, v))
    assert _diff(out, ref) <= 1e-5
    assert f"f32[{b},{heads},40,128]" not in program and f"f32[{b},{heads},128,128]" not in program
    with pallas_interpret():  # the mask path does build one: the check above can fail
        assert f"f32[{b},{heads},40,128]" in str(jax.make_jaxpr(lambda q, k, v: attend(q, k, v, mask,
                                                                                      "pallas_flash"))(q, k, v))


def test_pallas_flash_outside_interpret_mode_needs_a_tpu():
    """The commands check when they build the model (`run.build_model`); compiling the kernel on a CPU outside
    interpret mode fails in JAX's own words."""
    from vital_jax.layers.attention import check_backend
    from vital_jax.run import build_model

    for impl in ("xla", "dot_product"):
        check_backend(impl)
    message = ("attention_impl='pallas_flash' is JAX's Pallas TPU flash-attention kernel and needs a TPU "
               ".*pallas_interpret")
    with pytest.raises(ValueError, match=message):
        check_backend("pallas_flash")
    with pallas_interpret():
        check_backend("pallas_flash")
    config = type("Config", (), {})()
    config.model = type("Model", (), dict(dtype="float32", param_dtype="float32", remat=False, scan_layers=False,
                                          attention_impl="pallas_flash"))()
    with pytest.raises(ConfigError, match="model.attention_impl: " + message):
        build_model(config, paths=None, roi_dim=4)
    q, k, v, mask = _masked_case(np.random.RandomState(0), 1, 2, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="interpret mode"):
        attend(q, k, v, mask, "pallas_flash")


@pytest.mark.parametrize("impl", ["pallas_flash", "cudnn"])
def test_one_query_under_a_kernel_impl_reads_the_cache_as_it_lies(impl):
    """A decode / latent step under "pallas_flash" or "cudnn" is the "xla" one-query path: the same numbers, and the
    program repeats, pads or transposes no copy of the cache (pallas_flash's kernel inputs would: (B, N, 128, H))."""
    b, s, heads, kv_heads, h = 2, 20, 8, 2, 16
    q, k, v, mask = _masked_case(np.random.RandomState(5), b, 1, s, heads, kv_heads, h)
    if impl == "cudnn":
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    np.testing.assert_array_equal(np.asarray(attend(q, k, v, mask, impl)), np.asarray(attend(q, k, v, mask, "xla")))
    program = str(jax.make_jaxpr(lambda q, k, v: attend(q, k, v, mask, impl))(q, k, v))
    for shape in ((b, heads, 128, h), (b, heads, s, h), (b, kv_heads, s, h), (b, kv_heads, h, s)):
        assert f"[{','.join(map(str, shape))}]" not in program, shape
    prefill = str(jax.make_jaxpr(lambda q, k, v: attend(q, k, v, jnp.ones((b, 2, s), bool), "pallas_flash"))(
        jnp.concatenate([q, q], axis=1).astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)))
    assert f"[{b},{heads},128,{h}]" in prefill   # two queries take the kernel: the check above can fail


def test_qwen3_with_pallas_flash_matches_transformers_in_prefill_and_decode(qwen3):
    hf_model, config, params = qwen3
    model = Qwen3ForCausalLM(dataclasses.replace(config, attention_impl="pallas_flash"))
    ids = np.random.RandomState(3).randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids))
    with pallas_interpret():
        step = jax.jit(lambda p, i, c: model.apply({"params": p}, input_ids=i, kv_cache=c))
        out = step(params, jnp.asarray(ids[:, :6]), init_cache(config, 2, 8))
        last = step(params, jnp.asarray(ids[:, 6:]), out.kv_cache)
    assert _diff(jnp.concatenate([out.logits, last.logits], axis=1), ref.logits) <= TOL


def test_qwen3_vl_with_pallas_flash_matches_transformers_with_images(tmp_path):
    """Both towers: the text decoder's causal, left-padded prefill and the vision tower's per-frame attention."""
    hf_model = save_tiny_qwen3_vl(str(tmp_path), seed=4)
    config = Qwen3VLConfig.from_pretrained(str(tmp_path), attention_impl="pallas_flash")
    params = load_vl_params(str(tmp_path), config)
    rng = np.random.RandomState(1)
    grids = [(1, 4, 6)]
    rows = [_prompt(rng, grids, [3, 5]), _prompt(rng, grids, [2, 3])]
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), np.int64)
    valid = np.zeros((2, width), bool)
    for b, row in enumerate(rows):  # left padding
        ids[b, width - len(row):], valid[b, width - len(row):] = row, True
    pixels = _pixels(rng, grids * 2, config)
    with pallas_interpret():
        ours = _ours(config, params, ids, valid, grids * 2, pixels)
    theirs = _theirs(hf_model, ids, valid, grids * 2, pixels)
    assert _diff(np.asarray(ours.logits)[valid], theirs.logits.numpy()[valid]) <= TOL


def test_qwen3_vl_vision_tower_with_pallas_flash_uses_segment_ids_for_images_of_several_sizes(tmp_path):
    """Frames of different sizes (no per-frame attention): the kernel masks by segment id (no (N, N) bias), padding
    patches included; image features equal transformers'."""
    hf_model = save_tiny_qwen3_vl(str(tmp_path), seed=5)
    config = Qwen3VLConfig.from_pretrained(str(tmp_path), attention_impl="pallas_flash")
    params = load_vl_params(str(tmp_path), config)
    grids = [(1, 4, 6), (1, 8, 4)]
    pixels = _pixels(np.random.RandomState(2), grids, config)
    real = sum(t * h * w for t, h, w in grids)
    inputs = vision_inputs(grids, config.vision, pad_to=real + 8)
    assert inputs.frame_patches == 0
    padded = np.concatenate([pixels, np.zeros((8, pixels.shape[1]), np.float32)])
    model = Qwen3VLForConditionalGeneration(config)
    with pallas_interpret():
        embeds, deepstack = jax.jit(lambda p, x, v: model.apply({"params": p}, x, v, method=model.encode_images))(
            params, jnp.asarray(padded), inputs)
    with torch.no_grad():
        ref = hf_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    merged = real // config.vision.merge_unit
    assert _diff(np.asarray(embeds)[:merged], ref.pooler_output.numpy()) <= TOL
    for ours, theirs in zip(deepstack, ref.deepstack_features):
        assert _diff(np.asarray(ours)[:merged], theirs.numpy()) <= TOL


# --------------------------------------------------------------------------------------------- query blocks
def test_xla_attention_in_query_blocks_equals_one_block_with_masks_and_gradients():
    """Blocks of 4 queries over 11 (the last block shorter), a causal mask over a longer cache, GQA: the same
    output and gradients as one block."""
    q, k, v, mask = _masked_case(np.random.RandomState(5), 2, 11, 15, 4, 2, 16)
    seen = jnp.asarray(np.asarray(mask).any(-1))[:, :, None]

    def loss(chunk, q, k, v):
        return jnp.sum(jnp.where(seen, attend(q, k, v, mask, "xla", query_chunk=chunk), 0.0) ** 2)

    whole, whole_grads = jax.value_and_grad(functools.partial(loss, 0), argnums=(0, 1, 2))(q, k, v)
    blocked, blocked_grads = jax.jit(jax.value_and_grad(functools.partial(loss, 4), argnums=(0, 1, 2)))(q, k, v)
    assert _diff(attend(q, k, v, mask, "xla", query_chunk=4), attend(q, k, v, mask, "xla")) <= 1e-6
    assert abs(float(blocked) - float(whole)) <= 1e-5 * abs(float(whole))
    for got, want in zip(blocked_grads, whole_grads):
        assert _diff(got, want) <= 1e-5
    # The blocks are real: the traced program attends 3 times.
    program = str(jax.make_jaxpr(lambda q: attend(q, k, v, mask, "xla", query_chunk=4))(q))
    assert program.count("exp") == 3 and str(jax.make_jaxpr(lambda q: attend(q, k, v, mask, "xla"))(q)).count(
        "exp") == 1


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_xla_attention_of_one_query_equals_the_general_path_with_gradients(heads, kv_heads):
    """One query position (decode and latent steps) takes `_xla_attend_one_query`, which reads the cache as a
    (B, S, K H) matrix against a block-diagonal query; the general path is reached with the same query written
    twice (T = 2): the same output and gradients, in float32 and bfloat16."""
    q, k, v, mask = _masked_case(np.random.RandomState(heads + kv_heads), 3, 1, 13, heads, kv_heads, 16)

    def one(q, k, v):
        return attend(q, k, v, mask, "xla")

    def general(q, k, v):
        return attend(jnp.concatenate([q, q], 1), k, v, jnp.concatenate([mask, mask], 1), "xla")[:, :1]

    transposed = [e.invars[0].aval.size for e in jax.make_jaxpr(one)(q, k, v).jaxpr.eqns
                  if e.primitive.name == "transpose"]
    assert max(transposed, default=0) < k.size  # no copy of the cache: only q and the probabilities move
    assert _diff(jax.jit(one)(q, k, v), general(q, k, v)) <= 1e-6
    weights = jnp.asarray(np.random.RandomState(1).randn(3, 1, heads * 16).astype(np.float32))
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v) for f in (one, general)]
    for got, want in zip(*grads):
        assert _diff(got, want) <= 1e-5
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got16 = attend(q16, k16, v16, mask, "xla", jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16
    assert _diff(got16, general(q16, k16, v16)) <= 2e-2


def test_score_budget_gives_the_fewest_equal_query_blocks_that_fit():
    mib = 2 ** 20
    # 2 frames x 8 heads x 784^2 float32 scores = 37.5 MiB: two blocks of 392 rows under 20 MiB, one under 40.
    assert query_chunk_for_score_budget(2, 8, 784, 784, 20 * mib) == 392
    assert query_chunk_for_score_budget(2, 8, 784, 784, 40 * mib) == 0
    assert query_chunk_for_score_budget(4, 8, 784, 784, 20 * mib) == 196
    assert query_chunk_for_score_budget(1, 1, 10, 10, 4 * 10 * 3) == 3  # 3 rows (120 bytes) per block, 4 blocks
    assert query_chunk_for_score_budget(2, 8, 784, 784, 0) == 0


@pytest.mark.parametrize("backend, blocks", [("cpu", True), ("gpu", False), ("tpu", False)])
def test_the_default_score_budget_splits_the_vision_attention_on_cpus_only(monkeypatch, backend, blocks):
    """attention_score_block_mib=None (the default): CPU_SCORE_BLOCK_MIB of float32 scores per block on a CPU
    backend, one block on accelerators; an explicit budget applies everywhere."""
    from vital_jax.layers import attention
    from vital_jax.models.qwen3_vl.vision import VisionAttention

    assert {f.name: f.default for f in dataclasses.fields(Qwen3VLVisionConfig)}["attention_score_block_mib"] is None
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert attention.default_score_block_mib() == (attention.CPU_SCORE_BLOCK_MIB if blocks else 0.0)
    frames, patches, heads, head_dim = 4, 784, 4, 8   # 4 x 4 x 784^2 float32 scores: 37.5 MiB, two 20 MiB blocks
    x = jnp.zeros((frames * patches, heads * head_dim))
    cos, sin = jnp.ones((frames * patches, head_dim)), jnp.zeros((frames * patches, head_dim))
    mask, segments = jnp.ones((frames, patches, patches), bool), jnp.zeros((frames, patches), jnp.int32)
    for budget, softmaxes in ((None, 2 if blocks else 1), (0.0, 1), (1.0, 38)):
        layer = VisionAttention(heads, score_block_mib=budget)
        params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, cos, sin, mask, segments)
        program = str(jax.make_jaxpr(layer.apply)(params, x, cos, sin, mask, segments))
        assert program.count(" exp ") == softmaxes, (budget, program.count(" exp "))


@pytest.mark.parametrize("frame_attention", [True, False])
@pytest.mark.parametrize("blocks_from", ["attention_query_chunk", "attention_score_block_mib"])
def test_vision_tower_with_query_blocks_matches_transformers(tmp_path, frame_attention, blocks_from):
    """`attention_query_chunk` (8 rows) or `attention_score_block_mib` (a budget that asks for blocks) reaches
    the vision tower only (the text config has no such field), splits its attention into blocks and keeps its
    features equal to transformers', per frame and with the block-diagonal mask of mixed sizes."""
    hf_model = save_tiny_qwen3_vl(str(tmp_path), seed=6)
    value = 8 if blocks_from == "attention_query_chunk" else 1e-3  # 1 KiB: several blocks of any tiny frame's scores
    config = Qwen3VLConfig.from_pretrained(str(tmp_path), frame_attention=frame_attention, **{blocks_from: value})
    assert getattr(config.vision, blocks_from) == value and not hasattr(config.text, blocks_from)
    params = load_vl_params(str(tmp_path), config)
    grids = [(1, 4, 6), (1, 4, 6)] if frame_attention else [(1, 4, 6), (1, 8, 4)]
    pixels = _pixels(np.random.RandomState(3), grids, config)
    inputs = vision_inputs(grids, config.vision)
    assert bool(inputs.frame_patches) == frame_attention
    model = Qwen3VLForConditionalGeneration(config)
    embeds, deepstack = jax.jit(lambda p, x, v: model.apply({"params": p}, x, v, method=model.encode_images))(
        params, jnp.asarray(pixels), inputs)
    with torch.no_grad():
        ref = hf_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    assert _diff(embeds, ref.pooler_output.numpy()) <= TOL
    for ours, theirs in zip(deepstack, ref.deepstack_features):
        assert _diff(ours, theirs.numpy()) <= TOL
    # The blocks are real: each layer's attention has more than one softmax.
    program = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, inputs, method=model.encode_images))(
        params, jnp.asarray(pixels)))
    assert program.count(" exp ") > config.vision.depth
    with pytest.raises(ConfigError, match="attention_query_chunk=-1 must be >= 0"):
        Qwen3VLConfig.from_pretrained(str(tmp_path), attention_query_chunk=-1)
    with pytest.raises(ConfigError, match="attention_score_block_mib=-1 must be >= 0"):
        Qwen3VLConfig.from_pretrained(str(tmp_path), attention_score_block_mib=-1)


# ------------------------------------------------------------------------------------------------- cudnn
@pytest.fixture
def cudnn_stand_in(monkeypatch):
    """`jax.nn.dot_product_attention(implementation="cudnn")` computed by its "xla" implementation, after the checks
    cuDNN's bf16/fp16 flash kernels make (jax's cudnn/fused_attention_stablehlo: dtype, head dim, even T and S with a
    bias in training) and those of the call this module must make (a (B, 1, T, S) bool mask or none, the kernel
    asked for by name). Returns the list of (q shape, k shape, whether a mask was given) of every such call; other
    calls pass through."""
    original = jax.nn.dot_product_attention
    calls = []

    def stand_in(query, key, value, *, mask=None, implementation=None, **kwargs):
        if implementation != "cudnn":   # "dot_product", the references
            return original(query, key, value, mask=mask, implementation=implementation, **kwargs)
        assert query.dtype == key.dtype == value.dtype and query.dtype in (jnp.bfloat16, jnp.float16)
        (b, t, _, h), s = query.shape, key.shape[1]
        assert h <= 256 and h % 8 == 0 and not kwargs, (query.shape, key.shape, kwargs)
        if mask is not None:   # a bias: even lengths only
            assert t % 2 == 0 and s % 2 == 0, (query.shape, key.shape)
            assert mask.dtype == jnp.bool_ and mask.shape == (b, 1, t, s)
        calls.append((query.shape, key.shape, mask is not None))
        return original(query, key, value, mask=mask, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    return calls


def _bf16_case(seed, b, t, s, heads, kv_heads, h):
    return tuple(x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
                 for x in _masked_case(np.random.RandomState(seed), b, t, s, heads, kv_heads, h))


@pytest.mark.parametrize("t, s, heads, kv_heads", [(5, 9, 4, 2), (6, 8, 8, 2), (7, 7, 4, 4), (4, 11, 6, 1)])
def test_cudnn_attend_pads_odd_lengths_and_equals_dot_product_forward_and_backward(cudnn_stand_in, t, s, heads,
                                                                                      kv_heads):
    q, k, v, mask = _bf16_case(t * 100 + s, 2, t, s, heads, kv_heads, 16)
    seen = np.asarray(mask).any(-1)

    def loss(impl, q, k, v):
        out = attend(q, k, v, mask, impl).astype(jnp.float32)
        return jnp.sum(jnp.where(jnp.asarray(seen)[:, :, None], out, 0.0) ** 2), out

    (_, ours), grads = jax.value_and_grad(functools.partial(loss, "cudnn"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, ref), ref_grads = jax.value_and_grad(functools.partial(loss, "dot_product"), argnums=(0, 1, 2),
                                             has_aux=True)(q, k, v)
    assert cudnn_stand_in == [((2, t + t % 2, heads, 16), (2, s + s % 2, kv_heads, 16), True)]
    # The extra key is masked (weight exactly 0) and the extra query row dropped: the same bf16 numbers.
    assert _diff(np.asarray(ours)[seen], np.asarray(ref)[seen]) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert g.dtype == jnp.bfloat16 and _diff(g, r) <= 1e-6
    # And the float32 reference, within bfloat16's resolution.
    f32 = attend(*(x.astype(jnp.float32) for x in (q, k, v)), mask, "xla")
    assert _diff(np.asarray(ours)[seen], np.asarray(f32)[seen]) <= 3e-2


def test_cudnn_takes_the_xla_one_query_path_for_a_decode_step_and_refuses_float32(cudnn_stand_in):
    q, k, v, mask = _bf16_case(3, 2, 1, 12, 8, 2, 16)
    np.testing.assert_array_equal(np.asarray(attend(q, k, v, mask, "cudnn")), np.asarray(attend(q, k, v, mask, "xla")))
    assert cudnn_stand_in == []
    q32, k32, v32, mask = _masked_case(np.random.RandomState(0), 1, 4, 6, 2, 2, 8)
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs bfloat16 or float16 .* got float32"):
        attend(q32, k32, v32, mask, "cudnn")


def test_cudnn_needs_an_nvidia_gpu():
    from vital_jax.layers.attention import check_backend

    with pytest.raises(ValueError, match="attention_impl='cudnn' is cuDNN's fused flash attention and needs an "
                                         "NVIDIA GPU .*'cpu'"):
        check_backend("cudnn")


def test_qwen3_vl_in_bfloat16_with_cudnn_equals_dot_product_through_the_kernel_in_both_towers(tmp_path,
                                                                                              cudnn_stand_in):
    """A prefill (every attention has several queries, so each layer of both towers calls the kernel) gives
    dot_product's bf16 numbers."""
    save_tiny_qwen3_vl(str(tmp_path), seed=4)
    configs = {impl: Qwen3VLConfig.from_pretrained(str(tmp_path), attention_impl=impl, dtype="bfloat16")
               for impl in ("cudnn", "dot_product")}
    params = load_vl_params(str(tmp_path), configs["cudnn"])
    rng = np.random.RandomState(1)
    grids = [(1, 4, 6), (1, 8, 4)]
    rows = [_prompt(rng, grids[:1], [3, 5]), _prompt(rng, grids[1:], [2, 4])]
    width = max(len(r) for r in rows)
    ids, valid = np.zeros((2, width), np.int64), np.zeros((2, width), bool)
    for b, row in enumerate(rows):  # left padding
        ids[b, width - len(row):], valid[b, width - len(row):] = row, True
    pixels = _pixels(rng, grids, configs["cudnn"])
    ours = _ours(configs["cudnn"], params, ids, valid, grids, pixels)
    ref = _ours(configs["dot_product"], params, ids, valid, grids, pixels)
    assert _diff(np.asarray(ours.logits)[valid], np.asarray(ref.logits)[valid]) <= 1e-6
    vision, text = configs["cudnn"].vision, configs["cudnn"].text
    text_calls = [k_shape for q_shape, k_shape, _ in cudnn_stand_in if q_shape[0] == 2]   # the vision tower: 1 row
    assert len(text_calls) == text.num_hidden_layers and all(k[2] == text.num_key_value_heads for k in text_calls)
    assert len(cudnn_stand_in) - len(text_calls) >= vision.depth   # per layer, each group of equal-sized frames
    assert all(q_shape[1] > 1 for q_shape, _, _ in cudnn_stand_in)


@pytest.mark.parametrize("t, s", [(5, 9), (6, 8)])
def test_cudnn_without_a_mask_calls_the_kernel_without_a_bias_at_any_length(cudnn_stand_in, t, s):
    """mask None (every key visible): no padding and no bias reach the kernel (cuDNN's even-length rule is for a
    bias); forward and gradients equal dot_product's with an all-True mask."""
    q, k, v, _ = _bf16_case(t * 10 + s, 2, t, s, 4, 2, 16)
    everything = jnp.ones((2, t, s), bool)

    def loss(impl, mask, q, k, v):
        out = attend(q, k, v, mask, impl).astype(jnp.float32)
        return jnp.sum(out ** 2), out

    (_, ours), grads = jax.value_and_grad(functools.partial(loss, "cudnn", None), argnums=(0, 1, 2),
                                          has_aux=True)(q, k, v)
    (_, ref), ref_grads = jax.value_and_grad(functools.partial(loss, "dot_product", everything), argnums=(0, 1, 2),
                                             has_aux=True)(q, k, v)
    assert cudnn_stand_in == [((2, t, 4, 16), (2, s, 2, 16), False)]
    assert _diff(ours, ref) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert _diff(g, r) <= 1e-6
    # The other impls read None as "every key visible" too.
    for impl in ("xla", "dot_product"):
        f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
        assert _diff(attend(*f32, None, impl), attend(*f32, everything, "xla")) <= 1e-6


def test_vision_frames_under_cudnn_reach_the_kernel_without_a_mask(tmp_path, cudnn_stand_in):
    """Equal-sized frames (per-frame attention) give the kernel no mask at all; frames of several sizes keep the
    block-diagonal mask as a bias. Both equal dot_product's bf16 features."""
    save_tiny_qwen3_vl(str(tmp_path), seed=6)
    for grids, masked in ([(1, 4, 6), (1, 4, 6)], False), ([(1, 4, 6), (1, 8, 4)], True):
        features = {}
        for impl in ("cudnn", "dot_product"):
            config = Qwen3VLConfig.from_pretrained(str(tmp_path), attention_impl=impl, dtype="bfloat16",
                                                   frame_attention=True)
            params = load_vl_params(str(tmp_path), config)
            inputs = vision_inputs(grids, config.vision)
            assert bool(inputs.frame_patches) != masked
            model = Qwen3VLForConditionalGeneration(config)
            pixels = _pixels(np.random.RandomState(3), grids, config)
            if impl == "cudnn":
                cudnn_stand_in.clear()   # loading traced the model on shapes of its own
            features[impl] = model.apply({"params": params}, jnp.asarray(pixels), inputs,
                                         method=model.encode_images)[0]
        assert _diff(features["cudnn"], features["dot_product"]) <= 1e-6
        assert len(cudnn_stand_in) == config.vision.depth
        assert {has_mask for _, _, has_mask in cudnn_stand_in} == {masked}
