"""Token / position embedding table whose weight is gathered over "fsdp" where it is used (see
`vital_jax.sharding.constrain_weight`); otherwise flax's `nn.Embed` (same parameter `embedding` (V, D), same
lookup and `attend`)."""

from __future__ import annotations

import flax.linen as nn

from vital_jax.sharding import constrain_weight


class Embed(nn.Embed):
    """`nn.Embed` with the table constrained to its compute sharding. ids (...) -> (..., D); attend (..., D) -> (..., V)."""

    def setup(self):
        super().setup()
        self.embedding = constrain_weight(self.embedding, self.path, "embedding")
