"""SigLIP vision tower: parity with transformers (fp32, <= 1e-4), key layouts, preprocessing, errors, bf16."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transformers
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.hf_mapping import ConversionError
from vital_jax.models.siglip import (SiglipPreprocessor, SiglipVisionConfig, SiglipVisionModel, load_siglip_vision,
                                     preprocess_batch, preprocess_image, save_siglip_vision)

ATOL = 1e-4

# The NOTES.md tiny config (tanh GELU, 4x4 patch grid, with the MAP head).
VISION_KW = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                 patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# A different shape for the full SiglipModel: exact GELU, 3 heads of 16, 3 layers, a 3x3 grid of 7-pixel patches.
FULL_VISION_KW = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
                      image_size=21, patch_size=7, hidden_act="gelu", layer_norm_eps=1e-5)
TEXT_KW = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=1)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values for *every* parameter, so a mis-mapped bias or norm (zero/one at HF init) shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.3
            is_norm_scale = "norm" in name and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if is_norm_scale else 0.0))


def _hf_vision(tmp_path, seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.SiglipVisionConfig(**{**VISION_KW, **overrides})
    config._attn_implementation = "eager"
    model = transformers.SiglipVisionModel(config).eval()
    _randomize(model, seed)
    path = str(tmp_path / f"siglip_vision_{seed}")
    model.save_pretrained(path)
    return model, path


def _hf_full(tmp_path, seed=1):
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(vision_config=FULL_VISION_KW, text_config=TEXT_KW)
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = transformers.SiglipModel(config).eval()
    _randomize(model, seed)
    path = str(tmp_path / "siglip_full")
    model.save_pretrained(path)
    return model, path


def _pixels(batch, size, seed=0):
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def _hf_forward(hf_vision, pixels_bhwc):
    with torch.no_grad():
        out = hf_vision(pixel_values=torch.from_numpy(pixels_bhwc.transpose(0, 3, 1, 2)))
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return out.last_hidden_state.numpy(), pooled


def _ours(config, params, pixels_bhwc):
    out = jax.jit(SiglipVisionModel(config).apply)({"params": params}, pixels_bhwc)
    return out.last_hidden_state, out.pooler_output


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_vision_model_matches_transformers(tmp_path):
    hf, path = _hf_vision(tmp_path)
    config, params = load_siglip_vision(path)
    assert (config.hidden_size, config.num_patches, config.use_head, config.gelu_approximate) == (64, 16, True, True)
    pixels = _pixels(2, 56)
    hidden, pooled = _ours(config, params, pixels)
    ref_hidden, ref_pooled = _hf_forward(hf, pixels)
    assert hidden.shape == (2, 16, 64) and pooled.shape == (2, 64)
    assert _max_diff(hidden, ref_hidden) <= ATOL
    assert _max_diff(pooled, ref_pooled) <= ATOL
    # The two examples differ, so a batch-mixing bug would show as well.
    assert _max_diff(hidden[0], hidden[1]) > 0.1


def test_full_siglip_model_layout_loads_and_matches(tmp_path):
    hf, path = _hf_full(tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == "siglip"
    keys = load_file(os.path.join(path, "model.safetensors")).keys()
    assert any(k.startswith("text_model.") for k in keys) and "logit_scale" in keys
    config, params = load_siglip_vision(path)
    assert (config.hidden_size, config.num_attention_heads, config.grid_size) == (48, 3, 3)
    assert not config.gelu_approximate and config.layer_norm_eps == 1e-5
    pixels = _pixels(3, 21, seed=1)
    hidden, pooled = _ours(config, params, pixels)
    ref_hidden, ref_pooled = _hf_forward(hf.vision_model, pixels)
    assert _max_diff(hidden, ref_hidden) <= ATOL
    assert _max_diff(pooled, ref_pooled) <= ATOL

    # Dropping the head on request skips its tensors; the token features are unchanged.
    config_nohead, params_nohead = load_siglip_vision(path, use_head=False)
    assert "head" not in params_nohead
    hidden_nohead, pooled_nohead = _ours(config_nohead, params_nohead, pixels)
    assert pooled_nohead is None and _max_diff(hidden_nohead, ref_hidden) <= ATOL


def test_checkpoint_without_head_matches(tmp_path):
    hf, path = _hf_vision(tmp_path, seed=3, vision_use_head=False, image_size=28)
    config, params = load_siglip_vision(path)
    assert not config.use_head and "head" not in params
    pixels = _pixels(1, 28, seed=3)
    hidden, pooled = _ours(config, params, pixels)
    ref_hidden, ref_pooled = _hf_forward(hf, pixels)
    assert pooled is None and ref_pooled is None
    assert _max_diff(hidden, ref_hidden) <= ATOL


def test_export_roundtrip_loads_in_transformers_and_in_prefixed_layout(tmp_path):
    hf, path = _hf_vision(tmp_path, seed=4)
    config, params = load_siglip_vision(path)
    pixels = _pixels(1, 56, seed=4)
    ref_hidden, ref_pooled = _hf_forward(hf, pixels)

    # Bare transformers-5 layout: transformers itself must load our export and give the same outputs.
    out_dir = str(tmp_path / "exported")
    save_siglip_vision(out_dir, config, params)
    assert set(load_file(os.path.join(out_dir, "model.safetensors"))) == \
        set(load_file(os.path.join(path, "model.safetensors")))
    reloaded = transformers.SiglipVisionModel.from_pretrained(out_dir, attn_implementation="eager").eval()
    hidden_hf, pooled_hf = _hf_forward(reloaded, pixels)
    assert _max_diff(hidden_hf, ref_hidden) <= 1e-6 and _max_diff(pooled_hf, ref_pooled) <= 1e-6

    # `vision_model.`-prefixed layout (transformers 4 SiglipVisionModel) loads into the same params.
    prefixed = str(tmp_path / "prefixed")
    save_siglip_vision(prefixed, config, params, prefix="vision_model.")
    assert all(k.startswith("vision_model.") for k in load_file(os.path.join(prefixed, "model.safetensors")))
    _, params_prefixed = load_siglip_vision(prefixed)
    jax.tree.map(np.testing.assert_array_equal, params_prefixed, params)


def test_an_export_in_another_dtype_than_its_params_says_the_written_one(tmp_path):
    """config.json named the params' storage dtype: bf16 params written in float32 said bfloat16, and
    transformers' dtype="auto" then loaded float32 weights rounded to bf16."""
    _, path = _hf_vision(tmp_path, seed=6)
    config, params = load_siglip_vision(path, dtype=jnp.bfloat16)
    out_dir = str(tmp_path / "f32")
    save_siglip_vision(out_dir, config, params, dtype=np.float32)
    assert json.load(open(os.path.join(out_dir, "config.json")))["dtype"] == "float32"
    assert transformers.SiglipVisionModel.from_pretrained(out_dir, dtype="auto").dtype == torch.float32
    save_siglip_vision(str(tmp_path / "bf16"), *load_siglip_vision(path), dtype=jnp.bfloat16)
    assert json.load(open(os.path.join(str(tmp_path / "bf16"), "config.json")))["dtype"] == "bfloat16"


