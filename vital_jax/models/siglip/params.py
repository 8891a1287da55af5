"""HF <-> Flax parameter names for the SigLIP vision tower, loading and export.

Key layouts `save_pretrained` writes (checked with transformers 5.23):
  full `SiglipModel` (e.g. MedSigLIP-448):  `vision_model.<key>`, plus `text_model.*`, `logit_scale`, `logit_bias`
  bare `SiglipVisionModel`, transformers 5: `<key>` (no prefix)
  bare `SiglipVisionModel`, transformers 4: `vision_model.<key>` (it wrapped a `SiglipVisionTransformer`)
where <key> is `embeddings.*`, `encoder.layers.{i}.*`, `post_layernorm.*` and, with the MAP head, `head.*`.
The `vision_model.` prefix is stripped before matching, so one rule list serves all three; the text tower and
the contrastive logit parameters of a full model are skipped explicitly (and only for a full model).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.jsonio import atomic_write
from vital_jax.models import hf_config, safetensors_io
from vital_jax.models.hf_mapping import IDENTITY, LINEAR, ConversionError, Rule, Transform, load_hf_params, to_hf_specs
from vital_jax.models.siglip.config import SiglipVisionConfig
from vital_jax.models.siglip.modeling import SiglipVisionModel

# torch Conv2d weight is OIHW; the Flax patch kernel is HWIO.
CONV2D = Transform(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))

_VISION_PREFIX = "vision_model."
_FULL_MODEL_ONLY = (r"text_model\..*", r"logit_scale", r"logit_bias")


def _linear_rules(hf: str, flax: str) -> list[Rule]:
    return [Rule(rf"{hf}\.weight", f"{flax}/kernel", LINEAR), Rule(rf"{hf}\.bias", f"{flax}/bias", IDENTITY)]


def _norm_rules(hf: str, flax: str) -> list[Rule]:
    return [Rule(rf"{hf}\.weight", f"{flax}/scale", IDENTITY), Rule(rf"{hf}\.bias", f"{flax}/bias", IDENTITY)]


def _rules() -> list[Rule]:
    layer, f = r"encoder\.layers\.(?P<i>\d+)\.", "encoder/layers_{i}/"
    rules = [
        Rule(r"embeddings\.patch_embedding\.weight", "embeddings/patch_embedding/kernel", CONV2D),
        Rule(r"embeddings\.patch_embedding\.bias", "embeddings/patch_embedding/bias", IDENTITY),
        Rule(r"embeddings\.position_embedding\.weight", "embeddings/position_embedding/embedding", IDENTITY),
        *_norm_rules(r"post_layernorm", "post_layernorm"),
        # MAP head: torch MultiheadAttention's fused in_proj ([3D, D], rows q|k|v) is one Linear-like tensor.
        Rule(r"head\.probe", "head/probe", IDENTITY),
        Rule(r"head\.attention\.in_proj_weight", "head/attention/in_proj/kernel", LINEAR),
        Rule(r"head\.attention\.in_proj_bias", "head/attention/in_proj/bias", IDENTITY),
        *_linear_rules(r"head\.attention\.out_proj", "head/attention/out_proj"),
        *_norm_rules(r"head\.layernorm", "head/layernorm"),
        *_linear_rules(r"head\.mlp\.fc1", "head/mlp/fc1"),
        *_linear_rules(r"head\.mlp\.fc2", "head/mlp/fc2"),
    ]
    for norm in ("layer_norm1", "layer_norm2"):
        rules += _norm_rules(rf"{layer}{norm}", f"{f}{norm}")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += _linear_rules(rf"{layer}self_attn\.{proj}", f"{f}self_attn/{proj}")
    for fc in ("fc1", "fc2"):
        rules += _linear_rules(rf"{layer}mlp\.{fc}", f"{f}mlp/{fc}")
    return rules


RULES = _rules()


def _strip_vision_prefix(name: str) -> str:
    return name[len(_VISION_PREFIX):] if name.startswith(_VISION_PREFIX) else name


def abstract_params(config: SiglipVisionConfig) -> dict:
    """The Flax 'params' tree as ShapeDtypeStructs, without allocating weights."""
    model = SiglipVisionModel(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_input())["params"]


def load_siglip_vision(model_dir: str, dtype=jnp.float32, **overrides) -> tuple[SiglipVisionConfig, dict]:
    """Read the vision tower of a HF SigLIP checkpoint directory (full `SiglipModel` or `SiglipVisionModel`).

    dtype: storage dtype of the returned parameters, also the config's `param_dtype` and (unless overridden)
      its compute `dtype`. overrides: other `SiglipVisionConfig` fields, e.g. `use_head=False` to drop the
      checkpoint's MAP head (its tensors are then skipped) when only `last_hidden_state` is needed.
    Returns (config, params) with params a nested dict of numpy arrays for `SiglipVisionModel(config).apply`.
    Raises ConfigError for a missing/foreign config.json and ConversionError naming every bad tensor (or the
    directory, when it holds no safetensors).
    """
    hf_cfg = hf_config.read_config_json(model_dir)
    source = os.path.join(model_dir, "config.json")
    checkpoint_config = SiglipVisionConfig.from_hf_dict(hf_cfg, source)
    if "param_dtype" in overrides:
        raise TypeError("load_siglip_vision: pass the parameter dtype as `dtype=`, not `param_dtype=`")
    overrides = {"dtype": dtype, **overrides, "param_dtype": dtype}
    config = dataclasses.replace(checkpoint_config, **{
        k: (hf_config.as_dtype(v) if k in ("dtype", "param_dtype") else v) for k, v in overrides.items()})
    ignore = list(_FULL_MODEL_ONLY) if hf_cfg["model_type"] == "siglip" else []
    if checkpoint_config.use_head and not config.use_head:
        ignore.append(r"head\..*")
    try:
        params = load_hf_params(model_dir, RULES, abstract_params(config), np.dtype(config.param_dtype),
                                ignore=ignore, rename=_strip_vision_prefix)
    except safetensors_io.SafetensorsError as e:
        raise ConversionError(model_dir, [str(e)]) from e
    return config, params


def config_to_hf_dict(config: SiglipVisionConfig, dtype=None) -> dict:
    """A transformers-5 `SiglipVisionModel` config.json dict for `config`; `dtype`: the dtype its weights are
    written in (default the config's param_dtype), which `from_pretrained(dtype="auto")` loads them as."""
    return dict(
        architectures=["SiglipVisionModel"], model_type="siglip_vision_model",
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_channels=config.num_channels, image_size=config.image_size, patch_size=config.patch_size,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps, vision_use_head=config.use_head,
        attention_dropout=0.0, dtype=jnp.dtype(config.param_dtype if dtype is None else dtype).name,
    )


def save_siglip_vision(model_dir: str, config: SiglipVisionConfig, params: dict, dtype=np.float32,
                       prefix: str = "") -> list[str]:
    """Write params as a HF `SiglipVisionModel` directory (config.json + safetensors); returns the file names.

    prefix: "" for the transformers-5 bare layout, "vision_model." for the transformers-4 / SiglipModel one.
    """
    specs = to_hf_specs(params, RULES, np.dtype(dtype), rename=(lambda n: prefix + n) if prefix else None)
    os.makedirs(model_dir, exist_ok=True)
    # The dtype written, not the params' storage one: "auto" loading would read bf16 weights saved in float32 as
    # bf16 (and the reverse).
    hf = config_to_hf_dict(config, dtype)
    atomic_write(os.path.join(model_dir, "config.json"), lambda f: json.dump(hf, f, indent=2))
    return safetensors_io.write_safetensors(model_dir, specs)
