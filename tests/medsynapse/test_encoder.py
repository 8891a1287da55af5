"""MedSynapse-V's anatomical encoder E_ana: feature maps of both encoders on tiny random checkpoints, mask
geometry on the feature grid, region providers, and the counterfactual keep-mask B̄ of Eq. (5)."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import transformers
from conversion import hf_to_flax
from vital_jax.medsynapse import encoder as ana

SIGLIP_KW = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                 patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SAM_KW = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
              patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=48)
ATOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if name.endswith("norm.weight") else 0.0))


def _save(model_cls, config, path, processor: dict, seed: int):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random HF SigLIP and SAM directories (with processor configs) and the torch models."""
    root = tmp_path_factory.mktemp("anatomical")
    siglip_dir, sam_dir = str(root / "siglip"), str(root / "sam")
    siglip = _save(transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**SIGLIP_KW), siglip_dir,
                   {"image_processor_type": "SiglipImageProcessor", "size": {"height": 56, "width": 56}}, seed=0)
    sam = _save(transformers.SamVisionModel, transformers.SamVisionConfig(**SAM_KW), sam_dir,
                {"image_processor_type": "SamImageProcessor", "size": {"longest_edge": 64},
                 "pad_size": {"height": 64, "width": 64}}, seed=1)
    return {"siglip": (siglip_dir, siglip), "sam": (sam_dir, sam), "root": root}


def _pixels(batch, size, seed=0):
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_siglip_feature_map_is_the_patch_grid_in_raster_order(checkpoints):
    path, hf = checkpoints["siglip"]
    encoder, params = ana.load_anatomical_encoder("siglip", path)
    assert isinstance(encoder, ana.SiglipAnatomicalEncoder) and "head" not in params
    assert (encoder.grid, encoder.feature_dim, encoder.image_size) == ((4, 4), 64, 56)
    pixels = _pixels(2, 56)
    features = jax.jit(encoder.feature_map)(params, pixels)
    assert features.shape == (2, 4, 4, 64)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    # Token r * 4 + c is cell (r, c).
    assert _max_diff(features, ref.reshape(2, 4, 4, 64)) <= ATOL
    assert _max_diff(features[:, 1, 2], ref[:, 1 * 4 + 2]) <= ATOL

    block_encoder, _ = ana.load_anatomical_encoder("siglip", path, feature_layer="last_block")
    block = block_encoder.feature_map(params, pixels)
    assert block.shape == (2, 4, 4, 64) and _max_diff(block, features) > 0.1


def test_sam_feature_map_is_the_neck_output(checkpoints):
    path, hf = checkpoints["sam"]
    encoder, params = ana.load_anatomical_encoder("sam", path)
    assert isinstance(encoder, ana.SamAnatomicalEncoder)
    assert (encoder.grid, encoder.feature_dim, encoder.image_size) == ((8, 8), 16, 64)
    pixels = _pixels(2, 64, seed=1)
    features = jax.jit(encoder.feature_map)(params, pixels)
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    assert features.shape == (2, 8, 8, 16)
    assert _max_diff(features, out.last_hidden_state.numpy().transpose(0, 2, 3, 1)) <= ATOL

    vit, _ = ana.load_anatomical_encoder("sam", path, feature_layer="encoder")
    assert vit.feature_dim == 32
    assert _max_diff(vit.feature_map(params, pixels), out.hidden_states[-1].numpy()) <= ATOL


def test_preprocessing_geometry_of_each_encoder(checkpoints):
    sam, _ = ana.load_anatomical_encoder("sam", checkpoints["sam"][0])
    siglip, _ = ana.load_anatomical_encoder("siglip", checkpoints["siglip"][0])
    image = np.random.RandomState(2).randint(0, 256, (20, 40, 3), dtype=np.uint8)
    pixels = sam.preprocess(image)
    assert pixels.shape == (64, 64, 3) and sam.content_size(20, 40) == (32, 64)
    assert (pixels[32:] == 0).all() and (pixels[:32] != 0).any()  # longest side to 64, zero padding below
    assert siglip.preprocess(image).shape == (56, 56, 3) and siglip.content_size(20, 40) == (56, 56)


