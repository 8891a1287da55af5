"""Qwen3-VL (vision + MRoPE text decoder + deepstack) against transformers on tiny random checkpoints."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch

from conversion.torch_decoding import cache_keyword
from tests.hf_reference import save_tiny_qwen3_vl
from vital_jax.generation import SamplingConfig
from vital_jax.models.qwen3_vl import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, get_rope_index, init_cache,
                                       load_params, vision_inputs)
from vital_jax.models.qwen3_vl.generate import generate
from vital_jax.models.qwen3_vl.params import decoding_layout

TOL = 1e-4
IMG, VS, VE = 190, 188, 189

CONFIGS = {
    # deepstack after vision blocks 0 and 1, GQA 2, untied head.
    "base": dict(),
    # Other sizes: 3 vision blocks with deepstack on [0, 2], GQA 4, hidden 96, 4 decoder layers, tied head.
    "deep_gqa4_tied": dict(text=dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=24,
                                     intermediate_size=160, num_hidden_layers=4,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                      "mrope_section": [6, 3, 3], "mrope_interleaved": True}),
                           vision=dict(depth=3, hidden_size=48, num_heads=4, intermediate_size=96,
                                       deepstack_visual_indexes=[0, 2], num_position_embeddings=36),
                           tie_word_embeddings=True),
}


def _converted(path, name):
    hf_model = save_tiny_qwen3_vl(str(path), seed=len(name), **CONFIGS[name])
    config = Qwen3VLConfig.from_pretrained(str(path))
    return hf_model, config, load_params(str(path), config)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    return _converted(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _converted(tmp_path_factory.mktemp("base_only"), "base")


def _prompt(rng, grids, text_lens):
    """Random text with each image wrapped in vision_start/end: text0 img0 text1 img1 ... textN."""
    row = list(rng.randint(0, 180, text_lens[0]))
    for grid, n in zip(grids, text_lens[1:]):
        t, h, w = grid
        row += [VS] + [IMG] * (t * h * w // 4) + [VE] + list(rng.randint(0, 180, n))
    return np.asarray(row, np.int64)


def _pixels(rng, grids, config):
    return rng.randn(sum(t * h * w for t, h, w in grids), config.vision.patch_dim).astype(np.float32)


def _ours(config, params, ids, valid, grids, pixels, **kw):
    positions, _ = get_rope_index(ids, valid, grids, IMG)
    fn = jax.jit(lambda p, kw: Qwen3VLForConditionalGeneration(config).apply({"params": p}, **kw))
    args = dict(input_ids=jnp.asarray(ids), token_valid=jnp.asarray(valid), positions=jnp.asarray(positions), **kw)
    if grids:
        args.update(pixel_patches=jnp.asarray(pixels), vision_inputs=vision_inputs(grids, config.vision))
    return fn(params, args)


def _theirs(hf_model, ids, valid, grids, pixels):
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)),
                  mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)), output_hidden_states=True)
    if grids:
        kwargs.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids))
    hf_model.model.rope_deltas = None
    with torch.no_grad():
        return hf_model(**kwargs)


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("case", ["text_only", "one_image", "two_images_of_different_sizes"])
def test_logits_match_transformers(converted, case):
    hf_model, config, params = converted
    rng = np.random.RandomState(0)
    grids = {"text_only": [], "one_image": [(1, 6, 4)], "two_images_of_different_sizes": [(1, 4, 6), (1, 8, 4)]}[case]
    ids = _prompt(rng, grids, [3] + [4] * len(grids))[None]
    valid = np.ones(ids.shape, bool)
    pixels = _pixels(rng, grids, config)
    ours = _ours(config, params, ids, valid, grids, pixels)
    theirs = _theirs(hf_model, ids, valid, grids, pixels)
    assert _diff(ours.logits, theirs.logits) <= TOL
    assert _diff(ours.hidden_states, theirs.hidden_states[-1]) <= TOL


def test_padded_batch_with_different_images_matches_transformers(converted):
    """A batch of two left-padded prompts, each with its own image size (HF handles left padding via the mask)."""
    hf_model, config, params = converted
    rng = np.random.RandomState(1)
    grids = [(1, 4, 4), (1, 6, 8)]
    rows = [_prompt(rng, [grids[0]], [5, 2]), _prompt(rng, [grids[1]], [2, 3])]
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), np.int64)
    valid = np.zeros((2, width), bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], valid[b, width - len(row):] = row, True
    pixels = _pixels(rng, grids, config)
    ours = _ours(config, params, ids, valid, grids, pixels)
    theirs = _theirs(hf_model, ids, valid, grids, pixels)
    assert _diff(np.asarray(ours.logits)[valid], theirs.logits.numpy()[valid]) <= TOL
    # And each example alone gives the same logits as inside the batch.
    offset = 0
    for b, row in enumerate(rows):
        n = grids[b][1] * grids[b][2]
        alone = _ours(config, params, row[None], np.ones((1, len(row)), bool), [grids[b]],
                      pixels[offset:offset + n])
        offset += n
        assert _diff(np.asarray(ours.logits)[b][valid[b]], alone.logits[0]) <= TOL


@pytest.mark.parametrize("layout", ["checkpoint", "decoding"])
def test_cached_decode_with_ids_and_embeddings_matches_transformers(base, layout):
    """Prefill with an image, then steps fed token ids and input vectors at position lengths + rope_delta,
    against transformers' cached path with explicit (3, B, 1) positions; in the layout of the checkpoint and in
    the one evaluation decodes in (`decoding_layout`: fused q|k|v and gate|up)."""
    hf_model, config, params = base
    if layout == "decoding":
        config, params, _ = decoding_layout(config, params)
        assert config.text.fused_projections and "qkv_proj" in params["language_model"]["model"]["layers_0"][
            "self_attn"]
    rng = np.random.RandomState(2)
    grids = [(1, 4, 6)]
    ids = _prompt(rng, grids, [3, 4])[None]
    pixels = _pixels(rng, grids, config)
    positions, delta = get_rope_index(ids, None, grids, IMG)
    steps_ids = rng.randint(0, 180, (1, 2))
    steps_vec = rng.randn(1, 2, config.text.hidden_size).astype(np.float32)

    model = Qwen3VLForConditionalGeneration(config)
    out = model.apply({"params": params}, input_ids=jnp.asarray(ids), positions=jnp.asarray(positions),
                      pixel_patches=jnp.asarray(pixels), vision_inputs=vision_inputs(grids, config.vision),
                      kv_cache=init_cache(config, 1, ids.shape[1] + 4))
    cache, ours = out.kv_cache, [out.logits[:, -1:]]
    assert int(cache.position_offset[0]) == int(delta[0])
    for t in range(2):
        step = model.apply({"params": params}, input_ids=jnp.asarray(steps_ids[:, t:t + 1]), kv_cache=cache)
        cache = step.kv_cache
        ours.append(step.logits)
    for t in range(2):
        step = model.apply({"params": params}, inputs_embeds=jnp.asarray(steps_vec[:, t:t + 1]), kv_cache=cache)
        cache = step.kv_cache
        ours.append(step.logits)

    length = ids.shape[1]
    with torch.no_grad():
        hf_model.model.rope_deltas = None
        ref = hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                       image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor((ids == IMG).astype(int)),
                       use_cache=True)
        keyword = cache_keyword(hf_model)
        past, theirs = getattr(ref, keyword), [ref.logits[:, -1:]]
        for t in range(4):
            pos = torch.full((3, 1, 1), length + t + int(delta[0]))
            kw = (dict(input_ids=torch.tensor(steps_ids[:, t:t + 1])) if t < 2
                  else dict(inputs_embeds=torch.tensor(steps_vec[:, t - 2:t - 1])))
            ref = hf_model(**kw, position_ids=pos, use_cache=True, **{keyword: past})
            past = getattr(ref, keyword)
            theirs.append(ref.logits)
    assert _diff(jnp.concatenate(ours, 1), torch.cat(theirs, 1)) <= TOL

    # The same steps as one full forward (ids only) agree with the cached path.
    full_ids = np.concatenate([ids, steps_ids], axis=1)
    full_pos = np.concatenate([positions, np.arange(length, length + 2)[None, None].repeat(3, 0) + delta[0]], 2)
    full = model.apply({"params": params}, input_ids=jnp.asarray(full_ids), positions=jnp.asarray(full_pos),
                       pixel_patches=jnp.asarray(pixels), vision_inputs=vision_inputs(grids, config.vision))
    assert _diff(full.logits[:, -3:], jnp.concatenate(ours[:3], 1)) <= TOL


def test_greedy_generation_with_image_equals_transformers_generate(converted):
    hf_model, config, params = converted
    rng = np.random.RandomState(3)
    grids = [(1, 4, 4)]
    ids = _prompt(rng, grids, [2, 3])[None]
    pixels = _pixels(rng, grids, config)
    positions, _ = get_rope_index(ids, None, grids, IMG)
    tokens, _ = generate(params, jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, bool), jnp.asarray(positions),
                         jnp.asarray(pixels), vision_inputs(grids, config.vision), config,
                         SamplingConfig(max_new_tokens=8))
    hf_model.model.rope_deltas = None
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                                mm_token_type_ids=torch.tensor((ids == IMG).astype(int)), do_sample=False,
                                max_new_tokens=8, min_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(tokens)[0], ref[0, ids.shape[1]:].numpy())


def test_rope_index_matches_transformers_with_padding(base):
    hf_model, config, _ = base
    rng = np.random.RandomState(4)
    grids = [(1, 4, 8), (1, 6, 2), (1, 2, 2)]
    rows = [_prompt(rng, grids[:2], [2, 3, 1]), _prompt(rng, grids[2:], [4, 2])]
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), np.int64)
    valid = np.zeros((2, width), bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], valid[b, width - len(row):] = row, True
    ours, deltas = get_rope_index(ids, valid, grids, IMG)
    theirs, their_deltas = hf_model.model.get_rope_index(
        torch.tensor(ids), torch.tensor((ids == IMG).astype(int)), torch.tensor(grids),
        attention_mask=torch.tensor(valid.astype(int)))
    np.testing.assert_array_equal(ours[:, valid], theirs.numpy()[:, valid])
    np.testing.assert_array_equal(deltas, their_deltas.numpy().ravel())


def test_image_token_count_mismatch_is_an_error(base):
    _, config, _ = base
    ids = _prompt(np.random.RandomState(5), [(1, 4, 4)], [2, 2])[None]
    with pytest.raises(ValueError, match="grid"):
        get_rope_index(ids, None, [(1, 4, 6)], IMG)
    with pytest.raises(ValueError, match="image grids"):
        get_rope_index(ids, None, [(1, 4, 4), (1, 4, 4)], IMG)


def test_a_tie_flag_in_text_config_alone_is_read_as_transformers_reads_it(tmp_path):
    """transformers ties the head by the top-level tie_word_embeddings only (default False). vital_jax fell back
    to text_config's: such a config was tied here and untied there, the checkpoint's lm_head.weight dropped."""
    import json

    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    save_tiny_qwen3_vl(str(tmp_path), seed=5)  # untied: model.safetensors holds lm_head.weight
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("tie_word_embeddings", None)
    cfg["text_config"]["tie_word_embeddings"] = True
    path.write_text(json.dumps(cfg))
    hf_model = HFQwen3VL.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert not hf_model.config.tie_word_embeddings
    config = Qwen3VLConfig.from_pretrained(str(tmp_path))
    assert not config.text.tie_word_embeddings
    rng = np.random.RandomState(1)
    ids = _prompt(rng, [], [5])[None]
    valid = np.ones(ids.shape, bool)
    ours = _ours(config, load_params(str(tmp_path), config), ids, valid, [], None)
    assert _diff(ours.logits, _theirs(hf_model, ids, valid, [], None).logits) <= TOL
