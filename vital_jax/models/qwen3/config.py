"""Qwen3 architecture config, read from a HF `config.json`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vital_jax.layers.attention import ATTENTION_IMPLS
from vital_jax.layers.linear import PROJECTION_NAME
from vital_jax.models import hf_config

# What a rematerialised layer keeps from its forward pass (`remat_policy`), besides its input: "full" nothing (every
# matmul runs again in the backward pass, ~1.4x the model FLOPs of an 8B step), "dots" the outputs of the weight
# matmuls (projections and MLP; `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`): only attention and the
# elementwise work run again, for the memory of those outputs (at Qwen3-VL-8B with LoRA on all seven projections,
# bf16: ~78k values per token and layer, the base and adapter matmuls' outputs, ~5.6 MB per token over 36 layers),
# "projections" each projection's output with its adapter's product added (`layers.linear.PROJECTION_NAME`): about
# half of what "dots" keeps (~39k values per token and layer at 8B), for running the rank-r adapter products and
# attention again.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "projections": jax.checkpoint_policies.save_only_these_names(PROJECTION_NAME)}


# transformers' defaults (5.x) for fields a config.json may omit: head_dim 128 whatever the hidden size, and a
# rope_theta of the model type's own.
HF_DEFAULT_HEAD_DIM = 128
HF_DEFAULT_ROPE_THETA = {"qwen3": 1e4, "qwen3_vl_text": 5e5}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture of a Qwen3 decoder (also the text part of Qwen3-VL) plus runtime precision.

    `dtype` is the activation/compute dtype, `param_dtype` the storage dtype of parameters. Norms, softmax
    and losses are always float32 internally. `remat` recomputes each layer in the backward pass, keeping what
    `remat_policy` names (`REMAT_POLICIES`);
    `scan_layers` runs the layers as one `nn.scan` over stacked parameters (`model/layers/...` with a leading
    layer axis instead of `model/layers_{i}/...`; see `params.stack_layers`), which compiles one layer instead
    of all of them and is what makes `remat` bound memory: with unrolled layers XLA may schedule every layer's
    recomputation early, so the backward pass holds all of them at once. `attention_impl` chooses how attention
    is computed (`vital_jax.layers.attention.attend`: "xla", the reference; "dot_product",
    `jax.nn.dot_product_attention`'s XLA formulation; "cudnn", cuDNN's flash attention on NVIDIA GPUs; "pallas_flash",
    the Pallas TPU kernel). `fused_projections` holds each layer's q|k|v kernels as one `qkv_proj` and
    gate|up as one `gate_up_proj` (columns concatenated in that order; `params.fuse_projections`): fewer, larger
    matrix-vector products per decode step, the same numbers. A decoding layout (`qwen3_vl.params.decoding_layout`),
    not a checkpoint one: HF checkpoints, converted directories and training keep the projections apart, which is
    where LoRA adapts them one by one.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    eos_token_ids: tuple[int, ...] = ()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    attention_impl: str = "xla"
    remat_policy: str = "full"
    fused_projections: bool = False

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise hf_config.ConfigError(f"remat_policy={self.remat_policy!r} is not one of {tuple(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise hf_config.ConfigError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise hf_config.ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    @hf_config.reads_hf_fields
    def from_hf_dict(cls, cfg: dict, source: str = "config", model_types: tuple[str, ...] = ("qwen3",),
                     **overrides) -> "Qwen3Config":
        """Read the fields of a HF Qwen3 config dict. `model_types` lets Qwen3-VL read its `text_config`."""
        hf_config.check_model_type(cfg, model_types, source)
        model_type = cfg.get("model_type", model_types[0])
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        fields = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            # A field config.json leaves out takes transformers' default for it, so both read one model.
            head_dim=cfg.get("head_dim", HF_DEFAULT_HEAD_DIM),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=hf_config.rope_theta(cfg, HF_DEFAULT_ROPE_THETA.get(model_type, 1e4)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 40960),
            eos_token_ids=eos,
        )
        if cfg.get("attention_bias"):
            raise hf_config.ConfigError(f"{source}: attention_bias=True is not supported by Qwen3 here")
        if cfg.get("use_sliding_window"):
            raise hf_config.ConfigError(f"{source}: sliding-window attention is not supported")
        fields.update({k: (hf_config.as_dtype(v) if k in ("dtype", "param_dtype") else v)
                       for k, v in overrides.items()})
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, model_dir: str, **overrides) -> "Qwen3Config":
        return cls.from_hf_dict(hf_config.read_config_json(model_dir), f"{model_dir}/config.json", **overrides)
