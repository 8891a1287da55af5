"""Eq. (1)-(2): the prefix KV cache, the K-step latent recurrence as one `lax.scan`, and answer decoding.

Training and inference call the same `encode_prefix` and `latent_loop`; they differ only after the loop
(teacher-forced answer tokens in one parallel pass vs. autoregressive decoding), which is VITAL's
train/inference parity.

Cache layout of one example (slots): [prompt (left-padded to Tp) | K_max latent slots | answer / generated].
Latent step k writes slot Tp + k - 1 for every example; an example with K_b < k marks that slot invalid, so
later tokens never see it, its position counter does not advance (positions come from `lengths + rope_delta`),
and its z stays z_{K_b}. K is a runtime array: one compiled program serves every K <= K_max.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from vital_jax import generation
from vital_jax.layers.kv_cache import KVCache
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration, init_cache
from vital_jax.models.qwen3_vl.vision import VisionInputs


@flax.struct.dataclass
class PrefixInputs:
    """The multimodal prefix of a batch (all arrays; see `vital_jax.vital.batch.prefix_inputs`).

    input_ids, token_valid: (B, Tp), left-padded so every prompt ends at slot Tp - 1.
    positions: (3, B, Tp) MRoPE positions (from `mrope.get_rope_index`).
    pixel_patches: (Np, C*T*ps*ps) or None; vision_inputs: the matching `VisionInputs` or None.
    image_feature_index: (B, Tp) int32 or None: the merged-feature row of each image token when the patches are
      not packed in batch order (`distributed.global_vital_batch` packs each batch shard's examples into its own
      slice); None: the k-th image token of the batch takes row k.
    """

    input_ids: jax.Array
    token_valid: jax.Array
    positions: jax.Array
    pixel_patches: jax.Array | None = None
    vision_inputs: VisionInputs | None = None
    image_feature_index: jax.Array | None = None


def _rngs(rng, *salt):
    if rng is None:
        return {}
    for s in salt:
        rng = jax.random.fold_in(rng, s)
    return {"dropout": rng}


def encode_prefix(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs, cache_len: int,
                  deterministic: bool = True, rng=None) -> tuple[KVCache, jax.Array]:
    """Encode image + question into a fresh cache of `cache_len` slots.

    Returns (kv_cache, z_0 (B, D)): z_0 is the prefix's last post-norm hidden state (Eq. 1's h_prefix^last).
    """
    batch = prefix.input_ids.shape[0]
    out = backbone.apply({"params": backbone_params}, input_ids=prefix.input_ids, token_valid=prefix.token_valid,
                         positions=prefix.positions, pixel_patches=prefix.pixel_patches,
                         vision_inputs=prefix.vision_inputs, image_feature_index=prefix.image_feature_index,
                         kv_cache=init_cache(backbone.config, batch, cache_len),
                         return_logits=False, deterministic=deterministic, rngs=_rngs(rng, 0))
    return out.kv_cache, generation.gather_last(out.hidden_states, prefix.token_valid)


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
        out = backbone.apply({"params": backbone_params}, inputs_embeds=fed[:, None, :], token_valid=active[:, None],
                             kv_cache=cache, return_logits=False, deterministic=deterministic,
                             rngs=_rngs(rng, 1, k))
        z_next = jnp.where(active[:, None], out.hidden_states[:, 0].astype(z.dtype), z)
        return (out.kv_cache, z_next), z_next

    if remat:
        step = jax.checkpoint(step)
    (kv_cache, z_last), z_kbd = jax.lax.scan(step, (kv_cache, z0), jnp.arange(k_max))
    return jnp.swapaxes(z_kbd, 0, 1), z_last, kv_cache


def lm_logits(backbone: Qwen3VLForConditionalGeneration, backbone_params, hidden: jax.Array) -> jax.Array:
    """The backbone's LM head on post-norm states (..., D) -> float32 logits (..., V)."""
    return backbone.apply({"params": backbone_params}, hidden, method=backbone.logits)


def answer_logits(backbone: Qwen3VLForConditionalGeneration, backbone_params, kv_cache: KVCache, z_last: jax.Array,
                  answer_ids: jax.Array, answer_valid: jax.Array, deterministic: bool = True,
                  rng=None) -> jax.Array:
    """Eq. (2), teacher forced: logits (B, Ta, V) where position t predicts answer_ids[:, t].

    The first answer token is predicted from z_{K_b} itself; answer tokens a_1..a_{Ta-1} are then fed in one
    parallel pass over the same cache (after each example's last valid latent, positions continuing from it).
    answer_ids / answer_valid (B, Ta) are right-padded.
    """
    out = backbone.apply({"params": backbone_params}, input_ids=answer_ids[:, :-1], token_valid=answer_valid[:, :-1],
                         kv_cache=kv_cache, deterministic=deterministic, rngs=_rngs(rng, 2))
    first = lm_logits(backbone, backbone_params, z_last[:, None, :])
    return jnp.concatenate([first, out.logits], axis=1)


def generate_answer(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                    latent_steps: jax.Array, k_max: int, sampling: generation.SamplingConfig, rng=None,
                    pause_embeddings: jax.Array | None = None):
    """Inference: the same prefix + latent scan, then greedy/sampled decoding until EOS (K = 0: a plain VLM).

    Uses only the backbone (+ LoRA) parameters: the scaffolding is not an input. Returns (tokens (B, N) int32,
    lengths (B,), z (B, K_max, D)). pause_embeddings: see `latent_loop` (the pause control's learned inputs).
    """
    cache_len = prefix.input_ids.shape[1] + k_max + sampling.max_new_tokens
    kv_cache, z0 = encode_prefix(backbone, backbone_params, prefix, cache_len)
    z, z_last, kv_cache = latent_loop(backbone, backbone_params, kv_cache, z0, latent_steps, k_max,
                                      pause_embeddings=pause_embeddings)
    first_logits = lm_logits(backbone, backbone_params, z_last)

    def step_fn(params, ids_b1, valid_b1, cache):
        out = backbone.apply({"params": params}, input_ids=ids_b1, token_valid=valid_b1, kv_cache=cache)
        return out.logits[:, -1], out.kv_cache

    tokens, lengths = generation.decode(step_fn, backbone_params, first_logits, kv_cache, sampling, rng)
    return tokens, lengths, z
