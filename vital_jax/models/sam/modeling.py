"""SAM (v1) ViT image encoder (flax.linen), numerically matching transformers' `SamVisionModel`.

Input `pixel_values` are channels-last (B, S, S, C) float32 with S = config.image_size, as produced by
`preprocessing.SamPreprocessor` (HF uses channels-first; transpose HF tensors with `x.transpose(0, 2, 3, 1)`).
The output feature map is channels-last too: (B, G, G, output_channels), G = S / patch_size (HF returns it
channels-first).

Forward: Conv2d patch embedding -> + learned absolute position embedding (G, G, D) -> `num_hidden_layers`
pre-LN blocks whose attention is windowed (`window_size`, grid zero-padded to a multiple of it; the padding
tokens take part in the attention as keys, as in SAM) or global (`global_attn_indexes`), each with MViTv2
decomposed relative positions added to the logits -> neck: 1x1 conv, LayerNorm over channels, 3x3 conv
(padding 1), LayerNorm over channels (both convs without bias).

Parameter tree (mirrors the HF module names under `vision_encoder.`, see params.py):
  patch_embed/projection/{kernel (P, P, C, D) HWIO, bias}      pos_embed (1, G, G, D)
  layers_{i}/{layer_norm1, layer_norm2}/{scale, bias}          layers_{i}/mlp/{lin1, lin2}/{kernel, bias}
  layers_{i}/attn/qkv/{kernel (D, 3D) columns q|k|v, bias}     layers_{i}/attn/proj/{kernel, bias}
  layers_{i}/attn/{rel_pos_h, rel_pos_w} (2 * side - 1, D / N), side = window_size, or G for a global layer
  neck/conv1/kernel (1, 1, D, C)  neck/conv2/kernel (3, 3, C, C)  neck/{layer_norm1, layer_norm2}/{scale, bias}
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.layers.linear import Linear
from vital_jax.layers.patch_embed import PatchEmbedding
from vital_jax.layers.norms import LayerNorm
from vital_jax.models.sam.config import NECK_LAYER_NORM_EPS, SamVisionConfig


@flax.struct.dataclass
class SamVisionOutput:
    """last_hidden_state (B, G, G, output_channels): the neck output, SAM's "image embedding" (HF's
    `last_hidden_state`, channels-last here). encoder_hidden_state (B, G, G, D): the last ViT block's output,
    before the neck. hidden_states: with `output_hidden_states=True`, the embeddings and every block's output,
    each (B, G, G, D) (num_hidden_layers + 1 entries, HF's order); else None."""

    last_hidden_state: jax.Array
    encoder_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def _relative_index(size: int) -> np.ndarray:
    """(size, size) int: row q, column k -> q - k + size - 1, the row of a (2 * size - 1, H) table."""
    coords = np.arange(size)
    return coords[:, None] - coords[None, :] + size - 1


class SamVisionAttention(nn.Module):
    """Multi-head self-attention over a (rows x cols) token grid with decomposed relative positions.

    logits[q, k] = (q / sqrt(H)) . k + q . R_h[q_row - k_row] + q . R_w[q_col - k_col], where R_h, R_w are
    learned (2 * side - 1, H) tables (the unscaled query multiplies them, as in SAM). `side` is the grid side this
    layer is built for (the window, or the full grid for a global layer); inputs must be side x side.
    (B, side, side, D) -> (B, side, side, D).
    """

    config: SamVisionConfig
    side: int

    @nn.compact
    def __call__(self, x_byxd: jax.Array) -> jax.Array:
        cfg = self.config
        b, rows, cols, d = x_byxd.shape
        n, h = cfg.num_attention_heads, cfg.head_dim
        if (rows, cols) != (self.side, self.side):
            raise ValueError(f"attention built for a {self.side}x{self.side} grid got {rows}x{cols} tokens")
        qkv = Linear(3 * d, use_bias=cfg.qkv_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="qkv")(x_byxd)
        qkv = qkv.reshape(b, rows * cols, 3, n, h)
        q_btnh, k_bsnh, v_bsnh = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh.astype(jnp.float32) * (h ** -0.5),
                                 k_bsnh.astype(jnp.float32))
        if cfg.use_rel_pos:
            table_shape = (2 * self.side - 1, h)
            rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros, table_shape, cfg.param_dtype)
            rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros, table_shape, cfg.param_dtype)
            index = _relative_index(self.side)
            r_h = rel_pos_h.astype(jnp.float32)[index]  # (rows_q, rows_k, H)
            r_w = rel_pos_w.astype(jnp.float32)[index]  # (cols_q, cols_k, H)
            q_bnyxh = q_btnh.astype(jnp.float32).reshape(b, rows, cols, n, h).transpose(0, 3, 1, 2, 4)
            bias_h = jnp.einsum("bnyxh,ykh->bnyxk", q_bnyxh, r_h)  # (B, N, rows_q, cols_q, rows_k)
            bias_w = jnp.einsum("bnyxh,xkh->bnyxk", q_bnyxh, r_w)  # (B, N, rows_q, cols_q, cols_k)
            bias = bias_h[..., :, None] + bias_w[..., None, :]
            scores_bnts = scores_bnts + bias.reshape(b, n, rows * cols, rows * cols)
        probs = jax.nn.softmax(scores_bnts, axis=-1).astype(v_bsnh.dtype)
        out = jnp.einsum("bnts,bsnh->btnh", probs, v_bsnh).reshape(b, rows, cols, d)
        return Linear(d, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="proj")(out)


