"""An explicit, preallocated KV cache: a plain pytree passed in and returned, never hidden module state.

Layout (L layers, B batch, S slots, K kv heads, H head dim):
  k, v:     (L, B, S, K, H)  keys (after qk-norm and RoPE) and values of every written slot, stacked; or, laid
                             out per layer (`per_layer`), a tuple of L arrays (B, S, K, H). Either way the batch is
                             axis -4 and the slots axis -3 of every array, and `layer(i)` is (B, S, K, H).
  valid:    (B, S) bool      which slots later queries may attend to. Padding tokens and masked latent steps
                             are written but stay invisible, so every example in a batch can share one write
                             index while having its own effective length.
  lengths:  (B,) int32       number of valid slots per example (the next 1-D position of a plain LM).
  index:    () int32         next slot to write; shared by the batch so a write is one dynamic_update_slice.
  position_offset: (B,) int32  added to `lengths` to give the next token's position. 0 for plain LMs; Qwen3-VL
                             stores its MRoPE `rope_delta` here, so every token or vector after the prompt gets
                             position `lengths + rope_delta` on all three axes.

A shared prefix (`share_prefix`): G rows that continue one prompt (G sampled completions of it) hold its keys
and values once, in prefix_k / prefix_v (L, P, Sp, K, H) with P = B / G prompts and prefix_valid (P, Sp); row b
continues prompt b // G. k / v / valid then hold only the rows' own slots after the prompt, `index` counts those,
and `lengths` counts both parts (positions continue after the prompt). Attention reads the prefix once per
prompt instead of once per row (`layers.attention.attend_shared_prefix`): G times less cache memory and reads for
the prompt. Without a prefix these three fields are None.

Because it is a pytree of fixed-shape arrays, the cache can be the carry of `jax.lax.scan` (the VITAL latent
loop) or `jax.lax.while_loop` (generation) and is never grown by concatenation inside jitted code.

Why two layouts: scanned decoder layers (`scan_layers`) take their layer's slice of the stack as a scan input.
Unrolled layers read and write their layer of it, and in a train step autodiff turns each read (a slice of the
stack) into a `pad` of its cotangent back to the whole stack, each write into an update of the whole stack's
cotangent, and sums the padded cotangents: at `benchmarks.peer_train_step`'s sizes (8 layers) 48 such pads of the
3.8 MB stack. With one array per layer a read is the array and a write is one layer's size: ~40 ms less op time
of ~1,000 ms per step on a 2-core CPU, the step ~3 % faster (benchmarks/README.md). `init_cache` of the models
therefore lays the cache out like the layers by default. Generation's token loop (`generation.decode`) runs on
the stacked layout: carried through a `while_loop` one array per layer, XLA:CPU fuses each layer's update twice
(into the carried output and into the attention's operand), each on a copy of the array, so the 16 answer tokens
of `benchmarks.peer_inference` decode in 111-122 instead of 101-109 ms; the stack is updated in place. So
generation prefills straight into a stacked cache (`init_cache(..., per_layer=False)`), and the loop stacks a
per-layer cache it is handed (a copy, both held for a moment).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array
    lengths: jax.Array
    index: jax.Array
    position_offset: jax.Array
    prefix_k: jax.Array | None = None
    prefix_v: jax.Array | None = None
    prefix_valid: jax.Array | None = None

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, per_layer: bool = False) -> "KVCache":
        """An empty cache with `max_len` slots per example, stacked or `per_layer` (the module docstring)."""
        shape = (batch, max_len, num_kv_heads, head_dim)
        if per_layer:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        else:
            k, v = jnp.zeros((num_layers, *shape), dtype), jnp.zeros((num_layers, *shape), dtype)
        return cls(
            k=k,
            v=v,
            valid=jnp.zeros((batch, max_len), bool),
            lengths=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            position_offset=jnp.zeros((batch,), jnp.int32),
        )

    @classmethod
    def share_prefix(cls, prefix: "KVCache", group: int, new_slots: int) -> "KVCache":
        """A cache for `group` continuations of each of prefix's P rows (B = P * group rows, row b continuing
        prompt b // group), with `new_slots` empty slots per row after the prompt.

        Every slot of `prefix` becomes the shared part (build it with exactly the prompt's slots: its unwritten
        slots would stay invisible but still be read). The rows start where their prompt ends: the same lengths,
        position offsets and hence positions as a copy of the prompt cache per row (`jnp.repeat` of each field)."""
        if prefix.prefix_k is not None:
            raise ValueError("share_prefix: the prefix cache already has a shared prefix of its own")
        prefix = prefix.stacked()  # the shared part is read only; its layout is the stacked one
        num_layers, rows, _, num_kv_heads, head_dim = prefix.k.shape
        tail = cls.init(num_layers, rows * group, new_slots, num_kv_heads, head_dim, prefix.k.dtype)
        return tail.replace(lengths=jnp.repeat(prefix.lengths, group), prefix_k=prefix.k, prefix_v=prefix.v,
                            position_offset=jnp.repeat(prefix.position_offset, group),
                            prefix_valid=prefix.valid)

    @property
    def has_shared_prefix(self) -> bool:
        return self.prefix_k is not None

    def prefix_layer(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """The shared prefix's keys and values (P, Sp, K, H) of one layer."""
        return self.prefix_k[layer], self.prefix_v[layer]

    def next_positions(self, token_valid_bt: jax.Array) -> jax.Array:
        """Positions (B, T) of T new tokens: valid ones count up from `lengths + position_offset`, padding
        repeats the previous position (it is invisible anyway)."""
        pos = jnp.cumsum(token_valid_bt.astype(jnp.int32), axis=1) - 1
        return jnp.maximum(pos, 0) + (self.lengths + self.position_offset)[:, None]

    @property
    def per_layer(self) -> bool:
        """Whether k / v are one array per layer (else one stacked array each)."""
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return (self.k[0] if self.per_layer else self.k).shape[-3]

    def stacked(self) -> "KVCache":
        """The same cache with k / v stacked (L, B, S, K, H); itself when already stacked."""
        if not self.per_layer:
            return self
        return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))

    def write_layer(self, layer: int, k_btkh: jax.Array, v_btkh: jax.Array) -> "KVCache":
        """Write one layer's new keys/values (B, T, K, H) at slots [index, index + T)."""
        if self.per_layer:
            k, v = list(self.k), list(self.v)
            start = (0, self.index, 0, 0)
            k[layer] = jax.lax.dynamic_update_slice(k[layer], k_btkh.astype(k[layer].dtype), start)
            v[layer] = jax.lax.dynamic_update_slice(v[layer], v_btkh.astype(v[layer].dtype), start)
            return self.replace(k=tuple(k), v=tuple(v))
        start = (layer, 0, self.index, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k, k_btkh[None].astype(self.k.dtype), start)
        v = jax.lax.dynamic_update_slice(self.v, v_btkh[None].astype(self.v.dtype), start)
        return self.replace(k=k, v=v)

    def layer(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """Keys and values (B, S, K, H) of one layer."""
        return self.k[layer], self.v[layer]

    def with_new_slots(self, token_valid_bt: jax.Array) -> "KVCache":
        """Mark the T slots starting at `index` valid/invalid (B, T) bool; used before the layers run so the
        new tokens can attend to themselves."""
        valid = jax.lax.dynamic_update_slice(self.valid, token_valid_bt.astype(bool), (0, self.index))
        return self.replace(valid=valid)

    def advance(self, token_valid_bt: jax.Array, max_position_b: jax.Array | None = None) -> "KVCache":
        """Move the write index past T new slots and count the valid ones into `lengths`.

        max_position_b (B,): the largest position among each row's valid new tokens, when the caller chose
        positions explicitly (e.g. Qwen3-VL's MRoPE prompt positions). The next token of that row then gets
        `max_position + 1`, i.e. `position_offset` becomes `max_position + 1 - lengths`; rows without valid new
        tokens keep their offset.
        """
        num_new = token_valid_bt.shape[1]
        lengths = self.lengths + token_valid_bt.astype(jnp.int32).sum(axis=1)
        offset = self.position_offset
        if max_position_b is not None:
            offset = jnp.where(token_valid_bt.any(axis=1), max_position_b.astype(jnp.int32) + 1 - lengths, offset)
        return self.replace(index=self.index + num_new, lengths=lengths, position_offset=offset)
