"""Qwen3-VL vision tower: parity with transformers' `model.visual` on tiny random checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from vital_jax.models import hf_config, hf_mapping
from vital_jax.models.qwen3_vl.vision import Qwen3VLVisionModel, VisionInputs, num_patches, vision_inputs
from vital_jax.models.qwen3_vl.vision_config import Qwen3VLVisionConfig
from vital_jax.models.qwen3_vl.vision_params import (VISION_RULES, abstract_params, load_vision_params,
                                                     rules_for)

TOL = 1e-4

TEXT = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True})
VISION = {
    # The NOTES.md tiny config: 16x16 patches, 8x8 position table, deepstack after every block.
    "notes": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1]),
    # Odd sizes: 2 heads of 24, 8x8 patches, a 7x7 table (odd side), out size != hidden, deepstack skips block 1.
    "odd": dict(depth=3, hidden_size=48, intermediate_size=80, num_heads=2, patch_size=8, temporal_patch_size=2,
                spatial_merge_size=2, out_hidden_size=40, num_position_embeddings=49,
                deepstack_visual_indexes=[0, 2]),
}


def _build_hf(path, vision: dict, seed: int):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(TEXT, hidden_size=vision["out_hidden_size"])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=190, video_token_id=191,
                           vision_start_token_id=188, vision_end_token_id=189, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # Re-draw every visual tensor at O(1) scale (biases, norm weights and the position table included): with
    # HF's 0.02-std init and unit norms, a mapping that drops or swaps one of them could still pass.
    with torch.no_grad():
        for name, p in model.model.visual.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif "pos_embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(VISION))
def tower(request, tmp_path_factory):
    """(HF model, our config, our params loaded from the saved checkpoint, checkpoint dir)."""
    path = str(tmp_path_factory.mktemp(f"qwen3vl_{request.param}"))
    hf = _build_hf(path, VISION[request.param], seed=len(request.param))
    config = Qwen3VLVisionConfig.from_pretrained(path)
    return hf, config, load_vision_params(path, config), path


def _pixels(config, grid, seed):
    return np.random.default_rng(seed).standard_normal((num_patches(grid), config.patch_dim)).astype(np.float32)


def _hf_visual(hf, pixels, grid):
    with torch.no_grad():
        out = hf.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid))
    return out.pooler_output.numpy(), [d.numpy() for d in out.deepstack_features]


def _assert_matches(ours, reference, rows=slice(None)):
    embeds, deepstack = ours
    ref_embeds, ref_deepstack = reference
    assert len(deepstack) == len(ref_deepstack)
    np.testing.assert_allclose(np.asarray(embeds)[rows], ref_embeds, atol=TOL, rtol=0)
    for k, (a, b) in enumerate(zip(deepstack, ref_deepstack)):
        np.testing.assert_allclose(np.asarray(a)[rows], b, atol=TOL, rtol=0, err_msg=f"deepstack feature {k}")


def test_config_reads_vision_config(tower):
    hf, config, _, _ = tower
    v = hf.config.vision_config
    assert (config.depth, config.hidden_size, config.num_heads, config.out_hidden_size, config.patch_size) == (
        v.depth, v.hidden_size, v.num_heads, v.out_hidden_size, v.patch_size)
    assert config.deepstack_visual_indexes == tuple(v.deepstack_visual_indexes)
    assert config.rope_theta == v.rope_parameters["rope_theta"]


@pytest.mark.parametrize("grid", [((1, 4, 6),), ((1, 2, 2),), ((1, 10, 12),)])
def test_single_image_matches_hf(tower, grid):
    hf, config, params, _ = tower
    pixels = _pixels(config, grid, seed=0)
    ours = Qwen3VLVisionModel(config).apply({"params": params}, jnp.asarray(pixels), grid)
    assert ours[0].shape == (num_patches(grid) // 4, config.out_hidden_size)
    # Outputs of O(1) size, so the absolute tolerance is meaningful.
    assert np.abs(np.asarray(ours[0])).max() > 0.1
    _assert_matches(ours, _hf_visual(hf, pixels, grid))


@pytest.mark.parametrize("grid", [((1, 4, 6), (1, 8, 4)), ((2, 4, 4), (1, 6, 2), (1, 2, 8))])
def test_packed_images_match_hf(tower, grid):
    """Several images (and a two-frame video) in one call: attention is block-diagonal per frame, as in HF."""
    hf, config, params, _ = tower
    pixels = _pixels(config, grid, seed=1)
    ours = jax.jit(Qwen3VLVisionModel(config).apply)({"params": params}, pixels, vision_inputs(grid, config))
    _assert_matches(ours, _hf_visual(hf, pixels, grid))


def test_images_do_not_attend_to_each_other(tower):
    _, config, params, _ = tower
    grid = ((1, 4, 6), (1, 8, 4))
    first = num_patches(grid[:1])
    pixels = _pixels(config, grid, seed=2)
    changed = pixels.copy()
    changed[first:] = _pixels(config, grid[1:], seed=3)
    model = Qwen3VLVisionModel(config)
    a, b = (model.apply({"params": params}, p, grid) for p in (pixels, changed))
    np.testing.assert_array_equal(np.asarray(a[0])[:first // 4], np.asarray(b[0])[:first // 4])
    assert not np.allclose(np.asarray(a[0])[first // 4:], np.asarray(b[0])[first // 4:])


@pytest.mark.parametrize("frame_attention", [False, True])
def test_padded_form_matches_hf_and_compiles_once(tower, frame_attention):
    """One program for every image size under pad_to with frame_attention off; with it on, one per layout (here
    the 4 x 4 image alone fills whole 16-patch frames of the 96 patches: a second program)."""
    hf, config, params, _ = tower
    config = dataclasses.replace(config, frame_attention=frame_attention)
    model = Qwen3VLVisionModel(config)
    traces = []

    @jax.jit
    def encode(params, pixels, inputs):
        traces.append(1)
        return model.apply({"params": params}, pixels, inputs)

    pad_to = 96
    for seed, grid in enumerate([((1, 4, 6), (1, 8, 4)), ((1, 4, 4),), ((2, 2, 6), (1, 6, 6))]):
        real = _pixels(config, grid, seed)
        # Padding patches hold large junk values: they must not leak into the real tokens.
        junk = 100 * np.random.default_rng(seed + 10).standard_normal((pad_to - len(real), config.patch_dim))
        inputs = vision_inputs(grid, config, pad_to=pad_to)
        ours = encode(params, np.concatenate([real, junk.astype(np.float32)]), inputs)
        assert ours[0].shape == (pad_to // 4, config.out_hidden_size)
        valid = np.asarray(inputs.merged_valid(config.merge_unit))
        assert valid.sum() == len(real) // 4 and valid[:len(real) // 4].all()
        _assert_matches(ours, _hf_visual(hf, real, grid), rows=valid)
    assert len(traces) == (2 if frame_attention else 1)


@pytest.mark.parametrize("attention_impl", ["xla", "dot_product"])
def test_slices_attend_within_themselves_and_match_hf(tower, attention_impl):
    """Two slices of 48 patches (each padded), as `distributed.global_vital_batch` packs two batch shards:
    attention per slice gives HF's features for the real patches of each. The slices reuse segment ids 1, 2 on
    purpose: only attention restricted to each slice keeps them apart (one global mask would mix them). Both
    attention implementations (the `attention_impl` switch) give HF's numbers."""
    hf, config, params, _ = tower
    config = dataclasses.replace(config, attention_impl=attention_impl)
    grids = [((1, 4, 6), (1, 4, 4)), ((1, 8, 4),)]
    slices, real = [], []
    for seed, grid in enumerate(grids):
        pixels = _pixels(config, grid, seed)
        inputs = vision_inputs(grid, config, pad_to=48)
        slices.append((np.concatenate([pixels, np.zeros((48 - len(pixels), config.patch_dim), np.float32)]), inputs))
        real.append(pixels)
    both = VisionInputs(**{f: np.concatenate([getattr(v, f) for _, v in slices])
                           for f in ("segment_ids", "positions", "interp_index", "interp_weight")}, num_slices=2)
    ours = jax.jit(Qwen3VLVisionModel(config).apply)({"params": params}, np.concatenate([p for p, _ in slices]), both)
    assert ours[0].shape == (24, config.out_hidden_size)
    for k, (grid, pixels) in enumerate(zip(grids, real)):
        rows = np.zeros(24, bool)
        rows[12 * k:12 * k + len(pixels) // 4] = True
        _assert_matches(ours, _hf_visual(hf, pixels, grid), rows=rows)
    with pytest.raises(ValueError, match="96 patches do not split into num_slices=5"):
        Qwen3VLVisionModel(config).apply({"params": params}, np.concatenate([p for p, _ in slices]),
                                         both.replace(num_slices=5))


@pytest.mark.parametrize("attention_impl", ["xla", "dot_product"])
def test_equal_frames_attend_per_frame_and_match_hf(tower, attention_impl):
    """Frames of one size (two images and a two-frame video of 4 x 6 patches): attention runs per frame with no
    mask (`frame_patches`), padded by whole frames or not at all, and gives HF's features and the masked path's;
    padding that is not a whole number of frames keeps the masked path."""
    hf, config, params, _ = tower
    config = dataclasses.replace(config, attention_impl=attention_impl)
    model = Qwen3VLVisionModel(config)
    grid = ((1, 4, 6), (1, 4, 6), (2, 4, 6))
    real = _pixels(config, grid, seed=4)
    reference = _hf_visual(hf, real, grid)
    apply = jax.jit(model.apply)
    for pad_to, frame_patches in ((None, 24), (144, 24), (128, 0)):
        inputs = vision_inputs(grid, config, pad_to=pad_to)
        assert inputs.frame_patches == frame_patches
        pad = 0 if pad_to is None else pad_to - len(real)
        junk = 100 * np.random.default_rng(5).standard_normal((pad, config.patch_dim)).astype(np.float32)
        pixels = np.concatenate([real, junk])
        ours = apply({"params": params}, pixels, inputs)
        rows = np.asarray(inputs.merged_valid(config.merge_unit))
        _assert_matches(ours, reference, rows=rows)
        masked = apply({"params": params}, pixels, inputs.replace(frame_patches=0))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(masked)):
            np.testing.assert_allclose(np.asarray(a)[rows], np.asarray(b)[rows], atol=1e-5, rtol=0)
    assert vision_inputs(((1, 4, 6), (1, 8, 4)), config).frame_patches == 0  # several frame sizes
    with pytest.raises(ValueError, match="not whole frames of frame_patches=40"):
        model.apply({"params": params}, real, vision_inputs(grid, config).replace(frame_patches=40))