def test_grid_coverage_known_answers():
    # 8x8 image filling an 8x8 canvas, 4x4 grid of 2x2-pixel cells; mask rows 0-3, cols 0-2.
    mask = np.zeros((8, 8), bool)
    mask[:4, :3] = True
    expected = np.zeros((4, 4), np.float32)
    expected[:2, 0], expected[:2, 1] = 1.0, 0.5
    np.testing.assert_allclose(ana.grid_coverage(mask, (8, 8), 8, (4, 4)), expected, atol=1e-6)

    # A 2x4 image stretched to the top 4x8 of an 8x8 canvas (SAM's longest-side resize + padding): image pixel
    # (0, 0) covers canvas [0, 2) x [0, 2), i.e. cell (0, 0) of a 4x4 grid exactly.
    single = np.zeros((2, 4), bool)
    single[0, 0] = True
    expected = np.zeros((4, 4), np.float32)
    expected[0, 0] = 1.0
    np.testing.assert_allclose(ana.grid_coverage(single, (4, 8), 8, (4, 4)), expected, atol=1e-6)
    # The whole image covers only the top half of the grid; the padding rows are never covered.
    full = ana.grid_coverage(np.ones((2, 4), bool), (4, 8), 8, (4, 4))
    np.testing.assert_allclose(full, np.repeat([[1.0], [1.0], [0.0], [0.0]], 4, axis=1), atol=1e-6)

    # Cell bounds mid-pixel: a 3x3 image over a 2x2 grid, each cell 1.5 x 1.5 image pixels.
    corner = np.zeros((3, 3), bool)
    corner[0, 0] = True
    np.testing.assert_allclose(ana.grid_coverage(corner, (4, 4), 4, (2, 2)), [[1 / 2.25, 0], [0, 0]], atol=1e-6)


def test_mask_to_grid_threshold_and_small_region_fallback(checkpoints):
    siglip, _ = ana.load_anatomical_encoder("siglip", checkpoints["siglip"][0])  # 56 px, 4x4 grid of 14 px
    mask = np.zeros((56, 56), bool)
    mask[:14, :21] = True  # cell (0, 0) fully, cell (0, 1) exactly half
    grid = ana.mask_to_grid(mask, siglip)
    assert grid[0, 0] and grid[0, 1] and grid.sum() == 2  # >= 0.5 is in
    assert ana.mask_to_grid(mask, siglip, threshold=0.75).sum() == 1
    # A lesion smaller than half a cell still marks the cell it covers most.
    small = np.zeros((56, 56), bool)
    small[30:33, 44:50] = True  # inside cell (2, 3)
    grid = ana.mask_to_grid(small, siglip)
    assert grid.sum() == 1 and grid[2, 3]
    assert not ana.mask_to_grid(np.zeros((56, 56), bool), siglip).any()


def test_record_region_masks_map_the_record_mask_through_the_encoder_geometry(checkpoints, tmp_path):
    sam, params = ana.load_anatomical_encoder("sam", checkpoints["sam"][0])
    image_path, mask_path = str(tmp_path / "image.png"), str(tmp_path / "mask.png")
    Image.fromarray(np.full((32, 64, 3), 128, np.uint8)).save(image_path)
    mask = np.zeros((32, 64), np.uint8)
    mask[:, :32] = 255  # the left half of a wide image: the top-left quarter of SAM's padded canvas
    Image.fromarray(mask).save(mask_path)
    provider = ana.region_mask_provider_from_config(None)
    assert isinstance(provider, ana.RecordRegionMasks)
    regions = provider(sam, params, image_path, mask_path)
    expected = np.zeros((8, 8), bool)
    expected[:4, :4] = True
    assert regions.masks.shape == (1, 8, 8) and (regions.masks[0] == expected).all()
    assert regions.confidence.tolist() == [1.0]

    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(mask_path)
    with pytest.raises(ValueError, match="mask is 10x10"):
        provider(sam, params, image_path, mask_path)
    with pytest.raises(ValueError, match="needs the record's segmentation mask"):
        provider(sam, params, image_path)


