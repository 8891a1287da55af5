"""SigLIP vision-tower config, read from a full `SiglipModel` or a bare `SiglipVisionModel` config.json."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vital_jax.models import hf_config

# transformers' SiglipVisionConfig defaults: older checkpoints (e.g. google/siglip-so400m) store only the fields
# that differ from these inside "vision_config", so a missing field means "the HF default", not "unknown".
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                    layer_norm_eps=1e-6, vision_use_head=True)

@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """Architecture of a SigLIP / MedSigLIP vision encoder plus runtime precision.

    `dtype` is the activation/compute dtype, `param_dtype` the storage dtype of parameters. LayerNorms and the
    attention softmax are always computed in float32; the patch embedding is computed in float32 too.
    `use_head` builds the multihead-attention-pooling head (HF `vision_use_head`), giving `pooler_output`.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    use_head: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        hf_config.check_vit_shapes(self.hidden_size, self.num_attention_heads, self.image_size, self.patch_size,
                                   self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per image side (image_size // patch_size)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image: grid_size ** 2 (SigLIP has no CLS token)."""
        return self.grid_size ** 2

    @property
    def gelu_approximate(self) -> bool:
        return hf_config.GELU_APPROXIMATE[self.hidden_act]

    @classmethod
    @hf_config.reads_hf_fields
    def from_hf_dict(cls, cfg: dict, source: str = "config", **overrides) -> "SiglipVisionConfig":
        """From a `siglip` (vision part under "vision_config") or `siglip_vision_model` config dict.

        `overrides` replace fields after reading, e.g. `dtype="bfloat16"` or `use_head=False`.
        """
        hf_config.check_model_type(cfg, ("siglip", "siglip_vision_model"), source)
        if cfg["model_type"] == "siglip":
            vision = cfg.get("vision_config")
            if not isinstance(vision, dict):
                raise hf_config.ConfigError(f"{source}: model_type 'siglip' but no 'vision_config' object")
            source = f"{source} [vision_config]"
            vision_type = vision.get("model_type", "siglip_vision_model")
            if vision_type != "siglip_vision_model":
                raise hf_config.ConfigError(f"{source}: model_type is {vision_type!r}, "
                                            "expected 'siglip_vision_model'")
        else:
            vision = cfg
        get = lambda key: vision.get(key, _HF_DEFAULTS[key])  # noqa: E731
        sizes = {key: hf_config.square_size(get(key), key, source) for key in ("image_size", "patch_size")}
        fields = dict(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            num_channels=int(get("num_channels")),
            hidden_act=get("hidden_act"),
            layer_norm_eps=float(get("layer_norm_eps")),
            use_head=bool(get("vision_use_head")),
            **sizes,
        )
        return hf_config.with_overrides(cls, fields, overrides, source)

    @classmethod
    def from_pretrained(cls, model_dir: str, **overrides) -> "SiglipVisionConfig":
        return cls.from_hf_dict(hf_config.read_config_json(model_dir), f"{model_dir}/config.json", **overrides)
