"""Rotary position embeddings.

The attention layer takes precomputed `cos, sin` of shape (B, T, H) so that a model chooses its own rotary
variant: plain 1-D RoPE (`rope_cos_sin`) for Qwen3, or the interleaved 3-axis multimodal RoPE for Qwen3-VL
(built in `vital_jax.models.qwen3_vl`), without any branch in the shared attention code.
"""

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies (head_dim // 2,), float32, as `1 / theta ** (arange(0, H, 2) / H)`."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    return (1.0 / (theta ** exponent)).astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """1-D RoPE tables. positions (B, T) int -> cos, sin (B, T, H) in `dtype` (angles computed in float32)."""
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return angles_to_cos_sin(angles, dtype)


def angles_to_cos_sin(angles_bth2: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(B, T, H/2) float32 angles -> cos, sin (B, T, H) laid out as `cat([f, f])` for rotate-half RoPE."""
    emb = jnp.concatenate([angles_bth2, angles_bth2], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate-half RoPE on (B, T, N, H) with cos/sin (B, T, H) broadcast over heads."""
    cos = cos_bth[:, :, None, :]
    sin = sin_bth[:, :, None, :]
    return x_btnh * cos + _rotate_half(x_btnh) * sin