def test_bf16_is_close_to_fp32(tower):
    _, config, params, _ = tower
    grid = ((1, 4, 6), (1, 8, 4))
    pixels = _pixels(config, grid, seed=4)
    ref = Qwen3VLVisionModel(config).apply({"params": params}, pixels, grid)
    bf16 = Qwen3VLVisionConfig.from_hf_dict(_hf_dict(config), dtype="bfloat16", param_dtype="bfloat16")
    params_bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out = Qwen3VLVisionModel(bf16).apply({"params": params_bf16}, pixels, grid)
    assert out[0].dtype == jnp.bfloat16
    for a, b in zip([out[0], *out[1]], [ref[0], *ref[1]]):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.isfinite(a).all()
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max(), np.abs(a - b).max()


def _hf_dict(config: Qwen3VLVisionConfig) -> dict:
    return dict(model_type="qwen3_vl_vision", depth=config.depth, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_heads=config.num_heads,
                out_hidden_size=config.out_hidden_size, num_position_embeddings=config.num_position_embeddings,
                deepstack_visual_indexes=list(config.deepstack_visual_indexes), patch_size=config.patch_size,
                temporal_patch_size=config.temporal_patch_size, spatial_merge_size=config.spatial_merge_size,
                rope_parameters={"rope_type": "axial", "rope_theta": config.rope_theta})


