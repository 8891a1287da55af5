"""The Diagnostic Memory Sampler P_phi of MedSynapse-V (§2.2): M = P_phi(Q_0, S), N x d_h memory from a feature map.

N learnable meta-query probes Q_0 (N x d_f) read the flattened anatomical feature pool S = flat(F) (M x d_f,
M = H_f W_f) through a small pre-norm transformer whose width is the encoder's d_f, and a final projection maps
each probe to the VLM's hidden size d_h. The paper fixes only Q_0's shape, that Q_0 queries and S is the
key/value, and the N x d_h output; the issue adds "a 2-layer cross-attention transformer". Where it is silent:

* Block (per layer, pre-norm residual): probes self-attend (so the N probes can divide the pool among themselves
  rather than all settling on the most salient region; the authors' public skeleton does this too; switch off
  with `query_self_attention=False` for pure cross-attention), then cross-attend to LN(S), then an MLP (ratio 4,
  exact GELU). Multi-head attention with biased q/k/v/out projections, no mask (every pooled feature is real).
* No position embedding is added to S: the anatomical encoder's features already carry position (its ViT adds
  absolute position embeddings and keeps the grid), and the pool is order-free to the probes anyway.
* Output: a final LayerNorm, then Linear(d_f -> d_h) with bias. Its kernel starts at normal(output_rms / sqrt(d_f)),
  so the memory vectors start at the RMS of token embeddings (0.02, Qwen's embedding init) instead of ~0.6 per
  element with a default init: a first injection far outside the embedding scale is exactly the "semantic
  mismatch" Stage I exists to avoid (and NOTES' Coconut lesson on norms). `output_rms=None` uses lecun-normal.
* Q_0 ~ truncated normal(0, 0.02) (the skeleton's choice). LayerNorm eps 1e-5 (torch's default).

Parameters are float32 (the only weights Stage I trains); `dtype` is the compute dtype of the attention/MLP.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vital_jax.layers.linear import Linear
from vital_jax.layers.norms import LayerNorm


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """num_queries N (16 in the paper), hidden_size d_h (the VLM's, 4096 at 8B). d_f comes from the input."""

    hidden_size: int
    num_queries: int = 16
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: int = 4
    query_self_attention: bool = True
    output_rms: float | None = 0.02
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: str = "float32"


class MultiHeadAttention(nn.Module):
    """Unmasked multi-head attention, q (B, N, E) over kv (B, M, E) -> (B, N, E); q/k/v/out Linear with bias."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q_bne: jax.Array, kv_bme: jax.Array) -> jax.Array:
        e = q_bne.shape[-1]
        if e % self.num_heads:
            raise ValueError(f"feature dim {e} is not divisible by {self.num_heads} heads")
        h = e // self.num_heads

        def proj(name, x):
            return Linear(e, use_bias=True, dtype=self.dtype, name=name)(x).reshape(x.shape[:2] + (self.num_heads, h))

        q, k, v = proj("q_proj", q_bne), proj("k_proj", kv_bme), proj("v_proj", kv_bme)
        scores = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(jnp.float32) * (h ** -0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhnm,bmhd->bnhd", probs, v).reshape(q_bne.shape[:2] + (e,))
        return Linear(e, use_bias=True, dtype=self.dtype, name="out_proj")(out)


class SamplerBlock(nn.Module):
    """[q + SelfAttn(LN q)] -> q + CrossAttn(LN q, LN S) -> q + MLP(LN q). (B, N, E), (B, M, E) -> (B, N, E)."""

    config: SamplerConfig

    @nn.compact
    def __call__(self, q_bne: jax.Array, s_bme: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        e = q_bne.shape[-1]
        drop = nn.Dropout(cfg.dropout)
        if cfg.query_self_attention:
            h = LayerNorm(cfg.layer_norm_eps, dtype, name="self_attn_norm")(q_bne)
            q_bne = q_bne + drop(MultiHeadAttention(cfg.num_heads, dtype, name="self_attn")(h, h), deterministic)
        h = LayerNorm(cfg.layer_norm_eps, dtype, name="cross_attn_norm")(q_bne)
        s = LayerNorm(cfg.layer_norm_eps, dtype, name="cross_attn_kv_norm")(s_bme)
        q_bne = q_bne + drop(MultiHeadAttention(cfg.num_heads, dtype, name="cross_attn")(h, s), deterministic)
        h = LayerNorm(cfg.layer_norm_eps, dtype, name="mlp_norm")(q_bne)
        h = Linear(cfg.mlp_ratio * e, use_bias=True, dtype=dtype, name="fc1")(h)
        h = drop(nn.gelu(h, approximate=False), deterministic)
        return q_bne + Linear(e, use_bias=True, dtype=dtype, name="fc2")(h)


class DiagnosticMemorySampler(nn.Module):
    """P_phi: feature map F (B, H_f, W_f, d_f) from E_ana -> memory M (B, N, d_h) float32.

    Parameters: `probes` (N, d_f) = Q_0, `layers_{i}` (SamplerBlock), `final_norm`, `output_proj` (d_f -> d_h).
    """

    config: SamplerConfig

    @nn.compact
    def __call__(self, feature_map_bhwf: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        if feature_map_bhwf.ndim != 4:
            raise ValueError(f"expected a feature map (B, H_f, W_f, d_f), got shape {feature_map_bhwf.shape}")
        dtype = jnp.dtype(cfg.dtype)
        b, hf, wf, df = feature_map_bhwf.shape
        s_bmf = feature_map_bhwf.reshape(b, hf * wf, df).astype(dtype)  # S = flat(F), row-major over the grid
        probes = self.param("probes", nn.initializers.truncated_normal(0.02), (cfg.num_queries, df), jnp.float32)
        q_bnf = jnp.broadcast_to(probes.astype(dtype), (b, cfg.num_queries, df))
        for i in range(cfg.num_layers):
            q_bnf = SamplerBlock(cfg, name=f"layers_{i}")(q_bnf, s_bmf, deterministic)
        q_bnf = LayerNorm(cfg.layer_norm_eps, dtype, name="final_norm")(q_bnf)
        init = (nn.initializers.lecun_normal() if cfg.output_rms is None
                else nn.initializers.normal(cfg.output_rms / math.sqrt(df)))
        memory = Linear(cfg.hidden_size, use_bias=True, dtype=dtype, kernel_init=init, name="output_proj")(q_bnf)
        return memory.astype(jnp.float32)
