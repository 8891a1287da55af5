"""Qwen3-VL round trip and SigLIP conversion through the same CLIs."""

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conversion import hf_to_flax
from tests.hf_reference import save_tiny_qwen3_vl
from vital_jax.models import model_dir, registry, safetensors_io
from vital_jax.models.hf_config import read_config_json
from vital_jax.models.hf_mapping import ConversionError, flatten
from vital_jax.models.qwen3_vl import Qwen3VLConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _tensors(path):
    return {name: np.asarray(a) for name, a in safetensors_io.iter_tensors(path)}


def test_qwen3_vl_round_trip_is_tensor_identical_and_loads_in_transformers(tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    hf_dir, flax_dir, out_dir = tmp_path / "hf", tmp_path / "flax", tmp_path / "out"
    hf_model = save_tiny_qwen3_vl(str(hf_dir), seed=21, vision=dict(depth=3, deepstack_visual_indexes=[1, 2]))
    assert "qwen3_vl" in _run("conversion.hf_to_flax", f"--hf_dir={hf_dir}", f"--out={flax_dir}")
    _run("conversion.flax_to_hf", f"--checkpoint={flax_dir}", f"--out={out_dir}")
    before, after = _tensors(str(hf_dir)), _tensors(str(out_dir))
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)

    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(str(out_dir), attn_implementation="eager").eval()
    ids = torch.tensor([[5, 188] + [190] * 4 + [189, 7, 9]])
    pixels = torch.randn(16, 3 * 2 * 16 * 16)
    kwargs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]),
                  mm_token_type_ids=(ids == 190).long())
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(**kwargs).logits.numpy(), hf_model(**kwargs).logits.numpy(), atol=1e-6)

    # The converted directory restores into the Flax model.
    cfg = read_config_json(str(flax_dir))
    family = registry.family_for(cfg, "test")
    config = family.config_from_hf(cfg, "test")
    params = model_dir.load_params(str(flax_dir), family.abstract_params(config))
    assert params["visual"]["patch_embed"]["kernel"].shape == (3 * 2 * 16 * 16, 64)


def test_siglip_full_model_converts_with_the_cli(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    from vital_jax.models.siglip import SiglipVisionModel
    from vital_jax.models.siglip.config import SiglipVisionConfig

    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6))
    hf_model = SiglipModel(config).eval()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    assert "siglip" in _run("conversion.hf_to_flax", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'flax'}")

    ours_config = SiglipVisionConfig.from_pretrained(str(tmp_path / "flax"))
    params = model_dir.load_params(str(tmp_path / "flax"),
                                   registry.family_for(read_config_json(str(tmp_path / "flax")), "t")
                                   .abstract_params(ours_config))
    pixels = np.random.RandomState(0).randn(2, 56, 56, 3).astype(np.float32)
    ours = SiglipVisionModel(ours_config).apply({"params": params}, jnp.asarray(pixels))
    with torch.no_grad():
        ref = hf_model.vision_model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
    assert np.max(np.abs(np.asarray(ours.last_hidden_state) - ref.last_hidden_state.numpy())) <= 1e-4


def _leaves_equal(a, b):
    flat_a, flat_b = flatten(a), flatten(b)
    assert sorted(flat_a) == sorted(flat_b)
    for name in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), err_msg=name)


def test_every_loader_reads_a_converted_directory_as_its_hf_original(tmp_path):
    """`qwen3_vl.load_params` (the README's snippet) and `load_siglip_vision` (the ROI encoder) take a directory
    converted by hf_to_flax like the HF one it came from: the same parameters, in the layout asked for; SigLIP's
    MAP head is dropped when not wanted; a converted directory of another shape is a ConversionError."""
    from transformers import SiglipVisionConfig as HFSiglipVisionConfig
    from transformers import SiglipVisionModel as HFSiglipVisionModel

    from vital_jax.models.qwen3_vl import load_params as load_vl_params
    from vital_jax.models.siglip.params import load_siglip_vision

    hf_vl, flax_vl = tmp_path / "hf_vl", tmp_path / "flax_vl"
    save_tiny_qwen3_vl(str(hf_vl), seed=3)
    hf_to_flax.convert(str(hf_vl), str(flax_vl))
    for scan in (False, True):
        config = Qwen3VLConfig.from_pretrained(str(hf_vl), scan_layers=scan)
        _leaves_equal(load_vl_params(str(flax_vl), config), load_vl_params(str(hf_vl), config))

    hf_sig, flax_sig = tmp_path / "hf_siglip", tmp_path / "flax_siglip"
    torch.manual_seed(0)
    HFSiglipVisionModel(HFSiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=28, patch_size=14)
                        ).save_pretrained(str(hf_sig))
    hf_to_flax.convert(str(hf_sig), str(flax_sig))
    for use_head in (True, False):
        config, ours = load_siglip_vision(str(flax_sig), use_head=use_head)
        _, ref = load_siglip_vision(str(hf_sig), use_head=use_head)
        assert ("head" in ours) == use_head
        _leaves_equal(ours, ref)

    other = Qwen3VLConfig.from_pretrained(str(hf_vl))
    other = dataclasses.replace(other, text=dataclasses.replace(other.text, num_hidden_layers=1))
    with pytest.raises(ConversionError, match="unexpected parameter"):
        load_vl_params(str(flax_vl), other)


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_an_exports_config_names_the_dtype_its_weights_were_written_in(tmp_path, dtype, torch_dtype):
    """The Hub's Qwen3-VL-8B config.json has no top-level dtype and "dtype": "bfloat16" in text_config: an export's
    config.json says the exported dtype at the top and in the sub-config (as transformers 5's save_pretrained
    writes it), so from_pretrained(dtype="auto") loads the weights as they were written."""
    import json

    from transformers import Qwen3VLForConditionalGeneration

    from conversion import flax_to_hf

    hf_dir, flax_dir, out_dir = tmp_path / "hf", tmp_path / "flax", tmp_path / "out"
    save_tiny_qwen3_vl(str(hf_dir))
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.pop("dtype")
    cfg["text_config"]["dtype"] = "bfloat16" if dtype == "float32" else "float32"   # another dtype than the export's
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    hf_to_flax.convert(str(hf_dir), str(flax_dir))
    flax_to_hf.export(str(flax_dir), str(out_dir), dtype=dtype)
    written = json.loads((out_dir / "config.json").read_text())
    assert (written["dtype"], written["text_config"]["dtype"]) == (dtype, dtype)
    assert "torch_dtype" not in written and "dtype" not in written["vision_config"]
    assert Qwen3VLForConditionalGeneration.from_pretrained(str(out_dir), dtype="auto").dtype == torch_dtype
