"""SigLIP / MedSigLIP vision encoder (flax.linen), numerically matching transformers' `SiglipVisionModel`.

Input `pixel_values` are channels-last (B, H, W, C) float32, as produced by `preprocessing.preprocess_image`
(HF uses channels-first (B, C, H, W); transpose with `x.transpose(0, 2, 3, 1)` when feeding HF tensors).
H = W = config.image_size: the learned position embedding is not interpolated to other sizes.

Parameter tree (mirrors the HF module names, see params.py):
  embeddings/patch_embedding/{kernel (P, P, C, D) HWIO, bias}   embeddings/position_embedding/embedding (N, D)
  encoder/layers_{i}/{layer_norm1, layer_norm2}/{scale, bias}
  encoder/layers_{i}/self_attn/{q_proj, k_proj, v_proj, out_proj}/{kernel, bias}
  encoder/layers_{i}/mlp/{fc1, fc2}/{kernel, bias}               post_layernorm/{scale, bias}
  head/probe (1, 1, D), head/attention/{in_proj (D, 3D, columns q|k|v), out_proj}, head/layernorm, head/mlp
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vital_jax.layers.embedding import Embed
from vital_jax.layers.linear import Linear
from vital_jax.layers.patch_embed import PatchEmbedding
from vital_jax.layers.norms import LayerNorm
from vital_jax.models.siglip.config import SiglipVisionConfig


@flax.struct.dataclass
class SiglipVisionOutput:
    """last_hidden_state (B, N, D) after post_layernorm; pooler_output (B, D) from the MAP head, or None when
    the config has no head."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None


def _multihead_attention(q_btd: jax.Array, k_bsd: jax.Array, v_bsd: jax.Array, num_heads: int) -> jax.Array:
    """Non-causal scaled dot-product attention over all keys; softmax in float32. Returns (B, T, D)."""
    b, t, d = q_btd.shape
    s = k_bsd.shape[1]
    h = d // num_heads
    q = q_btd.reshape(b, t, num_heads, h)
    k = k_bsd.reshape(b, s, num_heads, h)
    v = v_bsd.reshape(b, s, num_heads, h)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * (h ** -0.5)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, d)


class SiglipEmbeddings(nn.Module):
    """Patch embedding + learned position embedding (one per patch, no CLS). (B, H, W, C) -> (B, N, D) in
    `config.dtype`."""

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
        cfg = self.config
        x_bghd = PatchEmbedding(cfg.patch_size, cfg.num_channels, cfg.hidden_size, cfg.param_dtype,
                                name="patch_embedding")(pixels_bhwc)
        x_bnd = x_bghd.reshape(x_bghd.shape[0], -1, cfg.hidden_size)  # raster order
        pos_nd = Embed(cfg.num_patches, cfg.hidden_size, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                          name="position_embedding").embedding
        return (x_bnd + pos_nd.astype(jnp.float32)[None]).astype(cfg.dtype)


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention with separate biased q/k/v/out projections. (B, N, D) -> same."""

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, x_bnd: jax.Array) -> jax.Array:
        cfg = self.config
        proj = lambda name: Linear(cfg.hidden_size, use_bias=True, dtype=cfg.dtype,  # noqa: E731
                                   param_dtype=cfg.param_dtype, name=name)
        out = _multihead_attention(proj("q_proj")(x_bnd), proj("k_proj")(x_bnd), proj("v_proj")(x_bnd),
                                   cfg.num_attention_heads)
        return proj("out_proj")(out)


class SiglipMLP(nn.Module):
    """fc1 -> GELU (tanh approximation or exact, from `hidden_act`) -> fc2. (..., D) -> (..., D)."""

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = Linear(cfg.intermediate_size, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   name="fc1")(x)
        x = jax.nn.gelu(x, approximate=cfg.gelu_approximate)
        return Linear(cfg.hidden_size, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="fc2")(x)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). (B, N, D) -> (B, N, D)."""

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, x_bnd: jax.Array) -> jax.Array:
        cfg = self.config
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,  # noqa
                                      name=name)
        x_bnd = x_bnd + SiglipAttention(cfg, name="self_attn")(norm("layer_norm1")(x_bnd))
        return x_bnd + SiglipMLP(cfg, name="mlp")(norm("layer_norm2")(x_bnd))


