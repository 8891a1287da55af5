"""`conversion.vital_export` on runs the demo does not make: a backbone stored in bf16 (the 8B recipes) and models
given as `conversion.hf_to_flax` outputs. The runs are built, not trained: their adapters are set by hand."""

import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conversion import hf_to_flax, vital_export
from tests.hf_reference import save_tiny_qwen3, save_tiny_qwen3_vl
from vital_jax.layers.linear import LoraConfig
from vital_jax.models import model_dir, safetensors_io
from vital_jax.models.hf_mapping import flatten, unflatten
from vital_jax.models.qwen3 import Qwen3Config
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.models.qwen3_vl import Qwen3VLConfig
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.run import Paths
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.model import VitalModel


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(HF backbone dir, converted backbone dir, converted decoder dir)."""
    root = tmp_path_factory.mktemp("vital_export")
    save_tiny_qwen3_vl(str(root / "hf_vl"), seed=2)
    save_tiny_qwen3(str(root / "hf_dec"), seed=3, vocab_size=200)
    hf_to_flax.convert(str(root / "hf_vl"), str(root / "flax_vl"))
    hf_to_flax.convert(str(root / "hf_dec"), str(root / "flax_dec"))
    return str(root / "hf_vl"), str(root / "flax_vl"), str(root / "flax_dec")


def _run(converted, param_dtype: str, lora_b_std: float):
    """A run over the converted models with a bf16 or float32 backbone and adapters of a given size."""
    hf_vl, flax_vl, flax_dec = converted
    backbone = Qwen3VLConfig.from_pretrained(flax_vl, param_dtype=param_dtype)
    decoder = Qwen3Config.from_pretrained(flax_dec)
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0)
    model = VitalModel(VitalConfig(k_max=2, roi_dim=8, lora=lora), backbone, decoder)
    params = model.init_params(jax.random.PRNGKey(0), qwen3_vl_params.load_params(flax_vl, backbone),
                               qwen3_params.load_params(flax_dec, decoder))
    flat = flatten(params)
    rng = np.random.default_rng(0)
    for path in flat:
        if path.endswith("lora_b"):  # a trained adapter's size
            flat[path] = jnp.asarray(rng.normal(0, lora_b_std, flat[path].shape), jnp.float32)
    config = ml_collections.ConfigDict({"data": {"min_pixels": 1, "max_pixels": 2}})
    return types.SimpleNamespace(model=model, params=unflatten(flat), config=config, step=1, finished=True,
                                 paths=Paths(hf_vl, hf_vl, flax_vl, flax_dec))


def _merge_errors(run, out: str) -> list[float]:
    """Per adapted kernel: rms(exported - (W + (alpha / r) A B)) / rms((alpha / r) A B), all in float32."""
    exported = dict(safetensors_io.iter_tensors(out))
    backbone = flatten(run.params["backbone"])
    errors = []
    for path in backbone:
        if not path.endswith("lora_a"):
            continue
        base = path[:-len("lora_a")]
        parts = base.split("/")  # language_model/model/layers_i/self_attn|mlp/proj/
        name = f"model.language_model.layers.{parts[2].split('_')[1]}.{parts[3]}.{parts[4]}.weight"
        delta = run.model.config.lora.scaling * (np.asarray(backbone[base + "lora_a"])
                                                 @ np.asarray(backbone[base + "lora_b"]))
        want = np.asarray(backbone[base + "kernel"], np.float32) + delta
        got = np.asarray(exported[name], np.float32).T
        errors.append(float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(delta ** 2))))
    return errors


def test_a_float32_export_of_a_bf16_backbone_keeps_the_whole_lora_update(converted, tmp_path):
    """LoRA was merged into the bf16 kernels and only then written in float32: a trained-size update (B ~ 1e-3)
    lost about a tenth of itself to bf16 rounding, a small one most of itself."""
    run = _run(converted, "bfloat16", lora_b_std=1e-3)
    vital_export.export_run("unused", str(tmp_path / "f32"), dtype="float32", run=run)
    errors = _merge_errors(run, str(tmp_path / "f32"))
    assert len(errors) > 4 and max(errors) < 1e-5, errors
    # In bf16 the update rounds as the kernels do: exactly the rounding of W + (alpha / r) A B, once.
    vital_export.export_run("unused", str(tmp_path / "bf16"), dtype="bfloat16", run=run)
    assert 0.01 < np.median(_merge_errors(run, str(tmp_path / "bf16"))) < 1.0


def test_an_export_of_converted_models_loads_in_vital_jax_and_transformers(converted, tmp_path):
    """The decoder's scaffolding copy took the converted directory's record (vital_jax.json) with its config, so
    vital_jax read it as a converted directory and looked for params/."""
    from transformers import Qwen3ForCausalLM

    run = _run(converted, "float32", lora_b_std=1e-2)
    out = tmp_path / "export"
    vital_export.export_run("unused", str(out), run=run)
    decoder_dir = out / "scaffolding" / "decoder"
    for folder in (out, decoder_dir):
        assert not (folder / model_dir.META_FILE).exists() and not model_dir.is_converted(str(folder))
    loaded = qwen3_params.load_params(str(decoder_dir), Qwen3Config.from_pretrained(str(decoder_dir)))
    jax.tree.map(np.testing.assert_array_equal, loaded,
                 jax.tree.map(np.asarray, qwen3_params.to_layout(run.params["decoder"], scan_layers=False)))
    Qwen3ForCausalLM.from_pretrained(str(decoder_dir))
    assert json.load(open(out / vital_export.VITAL_FILE))["latent_input"] == "feedback"
