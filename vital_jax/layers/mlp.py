"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vital_jax.layers.linear import Linear, LoraConfig, adapter_dropout_keeps


class SwiGLU(nn.Module):
    """Input (B, T, D) -> (B, T, D). Submodules `gate_proj`, `up_proj`, `down_proj` (no bias)."""

    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraConfig | None = None
    fused_gate_up: bool = False

    def _proj(self, name: str, features: int) -> Linear:
        lora = self.lora if (self.lora is not None and name in self.lora.targets) else None
        return Linear(features, dtype=self.dtype, param_dtype=self.param_dtype, lora=lora, name=f"{name}_proj")

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        hidden = x.shape[-1]
        keeps = adapter_dropout_keeps(self, self.lora, deterministic, {
            "gate": x.shape, "up": x.shape, "down": (*x.shape[:-1], self.intermediate_size)})
        if self.fused_gate_up:
            gate, up = jnp.split(self._proj("gate_up", 2 * self.intermediate_size)(x, deterministic), 2, axis=-1)
        else:
            gate = self._proj("gate", self.intermediate_size)(x, deterministic, keeps.get("gate"))
            up = self._proj("up", self.intermediate_size)(x, deterministic, keeps.get("up"))
        return self._proj("down", hidden)(nn.silu(gate) * up, deterministic, keeps.get("down"))