@pytest.mark.parametrize("mode,src_size,out_size", [
    ("RGB", (37, 23), 56),      # (width, height): upsampling, non-square source
    ("RGB", (301, 190), 56),    # downsampling
    ("L", (80, 61), (40, 56)),  # grayscale, non-square target (height, width)
    ("RGBA", (45, 70), 56),     # alpha composited onto white
    ("I;16", (64, 50), 28),     # 16-bit grayscale (PIL saturates above 255, as HF)
    ("P", (33, 33), 28),        # palette with a transparent index
])
def test_preprocessing_equals_hf_pil_processor(mode, src_size, out_size):
    rng = np.random.RandomState(sum(map(ord, mode)) + src_size[0])
    w, h = src_size
    if mode == "RGB":
        image = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    elif mode == "L":
        image = Image.fromarray(rng.randint(0, 256, (h, w), dtype=np.uint8), "L")
    elif mode == "RGBA":
        image = Image.fromarray(rng.randint(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    elif mode == "I;16":
        image = Image.fromarray(rng.randint(0, 400, (h, w)).astype(np.uint16))
        assert image.mode == "I;16"
    else:
        image = Image.fromarray(rng.randint(0, 8, (h, w), dtype=np.uint8), "P")
        image.putpalette(list(rng.randint(0, 256, 8 * 3)))
        image.info["transparency"] = 3
    height, width = (out_size, out_size) if isinstance(out_size, int) else out_size
    processor = transformers.SiglipImageProcessorPil(size={"height": height, "width": width})
    ref = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = preprocess_image(image, out_size)
    assert ours.shape == (height, width, 3) and ours.dtype == np.float32
    assert _max_diff(ours, ref) <= 1e-5
    assert ours.std() > 0.1  # not a constant image: the comparison means something


def test_preprocessor_reads_hf_config(tmp_path):
    processor = transformers.SiglipImageProcessorPil(size={"height": 42, "width": 42}, resample=2,
                                                     image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4])
    processor.save_pretrained(str(tmp_path))
    ours = SiglipPreprocessor.from_pretrained(str(tmp_path))
    assert (ours.height, ours.width, ours.resample) == (42, 42, 2)
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (50 + i, 30, 3), dtype=np.uint8))
              for i in range(2)]
    ref = processor(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert _max_diff(np.stack([ours(im) for im in images]), ref) <= 1e-5
    batch = preprocess_batch(images, 42, resample=ours.resample, mean=ours.image_mean, std=ours.image_std)
    assert _max_diff(batch, ref) <= 1e-5

    with open(tmp_path / "preprocessor_config.json") as f:
        cfg = json.load(f)
    with pytest.raises(ConfigError, match="do_center_crop"):
        SiglipPreprocessor.from_hf_dict({**cfg, "do_center_crop": True})


def test_config_reads_both_layouts_and_hf_defaults():
    bare = SiglipVisionConfig.from_hf_dict({"model_type": "siglip_vision_model", **VISION_KW})
    assert bare.num_patches == 16 and bare.use_head
    # Older full configs store only non-default vision fields: the rest are transformers' defaults.
    full = SiglipVisionConfig.from_hf_dict({"model_type": "siglip", "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_attention_heads": 16, "num_hidden_layers": 27, "image_size": 448, "patch_size": 14}},
        dtype="bfloat16")
    assert (full.num_patches, full.head_dim, full.hidden_act, full.dtype) == (1024, 72, "gelu_pytorch_tanh",
                                                                               jnp.bfloat16)
    with pytest.raises(ConfigError, match="hidden_act"):
        SiglipVisionConfig.from_hf_dict({"model_type": "siglip_vision_model", "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="vision_config"):
        SiglipVisionConfig.from_hf_dict({"model_type": "siglip"})


def test_bad_inputs_raise_errors_naming_the_problem(tmp_path):
    _, path = _hf_vision(tmp_path, seed=5)

    # A directory with a config but no safetensors.
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ConversionError, match="no_weights.*model.safetensors"):
        load_siglip_vision(str(empty))

    # No config.json at all, and a config of another architecture.
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_siglip_vision(str(tmp_path / "nowhere"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ConfigError, match="clip_vision_model"):
        load_siglip_vision(str(other))

    # A wrong-shaped tensor and a stray one are both named.
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(95, 64)
    tensors["encoder.layers.7.extra.weight"] = torch.zeros(3)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError) as err:
        load_siglip_vision(path)
    message = str(err.value)
    assert "encoder.layers.1.mlp.fc1.weight" in message and "(95, 64)" in message
    assert any(line.startswith("unknown tensor encoder.layers.7.extra.weight") for line in err.value.problems)
    assert all("encoder.layers.1.mlp.fc1.weight" in line or "encoder.layers.7.extra.weight" in line
               for line in err.value.problems), message

    # Pixels of the wrong size or layout.
    config = SiglipVisionConfig.from_hf_dict({"model_type": "siglip_vision_model", **VISION_KW})
    model = SiglipVisionModel(config)
    with pytest.raises(ValueError, match=r"channels-last.*\(2, 3, 56, 56\)"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 3, 56, 56)))


def test_bf16_forward_is_close_to_fp32(tmp_path):
    _, path = _hf_vision(tmp_path, seed=6)
    config32, params32 = load_siglip_vision(path)
    config16, params16 = load_siglip_vision(path, dtype=jnp.bfloat16)
    assert config16.dtype == jnp.bfloat16 and params16["post_layernorm"]["scale"].dtype == jnp.bfloat16
    pixels = _pixels(2, 56, seed=6)
    hidden32, pooled32 = _ours(config32, params32, pixels)
    hidden16, pooled16 = _ours(config16, params16, pixels)
    assert hidden16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(hidden16)))
    # bf16 keeps ~3 significant digits; through 2 layers the post-LN features (unit scale) should stay within a
    # few percent, and be well correlated. A wrong cast (e.g. bf16 softmax sums, bf16 LN stats) breaks this.
    scale = float(np.abs(np.asarray(hidden32)).mean())
    assert _max_diff(hidden16, hidden32) / scale < 0.1
    assert float(np.abs(np.asarray(hidden16, np.float32) - np.asarray(hidden32)).mean()) / scale < 0.02
    assert _max_diff(pooled16, pooled32) / float(np.abs(np.asarray(pooled32)).mean()) < 0.1
