"""SAM (Segment Anything, v1) image-encoder config, read from a full `SamModel` or a bare `SamVisionModel`
config.json. MedSAM v1 checkpoints are SAM ViT-B models of the same architecture."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vital_jax.models import hf_config

# transformers' SamVisionConfig defaults (the SAM ViT-H layout except hidden size): a hub config.json may omit
# fields equal to these, so a missing field means "the HF default", not "unknown".
_HF_DEFAULTS = dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12,
                    num_channels=3, image_size=1024, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
                    qkv_bias=True, mlp_ratio=4.0, mlp_dim=None, use_abs_pos=True, use_rel_pos=True, window_size=14,
                    global_attn_indexes=(2, 5, 8, 11))

# The neck's two LayerNorms (HF `SamLayerNorm`, channels-first) use their constructor default, not
# `layer_norm_eps` from the config.
NECK_LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class SamVisionConfig:
    """Architecture of a SAM ViT image encoder plus runtime precision.

    Layers whose index is in `global_attn_indexes` attend over the whole patch grid; the others attend inside
    non-overlapping `window_size` x `window_size` windows (the grid zero-padded to a multiple of the window).
    The neck maps the ViT's `hidden_size` to `output_channels` (256 in SAM/MedSAM) at the patch-grid resolution.
    `dtype` is the activation/compute dtype, `param_dtype` the storage dtype of parameters. LayerNorms, the
    attention softmax with its relative-position terms, and the patch embedding are computed in float32.
    Square images only: transformers builds the position embedding and the global layers' relative positions
    for an `image_size` x `image_size` input and rejects other sizes.
    """

    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    mlp_dim: int = 3072
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        hf_config.check_vit_shapes(self.hidden_size, self.num_attention_heads, self.image_size, self.patch_size,
                                   self.hidden_act)
        if self.window_size < 0:
            raise hf_config.ConfigError(f"window_size={self.window_size} must be >= 0 (0: every layer global)")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad:
            # transformers silently ignores such indexes; a typo here would quietly make a layer windowed.
            raise hf_config.ConfigError(f"global_attn_indexes {bad} are outside 0..{self.num_hidden_layers - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per image side, also the side of the output feature map (image_size // patch_size)."""
        return self.image_size // self.patch_size

    def layer_window(self, index: int) -> int:
        """The attention window of layer `index`: 0 for a global layer, else `window_size`."""
        return 0 if index in self.global_attn_indexes else self.window_size

    @property
    def gelu_approximate(self) -> bool:
        return hf_config.GELU_APPROXIMATE[self.hidden_act]

    @classmethod
    @hf_config.reads_hf_fields
    def from_hf_dict(cls, cfg: dict, source: str = "config", **overrides) -> "SamVisionConfig":
        """From a `sam` (vision part under "vision_config") or `sam_vision_model` config dict.

        `overrides` replace fields after reading, e.g. `dtype="bfloat16"`.
        """
        hf_config.check_model_type(cfg, ("sam", "sam_vision_model"), source)
        if cfg["model_type"] == "sam":
            vision = cfg.get("vision_config") or {}
            if not isinstance(vision, dict):
                raise hf_config.ConfigError(f"{source}: model_type 'sam' but 'vision_config' is not an object")
            source = f"{source} [vision_config]"
            vision_type = vision.get("model_type", "sam_vision_model")
            if vision_type != "sam_vision_model":
                raise hf_config.ConfigError(f"{source}: model_type is {vision_type!r}, expected 'sam_vision_model'")
        else:
            vision = cfg
        get = lambda key: vision[key] if vision.get(key) is not None else _HF_DEFAULTS[key]  # noqa: E731
        sizes = {key: hf_config.square_size(get(key), key, source) for key in ("image_size", "patch_size")}
        hidden = int(get("hidden_size"))
        mlp_dim = vision.get("mlp_dim")
        fields = dict(
            hidden_size=hidden,
            output_channels=int(get("output_channels")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            num_channels=int(get("num_channels")),
            hidden_act=get("hidden_act"),
            layer_norm_eps=float(get("layer_norm_eps")),
            qkv_bias=bool(get("qkv_bias")),
            # transformers: mlp_dim = int(hidden_size * mlp_ratio) when unset.
            mlp_dim=int(mlp_dim) if mlp_dim is not None else int(hidden * float(get("mlp_ratio"))),
            use_abs_pos=bool(get("use_abs_pos")),
            use_rel_pos=bool(get("use_rel_pos")),
            window_size=int(get("window_size")),
            global_attn_indexes=tuple(int(i) for i in get("global_attn_indexes")),
            **sizes,
        )
        return hf_config.with_overrides(cls, fields, overrides, source)

    @classmethod
    def from_pretrained(cls, model_dir: str, **overrides) -> "SamVisionConfig":
        return cls.from_hf_dict(hf_config.read_config_json(model_dir), f"{model_dir}/config.json", **overrides)
