"""Eq. (1)-(2): the prefix KV cache, the K-step latent recurrence as one `lax.scan`, and answer decoding.

Training and inference call the same `encode_prefix` and `latent_loop`; they differ only after the loop
(teacher-forced answer tokens in one parallel pass vs. autoregressive decoding), which is VITAL's
train/inference parity.

Cache layout of one example (slots): [prompt (left-padded to Tp) | K_max latent slots | answer / generated].
Latent step k writes slot Tp + k - 1 for every example; an example with K_b < k marks that slot invalid, so
later tokens never see it, its position counter does not advance (positions come from `lengths + rope_delta`),
and its z stays z_{K_b}. K is a runtime array: one compiled program serves every K <= K_max.

The backbone machinery (prefill, writing input embeddings into the cache, teacher forcing, decoding) is the
method-agnostic `models/qwen3_vl/cached.py`; this module is VITAL's use of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vital_jax import generation
from vital_jax.layers.kv_cache import KVCache
from vital_jax.models.qwen3_vl import cached
from vital_jax.models.qwen3_vl.cached import PrefixInputs, lm_logits
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration

__all__ = ["PrefixInputs", "answer_logits", "encode_prefix", "generate_answer", "latent_loop", "lm_logits"]


def encode_prefix(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs, cache_len: int,
                  deterministic: bool = True, rng=None, per_layer_cache: bool | None = None
                  ) -> tuple[KVCache, jax.Array]:
    """Encode image + question into a fresh cache of `cache_len` slots (per_layer_cache: its layout, as
    `cached.encode_prefix`; generation passes False, training leaves it to the layers).

    Returns (kv_cache, z_0 (B, D)): z_0 is the prefix's last post-norm hidden state (Eq. 1's h_prefix^last).
    """
    return cached.encode_prefix(backbone, backbone_params, prefix, cache_len, deterministic, cached.fold_rng(rng, 0),
                                per_layer_cache)


def latent_loop(backbone: Qwen3VLForConditionalGeneration, backbone_params, kv_cache: KVCache, z0: jax.Array,
                latent_steps: jax.Array, k_max: int, deterministic: bool = True, rng=None,
                remat: bool = False, pause_embeddings: jax.Array | None = None) -> tuple[jax.Array, jax.Array, KVCache]:
    """Eq. (1): z_k = f_theta(z_{k-1}; C_prefix U {z_<k}) for k = 1..K_b, as one scan over K_max slots.

    z0 (B, D); latent_steps (B,) int32, each <= k_max. Returns (z (B, K_max, D) with rows k >= K_b repeating
    z_{K_b}, z_last (B, D) = z_{K_b}, kv_cache). Gradients flow through every step and the cache.
    pause_embeddings (K_max, D) or None: the pause control (VitalConfig.latent_input = "pause"): slot k is fed
    p_k instead of z_{k-1}; z_k is still that slot's output state.
    """
    if pause_embeddings is not None and pause_embeddings.shape[0] < k_max:
        raise ValueError(f"pause_embeddings has {pause_embeddings.shape[0]} rows for {k_max} latent slots")

    def step(carry, k):
        cache, z = carry
        active = k < latent_steps
        fed = z if pause_embeddings is None else jnp.broadcast_to(pause_embeddings[k].astype(z.dtype), z.shape)
        hidden, cache = cached.append_embeddings(backbone, backbone_params, cache, fed[:, None, :], active[:, None],
                                                 deterministic, cached.fold_rng(rng, 1, k))
        z_next = jnp.where(active[:, None], hidden[:, 0].astype(z.dtype), z)
        return (cache, z_next), z_next

    if remat:
        step = jax.checkpoint(step)
    (kv_cache, z_last), z_kbd = jax.lax.scan(step, (kv_cache, z0), jnp.arange(k_max))
    return jnp.swapaxes(z_kbd, 0, 1), z_last, kv_cache


def answer_logits(backbone: Qwen3VLForConditionalGeneration, backbone_params, kv_cache: KVCache, z_last: jax.Array,
                  answer_ids: jax.Array, answer_valid: jax.Array, deterministic: bool = True,
                  rng=None) -> jax.Array:
    """Eq. (2), teacher forced: logits (B, Ta, V) where position t predicts answer_ids[:, t].

    The first answer token is predicted from z_{K_b} itself; answer tokens a_1..a_{Ta-1} are then fed in one
    parallel pass over the same cache (after each example's last valid latent, positions continuing from it).
    answer_ids / answer_valid (B, Ta) are right-padded.
    """
    return cached.teacher_forced_logits(backbone, backbone_params, kv_cache, z_last, answer_ids, answer_valid,
                                        deterministic, cached.fold_rng(rng, 2))


def generate_answer(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                    latent_steps: jax.Array, k_max: int, sampling: generation.SamplingConfig, rng=None,
                    pause_embeddings: jax.Array | None = None, relayout: bool | None = None):
    """Inference: the same prefix + latent scan, then greedy/sampled decoding until EOS (K = 0: a plain VLM).

    Uses only the backbone (+ LoRA) parameters: the scaffolding is not an input. Returns (tokens (B, N) int32,
    lengths (B,), z (B, K_max, D)). pause_embeddings: see `latent_loop` (the pause control's learned inputs).
    relayout: the layout to run in (`cached.decode`); relaid out, the whole program runs in the decoding layout,
    so the K latent steps (one token each, like answer tokens) no longer slice a scanned model's layers either.
    """
    backbone, backbone_params, (z, z_last, kv_cache) = answer_phases(
        backbone, backbone_params, prefix, latent_steps, k_max, sampling.max_new_tokens, pause_embeddings, relayout)
    # The layout was decided in `answer_phases`, for the whole program.
    tokens, lengths = cached.decode(backbone, backbone_params, kv_cache, z_last, sampling, rng, relayout=False)
    return tokens, lengths, z


def answer_phases(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                  latent_steps: jax.Array, k_max: int, max_new_tokens: int, pause_embeddings: jax.Array | None = None,
                  relayout: bool | None = None, until: str = "latent"):
    """`generate_answer` up to its decoding, the same code (so a program of it times that part, Figure 4b):
    the layout (relayout, as there), the prefix into a cache sized for k_max + max_new_tokens more positions
    ("prefill"), then the latent loop ("latent"). Returns (backbone, params in that layout, outputs): outputs are
    encode_prefix's (kv_cache, z0) until "prefill", latent_loop's (z, z_last, kv_cache) until "latent"."""
    if until not in ("prefill", "latent"):
        raise ValueError(f"until must be 'prefill' or 'latent', got {until!r}")
    if generation.resolve_relayout(relayout):
        backbone, backbone_params = cached.decoding_model(backbone, backbone_params)
    cache_len = prefix.input_ids.shape[1] + k_max + max_new_tokens
    kv_cache, z0 = encode_prefix(backbone, backbone_params, prefix, cache_len, per_layer_cache=False)
    if until == "prefill":
        return backbone, backbone_params, (kv_cache, z0)
    return backbone, backbone_params, latent_loop(backbone, backbone_params, kv_cache, z0, latent_steps, k_max,
                                                  pause_embeddings=pause_embeddings)