def window_partition(x_byxd: jax.Array, window: int) -> jax.Array:
    """(B, R, C, D) -> (B * nR * nC, window, window, D), zero-padding R and C up to multiples of `window`;
    windows in raster order per image."""
    b, rows, cols, d = x_byxd.shape
    pad_r, pad_c = -rows % window, -cols % window
    x = jnp.pad(x_byxd, ((0, 0), (0, pad_r), (0, pad_c), (0, 0)))
    nr, nc = (rows + pad_r) // window, (cols + pad_c) // window
    x = x.reshape(b, nr, window, nc, window, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nr * nc, window, window, d)


def window_unpartition(windows: jax.Array, window: int, rows: int, cols: int) -> jax.Array:
    """Inverse of `window_partition`: (B * nR * nC, window, window, D) -> (B, rows, cols, D), padding dropped."""
    nr, nc = -(-rows // window), -(-cols // window)
    d = windows.shape[-1]
    b = windows.shape[0] // (nr * nc)
    x = windows.reshape(b, nr, nc, window, window, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nr * window, nc * window, d)[:, :rows, :cols]


class SamMLPBlock(nn.Module):
    """lin1 -> GELU (exact for SAM) -> lin2. (..., D) -> (..., D)."""

    config: SamVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = Linear(cfg.mlp_dim, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="lin1")(x)
        x = jax.nn.gelu(x, approximate=cfg.gelu_approximate)
        return Linear(cfg.hidden_size, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="lin2")(x)


class SamVisionLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)) (windowed when `window` > 0, else over the whole grid), then
    x + mlp(ln2(x)). (B, G, G, D) -> (B, G, G, D)."""

    config: SamVisionConfig
    window: int

    @nn.compact
    def __call__(self, x_byxd: jax.Array) -> jax.Array:
        cfg = self.config
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,  # noqa
                                      name=name)
        _, rows, cols, _ = x_byxd.shape
        y = norm("layer_norm1")(x_byxd)
        if self.window > 0:
            # The padding is added after the LayerNorm, so padded tokens are exact zeros (their keys and values
            # are the projection biases); they are attended to, like in SAM.
            y = SamVisionAttention(cfg, self.window, name="attn")(window_partition(y, self.window))
            y = window_unpartition(y, self.window, rows, cols)
        else:
            y = SamVisionAttention(cfg, rows, name="attn")(y)
        x_byxd = x_byxd + y
        return x_byxd + SamMLPBlock(cfg, name="mlp")(norm("layer_norm2")(x_byxd))


class _Conv(nn.Module):
    """A bias-free stride-1 'SAME' Conv2d, kernel (k, k, in, out) HWIO. (B, R, C, in) -> (B, R, C, out)."""

    features: int
    kernel_size: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_byxc: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x_byxc.shape[-1], self.features),
                            self.param_dtype)
        return jax.lax.conv_general_dilated(x_byxc.astype(self.dtype), kernel.astype(self.dtype), (1, 1),
                                            [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class SamVisionNeck(nn.Module):
    """1x1 conv -> channel LayerNorm -> 3x3 conv -> channel LayerNorm. (B, G, G, D) -> (B, G, G, output_channels)."""

    config: SamVisionConfig

    @nn.compact
    def __call__(self, x_byxd: jax.Array) -> jax.Array:
        cfg = self.config
        c = cfg.output_channels
        norm = lambda name: LayerNorm(NECK_LAYER_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype,  # noqa
                                      name=name)
        x = _Conv(c, 1, cfg.dtype, cfg.param_dtype, name="conv1")(x_byxd)
        x = norm("layer_norm1")(x)
        x = _Conv(c, 3, cfg.dtype, cfg.param_dtype, name="conv2")(x)
        return norm("layer_norm2")(x)


class SamVisionEncoder(nn.Module):
    """SAM ViT image encoder: pixels (B, S, S, C) float, S = image_size -> SamVisionOutput.

    `last_hidden_state` (B, G, G, output_channels) is the neck output (HF's `last_hidden_state`, channels-last),
    G = image_size / patch_size.
    """

    config: SamVisionConfig

    @nn.compact
    def __call__(self, pixel_values_bhwc: jax.Array, output_hidden_states: bool = False) -> SamVisionOutput:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values_bhwc.ndim != 4 or tuple(pixel_values_bhwc.shape[1:]) != expected:
            raise ValueError(f"SamVisionEncoder expects channels-last pixel_values of shape (B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}); got {tuple(pixel_values_bhwc.shape)}. "
                             "(HF tensors are (B, C, H, W): transpose them with .transpose(0, 2, 3, 1).)")
        x = PatchEmbedding(cfg.patch_size, cfg.num_channels, cfg.hidden_size, cfg.param_dtype,
                           name="patch_embed")(pixel_values_bhwc)
        if cfg.use_abs_pos:
            g = cfg.grid_size
            pos = self.param("pos_embed", nn.initializers.zeros, (1, g, g, cfg.hidden_size), cfg.param_dtype)
            x = x + pos.astype(jnp.float32)
        x = x.astype(cfg.dtype)
        hidden_states = [x]
        for i in range(cfg.num_hidden_layers):
            x = SamVisionLayer(cfg, cfg.layer_window(i), name=f"layers_{i}")(x)
            hidden_states.append(x)
        neck = SamVisionNeck(cfg, name="neck")(x)
        return SamVisionOutput(last_hidden_state=neck, encoder_hidden_state=x,
                               hidden_states=tuple(hidden_states) if output_hidden_states else None)

    def dummy_input(self, batch: int = 1) -> jax.Array:
        """Zero pixels of the right shape, for `jax.eval_shape(model.init, rng, model.dummy_input())`."""
        cfg = self.config
        return jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
