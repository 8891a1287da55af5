"""Token / position embedding table: flax's `nn.Embed` (same parameter `embedding` (V, D), same lookup), with
the table gathered over "fsdp" for `attend` (tied output logits), as `Linear` gathers its kernel (see
`vital_jax.sharding.constrain_weight`).

The lookup keeps the table as it is sharded: a row gather needs no all-gather of the table (each device reads
its slice of every row, then the (..., D) rows are resharded like any activation), and gathering a 150k-row
vocabulary for it would cost ~1.2 GiB per device per table at 8B scale.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vital_jax.sharding import constrain_weight


class Embed(nn.Embed):
    """ids (...) -> (..., D) with `__call__`; `attend`: (..., D) -> (..., V) logits against the gathered table."""

    def attend(self, query: jax.Array) -> jax.Array:
        """Float32 logits whatever the compute dtype (the product accumulates in float32 and is not rounded back):
        a bf16 logit of 16-32 is off by up to 0.06-0.125, noise that sums of log-probabilities over hundreds of
        tokens add up (MedSynapse-V's r_causal is a difference of two such sums)."""
        table = constrain_weight(self.embedding, self.path, "embedding")
        query, table = self.promote_dtype(query, table, dtype=self.dtype)
        return jnp.dot(query, table.T, preferred_element_type=jnp.float32)
