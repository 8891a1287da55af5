"""SAM (v1) image encoder: parity with transformers (fp32, <= 1e-4) per layer and on the neck output, both
checkpoint layouts, the hf_to_flax conversion, preprocessing, errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import transformers
from conversion import hf_to_flax
from vital_jax.models import model_dir
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.hf_mapping import ConversionError
from vital_jax.models.sam import SamPreprocessor, SamVisionConfig, SamVisionEncoder, load_sam_vision
from vital_jax.models.sam import params as sam_params

ATOL = 1e-4

# 8x8 patch grid, 4x4 windows (no padding), layer 1 global.
TINY_KW = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
               patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=48)
# 6x6 grid with 4x4 windows: the windowed layers pad to 8x8 (padding tokens take part in the attention); no qkv
# bias, tanh GELU, 3 heads of 16, the global layer last, a different LayerNorm eps.
PADDED_KW = dict(hidden_size=48, output_channels=24, num_hidden_layers=3, num_attention_heads=3, image_size=42,
                 patch_size=7, window_size=4, global_attn_indexes=[2], mlp_dim=40, qkv_bias=False,
                 hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values for *every* parameter: HF initialises pos_embed and the relative-position tables to zero,
    and norms to one, so a mis-mapped or ignored one would not show otherwise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.3
            is_norm_scale = "norm" in name and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if is_norm_scale else 0.0))


def _hf_vision(tmp_path, kw, seed=0):
    torch.manual_seed(seed)
    config = transformers.SamVisionConfig(**kw)
    config._attn_implementation = "eager"
    model = transformers.SamVisionModel(config).eval()
    _randomize(model, seed)
    path = str(tmp_path / f"sam_vision_{seed}")
    model.save_pretrained(path)
    return model, path


def _pixels(batch, size, seed=0):
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def _hf_forward(hf_model, pixels_bhwc):
    """(neck output channels-last, per-layer hidden states) from transformers."""
    with torch.no_grad():
        out = hf_model(pixel_values=torch.from_numpy(pixels_bhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
    return out.last_hidden_state.numpy().transpose(0, 2, 3, 1), [h.numpy() for h in out.hidden_states]


def _ours(config, params, pixels_bhwc):
    apply = jax.jit(lambda p, x: SamVisionEncoder(config).apply({"params": p}, x, output_hidden_states=True))
    return apply(params, pixels_bhwc)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("kw,batch", [(TINY_KW, 2), (PADDED_KW, 1)], ids=["tiny", "padded_windows"])
def test_vision_encoder_matches_transformers_per_layer(tmp_path, kw, batch):
    hf, path = _hf_vision(tmp_path, kw)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == "sam_vision_model"
    config, params = load_sam_vision(path)
    grid = kw["image_size"] // kw["patch_size"]
    assert (config.grid_size, config.global_attn_indexes, config.mlp_dim) == (grid, tuple(kw["global_attn_indexes"]),
                                                                               kw["mlp_dim"])
    pixels = _pixels(batch, kw["image_size"])
    out = _ours(config, params, pixels)
    ref_neck, ref_hidden = _hf_forward(hf, pixels)
    assert out.last_hidden_state.shape == (batch, grid, grid, kw["output_channels"])
    assert len(out.hidden_states) == len(ref_hidden) == kw["num_hidden_layers"] + 1
    for i, (ours, ref) in enumerate(zip(out.hidden_states, ref_hidden)):
        assert _max_diff(ours, ref) <= ATOL, f"hidden state {i}"
    assert _max_diff(out.encoder_hidden_state, ref_hidden[-1]) <= ATOL
    assert _max_diff(out.last_hidden_state, ref_neck) <= ATOL
    if batch > 1:  # the examples differ, so a batch-mixing bug in the window reshapes would show
        assert _max_diff(out.last_hidden_state[0], out.last_hidden_state[1]) > 0.1


def test_relative_positions_and_abs_pos_matter(tmp_path):
    """The parity above would be vacuous if the relative-position tables or pos_embed were ignored: zeroing
    each must move the output well beyond the tolerance."""
    _, path = _hf_vision(tmp_path, TINY_KW, seed=1)
    config, params = load_sam_vision(path)
    pixels = _pixels(1, 64, seed=1)
    base = np.asarray(_ours(config, params, pixels).last_hidden_state)
    for zeroed in ("rel_pos_h", "rel_pos_w"):
        changed = jax.tree.map(lambda x: x, params)
        for i in range(config.num_hidden_layers):
            changed[f"layers_{i}"]["attn"][zeroed] = np.zeros_like(params[f"layers_{i}"]["attn"][zeroed])
        assert _max_diff(_ours(config, changed, pixels).last_hidden_state, base) > 100 * ATOL, zeroed
    changed = dict(params, pos_embed=np.zeros_like(params["pos_embed"]))
    assert _max_diff(_ours(config, changed, pixels).last_hidden_state, base) > 100 * ATOL


def test_full_sam_model_layout_loads_and_matches(tmp_path):
    """A full `SamModel` (MedSAM's layout): the prompt encoder and mask decoder are skipped, the image encoder
    matches `SamModel.get_image_embeddings`."""
    torch.manual_seed(2)
    config = transformers.SamConfig(vision_config=PADDED_KW)
    config.vision_config._attn_implementation = "eager"
    hf = transformers.SamModel(config).eval()
    _randomize(hf, 2)
    path = str(tmp_path / "sam_full")
    hf.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == "sam"
    ours_config, params = load_sam_vision(path)
    assert ours_config.qkv_bias is False and ours_config.gelu_approximate
    pixels = _pixels(2, 42, seed=2)
    with torch.no_grad():
        ref = hf.get_image_embeddings(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert _max_diff(_ours(ours_config, params, pixels).last_hidden_state, ref) <= ATOL


def test_hf_to_flax_converts_a_sam_checkpoint(tmp_path):
    hf, path = _hf_vision(tmp_path, TINY_KW, seed=3)
    out_dir = str(tmp_path / "converted")
    summary = hf_to_flax.convert(path, out_dir)
    assert summary["family"] == "sam"
    config = SamVisionConfig.from_pretrained(out_dir)
    params = model_dir.load_params(out_dir, sam_params.abstract_params(config))
    pixels = _pixels(1, 64, seed=3)
    ref_neck, _ = _hf_forward(hf, pixels)
    assert _max_diff(_ours(config, params, pixels).last_hidden_state, ref_neck) <= ATOL


def test_bfloat16_encoder_stays_close(tmp_path):
    hf, path = _hf_vision(tmp_path, TINY_KW, seed=4)
    config, params = load_sam_vision(path, dtype="bfloat16")
    pixels = _pixels(1, 64, seed=4)
    out = SamVisionEncoder(config).apply({"params": params}, pixels).last_hidden_state
    ref_neck, _ = _hf_forward(hf, pixels)
    assert out.dtype == jax.numpy.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert _max_diff(out, ref_neck) < 0.25  # neck output is LayerNorm-ed: O(1) values, bf16 has ~3 digits


def test_preprocessing_matches_transformers():
    # A non-square RGBA image: longest-side resize, alpha onto white, bottom/right zero padding.
    rng = np.random.RandomState(5)
    image = Image.fromarray(rng.randint(0, 256, (37, 53, 4), dtype=np.uint8), mode="RGBA")
    hf_proc = transformers.SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    ref = hf_proc(images=image, return_tensors="np")
    ours = SamPreprocessor.from_hf_dict(hf_proc.to_dict())
    assert (ours.longest_edge, ours.pad_size) == (64, 64)
    pixels = ours(image)
    assert pixels.shape == (64, 64, 3)
    assert _max_diff(pixels, ref["pixel_values"][0].transpose(1, 2, 0)) <= 1e-6
    assert ours.content_size(37, 53) == tuple(int(v) for v in ref["reshaped_input_sizes"][0]) == (45, 64)
    assert (pixels[45:] == 0).all()


def test_wrong_input_and_configs_raise(tmp_path):
    _, path = _hf_vision(tmp_path, TINY_KW, seed=6)
    config, params = load_sam_vision(path)
    with pytest.raises(ValueError, match="channels-last"):
        SamVisionEncoder(config).apply({"params": params}, np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ConfigError, match="non-square"):
        SamVisionConfig.from_hf_dict({"model_type": "sam_vision_model", "image_size": [64, 48]})
    with pytest.raises(ConfigError, match="global_attn_indexes"):
        SamVisionConfig.from_hf_dict({"model_type": "sam_vision_model", **TINY_KW, "global_attn_indexes": [5]})
    with pytest.raises(ConfigError, match="expected one of"):
        SamVisionConfig.from_hf_dict({"model_type": "siglip_vision_model"})
    # The ViT checks shared with SigLIP (`hf_config.check_vit_shapes`, `with_overrides`) name the file.
    for bad, needle in [({"num_attention_heads": 5}, "hidden_size=32 is not a multiple of num_attention_heads=5"),
                        ({"patch_size": 5}, "image_size=64 is not a multiple of patch_size=5"),
                        ({"hidden_act": "relu"}, "hidden_act='relu' is not supported")]:
        with pytest.raises(ConfigError, match=f"my/config.json: {needle}"):
            SamVisionConfig.from_hf_dict({"model_type": "sam_vision_model", **TINY_KW, **bad}, "my/config.json")
    with pytest.raises(ConfigError, match=r"my/config.json: unknown override\(s\) \['dtpye'\]"):
        SamVisionConfig.from_hf_dict({"model_type": "sam_vision_model", **TINY_KW}, "my/config.json", dtpye="bf16")
    assert SamVisionConfig.from_hf_dict({"model_type": "sam_vision_model", **TINY_KW},
                                        dtype="bfloat16").dtype == jnp.bfloat16
    # A checkpoint whose config says 3 layers but holds 2 names every missing tensor.
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, "num_hidden_layers": 3}, f)
    with pytest.raises(ConversionError, match=r"missing tensor layers\.2\.attn\.qkv\.weight"):
        load_sam_vision(path)


def test_hub_style_config_with_defaults():
    """A hub SamModel config.json (facebook/sam-vit-base style) may leave vision fields at their defaults and
    `mlp_dim` null: the HF defaults fill them."""
    cfg = {"model_type": "sam", "vision_config": {"hidden_size": 768, "mlp_dim": None, "num_hidden_layers": 12}}
    config = SamVisionConfig.from_hf_dict(cfg)
    assert (config.mlp_dim, config.grid_size, config.window_size, config.global_attn_indexes,
            config.output_channels) == (3072, 64, 14, (2, 5, 8, 11), 256)