def test_export_round_trip_gives_identical_tensors(tower):
    hf, config, params, _ = tower
    specs = hf_mapping.to_hf_specs({"visual": params}, rules_for(config), np.float32)
    exported = {s.name: s.produce() for s in specs}
    reference = {k: v.numpy() for k, v in hf.state_dict().items() if k.startswith("model.visual.")}
    assert sorted(exported) == sorted(reference)
    for name, tensor in exported.items():
        assert tensor.shape == reference[name].shape, name
        np.testing.assert_array_equal(tensor, reference[name], err_msg=name)


def test_rules_are_prefixed_for_the_full_model():
    assert all(r.hf.startswith(r"model\.visual\.") and r.flax.startswith("visual/") for r in VISION_RULES)


def test_loading_with_a_wrong_config_names_the_tensors(tower):
    _, config, _, path = tower
    deeper = Qwen3VLVisionConfig.from_hf_dict(_hf_dict(config), depth=config.depth + 1)
    with pytest.raises(hf_mapping.ConversionError, match=rf"missing tensor model\.visual\.blocks\.{config.depth}\."):
        load_vision_params(path, deeper)
    wider = Qwen3VLVisionConfig.from_hf_dict(_hf_dict(config), intermediate_size=config.intermediate_size + 4)
    with pytest.raises(hf_mapping.ConversionError, match=r"model\.visual\.blocks\.0\.mlp\.linear_fc1\.weight"):
        load_vision_params(path, wider)


