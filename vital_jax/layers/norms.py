"""Normalisation layers with the numerics of the HF reference implementations."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """Qwen-style RMSNorm: normalise in float32, cast back to the input dtype, then scale.

    The cast happens *before* the weight multiply (as in transformers' Qwen3RMSNorm), which matters in bf16.
    Input (..., D) -> output (..., D) in the input dtype (promoted with the weight's dtype).
    """

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (two-pass variance, like torch), result cast to `dtype`.

    Input (..., D) -> output (..., D).
    """

    eps: float = 1e-6
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)