class SiglipEncoder(nn.Module):
    """`num_hidden_layers` encoder layers. (B, N, D) -> (B, N, D)."""

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, x_bnd: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x_bnd = SiglipEncoderLayer(self.config, name=f"layers_{i}")(x_bnd)
        return x_bnd


class SiglipPoolingHead(nn.Module):
    """Multihead attention pooling (MAP): a learned probe attends over the tokens, then a residual MLP.

    The attention is torch's `nn.MultiheadAttention`, whose fused `in_proj` holds the q, k and v projections
    (HF rows q|k|v; here kernel columns q|k|v). (B, N, D) -> (B, D).
    """

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, x_bnd: jax.Array) -> jax.Array:
        cfg = self.config
        d = cfg.hidden_size
        b = x_bnd.shape[0]
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, d), cfg.param_dtype)
        probe_b1d = jnp.broadcast_to(probe.astype(cfg.dtype), (b, 1, d))
        pooled_b1d = _PoolingAttention(cfg, name="attention")(probe_b1d, x_bnd)
        normed = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           name="layernorm")(pooled_b1d)
        pooled_b1d = pooled_b1d + SiglipMLP(cfg, name="mlp")(normed)
        return pooled_b1d[:, 0]


class _FusedInProj(nn.Module):
    """The (D, 3D) kernel and (3D,) bias of torch MultiheadAttention's fused q|k|v input projection."""

    features: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        d = self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (d, 3 * d), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (3 * d,), self.param_dtype)
        return kernel, bias


class _PoolingAttention(nn.Module):
    """torch.nn.MultiheadAttention(query=probe (B, T, D), key=value=x (B, S, D)) -> (B, T, D)."""

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, q_btd: jax.Array, x_bsd: jax.Array) -> jax.Array:
        cfg = self.config
        d = cfg.hidden_size
        # Query columns apply to the probe, key/value columns to the tokens, so the fused parameter is sliced
        # rather than applied as one Linear (it stays one tensor to mirror HF's in_proj_weight one-to-one).
        kernel, bias = _FusedInProj(d, cfg.param_dtype, name="in_proj")()
        kernel, bias = kernel.astype(cfg.dtype), bias.astype(cfg.dtype)
        q = jnp.dot(q_btd.astype(cfg.dtype), kernel[:, :d]) + bias[:d]
        k = jnp.dot(x_bsd.astype(cfg.dtype), kernel[:, d:2 * d]) + bias[d:2 * d]
        v = jnp.dot(x_bsd.astype(cfg.dtype), kernel[:, 2 * d:]) + bias[2 * d:]
        out = _multihead_attention(q, k, v, cfg.num_attention_heads)
        return Linear(d, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out_proj")(out)


class SiglipVisionModel(nn.Module):
    """SigLIP vision tower: pixels (B, H, W, C) float, H = W = image_size -> SiglipVisionOutput.

    `last_hidden_state` (B, N, D), N = (image_size / patch_size)^2 tokens in raster order, is the output of
    `post_layernorm` (what HF returns as `last_hidden_state`); `pooler_output` (B, D) is the MAP-head output
    when `config.use_head`, else None.
    """

    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, pixel_values_bhwc: jax.Array) -> SiglipVisionOutput:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values_bhwc.ndim != 4 or tuple(pixel_values_bhwc.shape[1:]) != expected:
            raise ValueError(f"SiglipVisionModel expects channels-last pixel_values of shape (B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}); got {tuple(pixel_values_bhwc.shape)}. "
                             "(HF tensors are (B, C, H, W): transpose them with .transpose(0, 2, 3, 1).)")
        x_bnd = SiglipEmbeddings(cfg, name="embeddings")(pixel_values_bhwc)
        x_bnd = SiglipEncoder(cfg, name="encoder")(x_bnd)
        x_bnd = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          name="post_layernorm")(x_bnd)
        pooled = SiglipPoolingHead(cfg, name="head")(x_bnd) if cfg.use_head else None
        return SiglipVisionOutput(last_hidden_state=x_bnd, pooler_output=pooled)

    def dummy_input(self, batch: int = 1) -> jax.Array:
        """Zero pixels of the right shape, for `jax.eval_shape(model.init, rng, model.dummy_input())`."""
        cfg = self.config
        return jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