def test_bad_inputs_are_rejected():
    config = Qwen3VLVisionConfig.from_hf_dict(dict(VISION["notes"], model_type="qwen3_vl_vision"))
    with pytest.raises(ValueError, match="multiples of the spatial merge size"):
        vision_inputs(((1, 3, 4),), config)
    with pytest.raises(ValueError, match="pad_to"):
        vision_inputs(((1, 4, 4),), config, pad_to=8)
    with pytest.raises(ValueError, match="pad_to"):
        vision_inputs(((1, 4, 4),), config, pad_to=18)
    with pytest.raises(ValueError, match="triples"):
        vision_inputs((4, 4), config)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(config))
    with pytest.raises(ValueError, match="pixel_patches has shape"):
        Qwen3VLVisionModel(config).apply({"params": params}, jnp.zeros((12, config.patch_dim)), ((1, 4, 4),))
    with pytest.raises(hf_config.ConfigError, match="outside the 2 blocks"):
        Qwen3VLVisionConfig.from_hf_dict(_hf_dict(config), deepstack_visual_indexes=(0, 2))
    with pytest.raises(hf_config.ConfigError, match="perfect square"):
        Qwen3VLVisionConfig.from_hf_dict(_hf_dict(config), num_position_embeddings=60)
    with pytest.raises(hf_config.ConfigError, match="model_type"):
        Qwen3VLVisionConfig.from_hf_dict(dict(_hf_dict(config), model_type="siglip_vision_model"))


def test_full_size_tower_has_hf_names_and_shapes():
    """Qwen3-VL-8B's vision tower, shapes only (HF on the meta device): same tensor names and shapes."""
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as HFVisionModel

    hf_config_8b = Qwen3VLConfig(vision_config=dict(out_hidden_size=4096)).vision_config
    with torch.device("meta"):
        reference = {f"model.visual.{k}": tuple(v.shape) for k, v in HFVisionModel(hf_config_8b).state_dict().items()}
    config = Qwen3VLVisionConfig.from_hf_dict(hf_config_8b.to_dict())
    assert (config.head_dim, config.num_grid_per_side, config.deepstack_visual_indexes) == (72, 48, (8, 16, 24))
    specs = hf_mapping.to_hf_specs({"visual": abstract_params(config)}, rules_for(config), np.float32)
    assert {s.name: tuple(s.shape) for s in specs} == reference
