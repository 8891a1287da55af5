"""HF <-> Flax parameter names for the SAM (v1) image encoder, and loading.

Key layouts `save_pretrained` writes (checked with transformers 5.24):
  full `SamModel` (SAM, MedSAM):  `vision_encoder.<key>`, plus `prompt_encoder.*`, `mask_decoder.*` and
                                  `shared_image_embedding.*`
  bare `SamVisionModel`:          `vision_encoder.<key>`
where <key> is `patch_embed.projection.*`, `pos_embed`, `layers.{i}.*` and `neck.*`. The prefix is stripped before
matching; the prompt encoder and mask decoder of a full model are skipped explicitly (and only for a full model):
they need point/box prompts, which the anatomical-feature use of the encoder does not have.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.models import hf_config, safetensors_io
from vital_jax.models.hf_mapping import IDENTITY, LINEAR, ConversionError, Rule, Transform, load_hf_params
from vital_jax.models.sam.config import SamVisionConfig
from vital_jax.models.sam.modeling import SamVisionEncoder

# torch Conv2d weight is OIHW; a Flax conv kernel is HWIO.
CONV2D = Transform(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))

_PREFIX = "vision_encoder."
_FULL_MODEL_ONLY = (r"prompt_encoder\..*", r"mask_decoder\..*", r"shared_image_embedding\..*")


def _pair(hf: str, flax: str, weight: str, weight_transform: Transform) -> list[Rule]:
    return [Rule(rf"{hf}\.weight", f"{flax}/{weight}", weight_transform),
            Rule(rf"{hf}\.bias", f"{flax}/bias", IDENTITY)]


def _rules() -> list[Rule]:
    layer, f = r"layers\.(?P<i>\d+)\.", "layers_{i}/"
    rules = [
        *_pair(r"patch_embed\.projection", "patch_embed", "kernel", CONV2D),
        Rule(r"pos_embed", "pos_embed", IDENTITY),
        Rule(r"neck\.conv1\.weight", "neck/conv1/kernel", CONV2D),
        Rule(r"neck\.conv2\.weight", "neck/conv2/kernel", CONV2D),
        *_pair(r"neck\.layer_norm1", "neck/layer_norm1", "scale", IDENTITY),
        *_pair(r"neck\.layer_norm2", "neck/layer_norm2", "scale", IDENTITY),
        Rule(rf"{layer}attn\.rel_pos_h", f"{f}attn/rel_pos_h", IDENTITY),
        Rule(rf"{layer}attn\.rel_pos_w", f"{f}attn/rel_pos_w", IDENTITY),
    ]
    for norm in ("layer_norm1", "layer_norm2"):
        rules += _pair(rf"{layer}{norm}", f"{f}{norm}", "scale", IDENTITY)
    for hf, flax in (("attn.qkv", "attn/qkv"), ("attn.proj", "attn/proj"), ("mlp.lin1", "mlp/lin1"),
                     ("mlp.lin2", "mlp/lin2")):
        rules += _pair(layer + hf.replace(".", r"\."), f + flax, "kernel", LINEAR)
    return rules


RULES = _rules()


def _strip_prefix(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def abstract_params(config: SamVisionConfig) -> dict:
    """The Flax 'params' tree as ShapeDtypeStructs, without allocating weights."""
    model = SamVisionEncoder(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_input())["params"]


def load_params(model_dir: str, config: SamVisionConfig) -> dict:
    """The image-encoder params of the HF SAM checkpoint in `model_dir` for `config`, as numpy arrays of
    `config.param_dtype`. Raises ConversionError naming every unknown, missing or mis-shaped tensor."""
    model_type = hf_config.read_config_json(model_dir).get("model_type")
    ignore = list(_FULL_MODEL_ONLY) if model_type == "sam" else []
    try:
        return load_hf_params(model_dir, RULES, abstract_params(config), np.dtype(config.param_dtype),
                              ignore=ignore, rename=_strip_prefix)
    except safetensors_io.SafetensorsError as e:
        raise ConversionError(model_dir, [str(e)]) from e


def load_sam_vision(model_dir: str, dtype=jnp.float32, **overrides) -> tuple[SamVisionConfig, dict]:
    """Read the image encoder of a HF SAM checkpoint directory (full `SamModel`, e.g. MedSAM, or
    `SamVisionModel`).

    dtype: storage dtype of the returned parameters, also the config's `param_dtype` and (unless overridden)
      its compute `dtype`. overrides: other `SamVisionConfig` fields.
    Returns (config, params) with params a nested dict of numpy arrays for `SamVisionEncoder(config).apply`.
    Raises ConfigError for a missing/foreign config.json and ConversionError naming every bad tensor.
    """
    if "param_dtype" in overrides:
        raise TypeError("load_sam_vision: pass the parameter dtype as `dtype=`, not `param_dtype=`")
    config = SamVisionConfig.from_pretrained(model_dir)
    overrides = {"dtype": dtype, **overrides, "param_dtype": dtype}
    config = dataclasses.replace(config, **{
        k: (hf_config.as_dtype(v) if k in ("dtype", "param_dtype") else v) for k, v in overrides.items()})
    return config, load_params(model_dir, config)