def test_encoder_region_masks_need_a_mask_head(checkpoints):
    sam, params = ana.load_anatomical_encoder("sam", checkpoints["sam"][0])
    provider = ana.region_mask_provider_from_config({"source": "encoder"})
    with pytest.raises(ValueError, match="has no mask head"):
        provider(sam, params, np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown region mask source"):
        ana.region_mask_provider_from_config({"source": "medsam3"})


def test_keep_mask_removes_the_most_confident_region():
    regions = np.zeros((3, 2, 2), bool)
    regions[0, 0, 0] = regions[1, 0, 1] = regions[2, 1, :] = True
    conf = np.array([0.2, 0.9, 0.5], np.float32)
    keep = np.asarray(ana.counterfactual_keep_mask(regions, conf))
    assert keep.tolist() == [[True, False], [True, True]]
    keep2 = np.asarray(ana.counterfactual_keep_mask(regions, conf, top_k=2))
    assert keep2.tolist() == [[True, False], [False, False]]
    # An invalid (padding) region is never removed, even with the highest score.
    keep = np.asarray(ana.counterfactual_keep_mask(regions, conf, valid=np.array([True, False, True])))
    assert keep.tolist() == [[True, True], [False, False]]
    assert np.asarray(ana.counterfactual_keep_mask(regions, conf, valid=np.zeros(3, bool))).all()
    # Ties go to the lower index.
    assert np.asarray(ana.counterfactual_keep_mask(regions, np.ones(3))).tolist() == [[False, True], [True, True]]

    # Batched and jitted, one choice per image.
    batch = np.stack([regions, regions])
    conf_b = np.array([[0.2, 0.9, 0.5], [0.7, 0.1, 0.3]], np.float32)
    keep_b = np.asarray(jax.jit(ana.counterfactual_keep_mask)(batch, conf_b))
    assert keep_b[0].tolist() == [[True, False], [True, True]]
    assert keep_b[1].tolist() == [[False, True], [True, True]]


def test_intervene_zeroes_removed_cells_only():
    features = np.random.RandomState(3).randn(2, 2, 2, 5).astype(np.float32) + 10.0
    keep = np.array([[[True, False], [True, True]], [[True, True], [True, True]]])
    out = np.asarray(ana.intervene(features, keep))
    assert (out[0, 0, 1] == 0).all()
    np.testing.assert_array_equal(out[keep], features[keep])


def test_stack_region_masks_pads_with_invalid_slots():
    one = ana.RegionMasks(np.ones((1, 2, 2), bool), np.array([1.0], np.float32))
    two = ana.RegionMasks(np.zeros((2, 2, 2), bool), np.array([0.3, 0.6], np.float32))
    masks, conf, valid = ana.stack_region_masks([one, two])
    assert masks.shape == (2, 2, 2, 2) and valid.tolist() == [[True, False], [True, True]]
    np.testing.assert_allclose(conf, [[1.0, 0.0], [0.3, 0.6]])
    with pytest.raises(ValueError, match="more than num_regions"):
        ana.stack_region_masks([two], num_regions=1)


def test_factory_from_config_and_converted_directories(checkpoints):
    sam_dir = checkpoints["sam"][0]
    cfg = ml_collections.ConfigDict({"kind": "sam", "dir": sam_dir, "feature_layer": "neck", "dtype": "float32"})
    encoder, params = ana.anatomical_encoder_from_config(cfg)
    pixels = _pixels(1, 64, seed=4)
    reference = encoder.feature_map(params, pixels)

    # A vital_jax converted directory (hf_to_flax keeps the processor file) gives the same encoder.
    converted = str(checkpoints["root"] / "sam_converted")
    hf_to_flax.convert(sam_dir, converted)
    encoder2, params2 = ana.anatomical_encoder_from_config({"kind": "sam", "dir": converted})
    assert encoder2 == encoder
    assert _max_diff(encoder2.feature_map(params2, pixels), reference) == 0.0

    siglip_converted = str(checkpoints["root"] / "siglip_converted")
    hf_to_flax.convert(checkpoints["siglip"][0], siglip_converted)
    siglip, siglip_params = ana.anatomical_encoder_from_config({"kind": "siglip", "dir": siglip_converted})
    assert "head" not in siglip_params and siglip.feature_map(siglip_params, _pixels(1, 56)).shape == (1, 4, 4, 64)

    with pytest.raises(ValueError, match="unknown anatomical encoder kind"):
        ana.anatomical_encoder_from_config({"kind": "medsam3", "dir": sam_dir})
    with pytest.raises(ValueError, match="needs `dir`"):
        ana.anatomical_encoder_from_config({"kind": "sam"})
