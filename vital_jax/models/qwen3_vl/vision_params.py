"""HF <-> Flax parameter names for the Qwen3-VL vision tower (`model.visual.*` <-> `visual/*`).

`VISION_RULES` can be concatenated with the text-model rules to map a whole Qwen3VLForConditionalGeneration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.models.hf_mapping import IDENTITY, LINEAR, Rule, Transform, load_hf_params
from vital_jax.models.qwen3_vl.vision import Qwen3VLVisionModel
from vital_jax.models.qwen3_vl.vision_config import Qwen3VLVisionConfig


def conv3d_patch_transform(in_channels: int, temporal_patch_size: int, patch_size: int) -> Transform:
    """Conv3d weight [D, C, T, ps, ps] <-> Dense kernel [C*T*ps*ps, D].

    The processor flattens each patch in (C, T, ps, ps) order, the Conv3d weight's own layout, so a row-major
    flatten of the weight is exactly the dense kernel (transposed to Flax's [in, out]).
    """
    patch_shape = (in_channels, temporal_patch_size, patch_size, patch_size)
    patch_dim = int(np.prod(patch_shape))

    def to_flax(w):
        if w.shape[1:] != patch_shape:
            raise ValueError(f"Conv3d weight {tuple(w.shape)} does not have the patch shape [D, *{patch_shape}]")
        return w.reshape(w.shape[0], patch_dim).T

    def to_hf(kernel):
        if kernel.shape[0] != patch_dim:
            raise ValueError(f"patch-embed kernel {tuple(kernel.shape)} does not take {patch_dim} = C*T*ps*ps inputs "
                             f"for (C, T, ps) = {patch_shape[:3]}")
        return kernel.T.reshape(kernel.shape[1], *patch_shape)

    return Transform(to_flax, to_hf)


def vision_rules(hf_prefix: str = "model.visual.", flax_prefix: str = "visual/", in_channels: int = 3,
                 temporal_patch_size: int = 2, patch_size: int = 16) -> list[Rule]:
    """Rules for the vision tower under the given prefixes (the patch shape fixes the Conv3d layout on export)."""
    p = hf_prefix.replace(".", r"\.")
    f = flax_prefix

    def linear(hf: str, flax: str) -> list[Rule]:
        return [Rule(rf"{p}{hf}\.weight", f"{f}{flax}/kernel", LINEAR),
                Rule(rf"{p}{hf}\.bias", f"{f}{flax}/bias", IDENTITY)]

    def layer_norm(hf: str, flax: str) -> list[Rule]:
        return [Rule(rf"{p}{hf}\.weight", f"{f}{flax}/scale", IDENTITY),
                Rule(rf"{p}{hf}\.bias", f"{f}{flax}/bias", IDENTITY)]

    def merger(hf: str, flax: str) -> list[Rule]:
        return (layer_norm(rf"{hf}\.norm", f"{flax}/norm") + linear(rf"{hf}\.linear_fc1", f"{flax}/linear_fc1")
                + linear(rf"{hf}\.linear_fc2", f"{flax}/linear_fc2"))

    block, fblock = r"blocks\.(?P<i>\d+)", "blocks_{i}"
    return [
        Rule(rf"{p}patch_embed\.proj\.weight", f"{f}patch_embed/kernel",
             conv3d_patch_transform(in_channels, temporal_patch_size, patch_size)),
        Rule(rf"{p}patch_embed\.proj\.bias", f"{f}patch_embed/bias", IDENTITY),
        Rule(rf"{p}pos_embed\.weight", f"{f}pos_embed/embedding", IDENTITY),
        *layer_norm(rf"{block}\.norm1", f"{fblock}/norm1"),
        *layer_norm(rf"{block}\.norm2", f"{fblock}/norm2"),
        *linear(rf"{block}\.attn\.qkv", f"{fblock}/attn/qkv"),
        *linear(rf"{block}\.attn\.proj", f"{fblock}/attn/proj"),
        *linear(rf"{block}\.mlp\.linear_fc1", f"{fblock}/mlp/linear_fc1"),
        *linear(rf"{block}\.mlp\.linear_fc2", f"{fblock}/mlp/linear_fc2"),
        *merger(r"merger", "merger"),
        *merger(r"deepstack_merger_list\.(?P<k>\d+)", "deepstack_merger_list_{k}"),
    ]


# Qwen3-VL checkpoints all use 3 channels, 2 frames and 16x16 patches.
VISION_RULES = vision_rules()


def rules_for(config: Qwen3VLVisionConfig, hf_prefix: str = "model.visual.", flax_prefix: str = "visual/"):
    """`vision_rules` with the patch shape of `config`."""
    return vision_rules(hf_prefix, flax_prefix, config.in_channels, config.temporal_patch_size, config.patch_size)


def abstract_params(config: Qwen3VLVisionConfig) -> dict:
    """The vision tower's Flax 'params' tree (without the `visual/` level) as ShapeDtypeStructs."""
    model = Qwen3VLVisionModel(config)
    # The smallest valid grid: one frame of one merge block.
    grid = ((1, config.spatial_merge_size, config.spatial_merge_size),)
    pixels = jnp.zeros((config.merge_unit, config.patch_dim), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), pixels, grid))["params"]


def load_vision_params(model_dir: str, config: Qwen3VLVisionConfig) -> dict:
    """Read the `model.visual.*` tensors of a HF Qwen3-VL checkpoint into the vision tower's params.

    Every other tensor (text model, lm_head) is skipped. Returns the tree without the `visual/` level (numpy
    arrays in `config.param_dtype`), ready for `Qwen3VLVisionModel(config).apply({'params': ...}, ...)`.
    """
    loaded = load_hf_params(model_dir, rules_for(config), {"visual": abstract_params(config)}, config.param_dtype,
                            ignore=[r"(?!model\.visual\.).*"])
    return loaded["visual"]
