"""Qwen3-VL vision tower config, read from the `vision_config` part of a Qwen3-VL `config.json`."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from vital_jax.layers.attention import ATTENTION_IMPLS
from vital_jax.models import hf_config

@dataclasses.dataclass(frozen=True)
class Qwen3VLVisionConfig:
    """Architecture of the Qwen3-VL ViT (patch embed, blocks, 2x2 merger, deepstack mergers) plus precision.

    `dtype` is the activation dtype of the blocks and mergers; patch embedding, position embeddings, rotary
    tables, norms and softmax are always computed in float32. `param_dtype` is the storage dtype.
    `attention_impl` is the same switch as the text decoder's (`vital_jax.layers.attention.attend`): each slice of
    packed patches is one attention "batch" row with its block-diagonal (per-image) mask.
    `frame_attention`: when every frame of a call has the same patch count P (and padding is whole P-blocks),
    attend per frame, (N/P, P, P) scores with no mask, instead (`vision.VisionInputs.frame_patches`). P is static,
    so calls whose frames switch between one size and several compile one program per layout; False keeps a single
    program for every image size under `pad_to` (variable-resolution data).
    `attention_query_chunk` (attention_impl "xla" only): > 0 computes each frame's attention in blocks of that many
    queries (`attention._xla_attend_in_query_blocks`: same numbers, faster on CPU where the full score array
    does not stay in cache); 0 = one block, or the blocks `attention_score_block_mib` asks for.
    `attention_score_block_mib` (attention_impl "xla", attention_query_chunk 0): split each call's queries into the
    fewest equal blocks whose float32 scores (frames x heads x rows x patches) fit this many MiB; 0 = one block;
    None (the default): 20 on a CPU backend, one block on GPUs and TPUs (`attention.default_score_block_mib`: the
    blocks serve the CPU's caches, while an accelerator runs one large batched matmul better than many small ones).
    Why 20: on this project's 2-core CPU (32 MiB of L3) the vision attention ran fastest with blocks of ~19 MiB
    (two 448^2 frames, 8 heads: 25 -> 15 ms; one frame of 16 heads: 54 -> 26 ms; one frame of 8 heads, 19 MiB,
    stays one block), and slower with much smaller ones (benchmarks/README.md).
    """

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...] = ()
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_impl: str = "xla"
    frame_attention: bool = True
    attention_query_chunk: int = 0
    attention_score_block_mib: float | None = None

    def __post_init__(self):
        problems = []
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.attention_query_chunk < 0:
            problems.append(f"attention_query_chunk={self.attention_query_chunk} must be >= 0 (0 = one block)")
        if self.attention_score_block_mib is not None and self.attention_score_block_mib < 0:
            problems.append(f"attention_score_block_mib={self.attention_score_block_mib} must be >= 0 (0 = one block)")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        elif self.head_dim % 4:
            # The 2-D rotary splits head_dim/2 angles evenly between rows and columns.
            problems.append(f"head_dim={self.head_dim} must be a multiple of 4 for the 2-D rotary embedding")
        if self.num_grid_per_side ** 2 != self.num_position_embeddings:
            problems.append(f"num_position_embeddings={self.num_position_embeddings} is not a perfect square")
        if self.hidden_act not in hf_config.GELU_APPROXIMATE:
            problems.append(f"hidden_act={self.hidden_act!r} is not supported "
                            f"(use one of {sorted(hf_config.GELU_APPROXIMATE)})")
        # HF silently skips a deepstack index >= depth; here it is an error so a bad config cannot go unnoticed.
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            problems.append(f"deepstack_visual_indexes {bad} are outside the {self.depth} blocks")
        if len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
            problems.append(f"deepstack_visual_indexes {list(self.deepstack_visual_indexes)} has duplicates")
        for name in ("patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive int")
        if problems:
            raise hf_config.ConfigError("Qwen3VLVisionConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def patch_dim(self) -> int:
        """Values per processor patch: C * T * ps * ps (1536 for Qwen3-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output token (4 for a 2x2 merge)."""
        return self.spatial_merge_size ** 2

    @property
    def gelu_approximate(self) -> bool:
        return hf_config.GELU_APPROXIMATE[self.hidden_act]

    @classmethod
    @hf_config.reads_hf_fields
    def from_hf_dict(cls, cfg: dict, source: str = "config", **overrides) -> "Qwen3VLVisionConfig":
        """From a `vision_config` dict, or a whole Qwen3-VL config dict (its `vision_config` is used)."""
        if cfg.get("model_type") == "qwen3_vl" and "vision_config" in cfg:
            cfg, source = cfg["vision_config"], f"{source}:vision_config"
        # Old checkpoints label the vision part "qwen3_vl" (transformers rewrites it the same way).
        hf_config.check_model_type(cfg, ("qwen3_vl_vision", "qwen3_vl"), source)
        rope = cfg.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise hf_config.ConfigError(f"{source}: rope_type {rope.get('rope_type')!r}; only 'axial' is implemented")
        try:
            fields = dict(
                depth=cfg["depth"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_heads=cfg["num_heads"],
                out_hidden_size=cfg["out_hidden_size"],
                num_position_embeddings=cfg["num_position_embeddings"],
                deepstack_visual_indexes=tuple(cfg.get("deepstack_visual_indexes", ())),
                patch_size=cfg.get("patch_size", 16),
                temporal_patch_size=cfg.get("temporal_patch_size", 2),
                spatial_merge_size=cfg.get("spatial_merge_size", 2),
                in_channels=cfg.get("in_channels", 3),
                hidden_act=cfg.get("hidden_act", "gelu_pytorch_tanh"),
                rope_theta=float(rope.get("rope_theta", 10000.0)),
            )
        except KeyError as e:
            raise hf_config.ConfigError(f"{source}: missing key {e.args[0]!r}") from e
        fields.update({k: (hf_config.as_dtype(v) if k in ("dtype", "param_dtype") else v)
                       for k, v in overrides.items()})
        try:
            return cls(**fields)
        except hf_config.ConfigError as e:
            raise hf_config.ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_pretrained(cls, model_dir: str, **overrides) -> "Qwen3VLVisionConfig":
        return cls.from_hf_dict(hf_config.read_config_json(model_dir), f"{model_dir}/config.json", **overrides)
