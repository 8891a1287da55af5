"""Training-time scaffolding heads: the visual projector (Eq. 5) and pj_in (Eq. 3)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vital_jax.layers.linear import Linear
from vital_jax.layers.norms import LayerNorm


class VisualProjector(nn.Module):
    """Eq. (5) of the paper: VP(z) = LN_dv(W2(GELU(W1 LN_d(z)) + z)), dropout after the GELU.

    W1: d x d (with bias), W2: d -> dv (with bias), LayerNorms with affine parameters (eps 1e-5, as torch's
    default), exact-erf GELU. z (..., d) -> (..., dv) float32 (it feeds an fp32 regression loss).
    """

    roi_dim: int
    dropout: float = 0.1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        d = z.shape[-1]
        h = LayerNorm(1e-5, self.dtype, self.param_dtype, name="norm_in")(z)
        h = Linear(d, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(h)
        h = nn.gelu(h, approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        # The residual is around the d-dimensional expansion, before the projection to dv.
        h = Linear(self.roi_dim, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(
            h + z.astype(self.dtype))
        return LayerNorm(1e-5, jnp.float32, self.param_dtype, name="norm_out")(h)


class PjIn(nn.Module):
    """pj_in of Eq. (3): Linear(d, d_dec) with bias, applied to latent states only. (..., d) -> (..., d_dec)."""

    decoder_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        return Linear(self.decoder_dim, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="proj")(z)
