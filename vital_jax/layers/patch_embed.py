"""The ViT patch embedding: a Conv2d with kernel = stride = patch, no padding, and a bias, written as a matmul."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchEmbedding(nn.Module):
    """(B, H, W, C) pixels -> (B, H / P, W / P, D) float32, patches in raster order.

    Parameters `kernel` (P, P, C, D) (HF's Conv2d weight in HWIO order) and `bias` (D,).
    """

    patch_size: int
    num_channels: int
    hidden_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
        p, c, d = self.patch_size, self.num_channels, self.hidden_size
        b, height, width, _ = pixels_bhwc.shape
        gh, gw = height // p, width // p
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, d), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        # A stride-P conv with a PxP kernel is a matmul over non-overlapping patches, flattened (ph, pw, c) to match
        # the HWIO kernel. Done in float32 at full precision: a low-precision patch embedding of raw pixels is a
        # known source of NaNs / drift in ViTs.
        patches = pixels_bhwc.astype(jnp.float32).reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, gh, gw, p * p * c)
        return jnp.dot(patches, kernel.astype(jnp.float32).reshape(p * p * c, d),
                       precision=jax.lax.Precision.HIGHEST) + bias.astype(jnp.float32)
