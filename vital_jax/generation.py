"""Token generation with an explicit KV cache inside one jitted loop (`lax.while_loop`).

Model-agnostic: a model supplies `step_fn(params, token_ids (B, 1), token_valid (B, 1), kv_cache) ->
(logits (B, V) float32, kv_cache)`. Prefill is the caller's job (it differs between text-only and multimodal
models); `decode` continues from the prefill's last logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from vital_jax.layers.kv_cache import KVCache
from vital_jax.sharding import weights_sharded


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy. top_k 0 / top_p 1.0 disable those filters."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


def select_next_token(logits_bv: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Greedy argmax, or sampling with temperature / top-k / top-p. (B, V) -> (B,) int32."""
    if cfg.temperature <= 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / cfg.temperature
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cutoff_idx = jnp.sum(cum < cfg.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def resolve_relayout(relayout: bool | None) -> bool:
    """A decode loop's `relayout` argument (decode in a model's one-token layout, e.g. `qwen3_vl.cached.decode`'s,
    which explains the trade-off): True / False as given; None (the default everywhere) relays out unless the mesh
    splits the weights (`sharding.weights_sharded`)."""
    return (not weights_sharded()) if relayout is None else relayout


def decode(step_fn: Callable, params, first_logits_bv: jax.Array, kv_cache: KVCache, cfg: SamplingConfig,
           rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Generate up to `max_new_tokens` tokens per example, stopping each example at its first EOS.

    first_logits_bv: logits (B, V) that predict the first new token (the prefill's last valid position).
    Returns (tokens (B, max_new_tokens) int32 padded with `pad_token_id` after EOS, lengths (B,) int32 counting
    the generated tokens including the EOS). The cache must have `max_new_tokens` free slots.
    """
    batch = first_logits_bv.shape[0]
    # Carried through the while loop, a per-layer cache would be copied at every token (`KVCache`'s docstring);
    # stacking one here copies it once, at twice its memory for a moment, so generation creates stacked caches.
    kv_cache = kv_cache.stacked()
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos = jnp.asarray(cfg.eos_token_ids if cfg.eos_token_ids else (-1,), jnp.int32)
    tokens = jnp.full((batch, cfg.max_new_tokens), cfg.pad_token_id, jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < cfg.max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, logits, cache, tokens, done, lengths, rng = state
        rng, key = jax.random.split(rng)
        next_tok = select_next_token(logits, key, cfg)
        next_tok = jnp.where(done, cfg.pad_token_id, next_tok)
        tokens = jax.lax.dynamic_update_slice(tokens, next_tok[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        # Finished examples keep stepping (the batch moves together) but their slots stay invisible.
        valid = ~done
        done = done | jnp.isin(next_tok, eos)
        logits, cache = step_fn(params, next_tok[:, None], valid[:, None], cache)
        return step + 1, logits, cache, tokens, done, lengths, rng

    init = (jnp.zeros((), jnp.int32), first_logits_bv.astype(jnp.float32), kv_cache, tokens,
            jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32), rng)
    _, _, _, tokens, _, lengths, _ = jax.lax.while_loop(cond, body, init)
    return tokens, lengths


def last_valid_index(token_valid_bt: jax.Array) -> jax.Array:
    """Index (B,) of the last valid token of each row (works for left and right padding)."""
    t = token_valid_bt.shape[1]
    return t - 1 - jnp.argmax(token_valid_bt[:, ::-1].astype(jnp.int32), axis=1)


def gather_last(x_btx: jax.Array, token_valid_bt: jax.Array) -> jax.Array:
    """x[b, last_valid_index[b]]: (B, T, ...) -> (B, ...)."""
    idx = last_valid_index(token_valid_bt)
    return jnp.take_along_axis(x_btx, idx.reshape((-1,) + (1,) * (x_btx.ndim - 1)), axis=1)[:, 0]
