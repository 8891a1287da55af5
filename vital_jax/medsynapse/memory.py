"""Diagnostic memory injection (§2.2, Eq. 1): x_full = [Enc(X); Enc(q); m_1 .. m_N; y_1 .. y_T].

The N memory vectors enter the backbone as input embeddings written into the same explicit KV cache as the
prompt, in one block of N slots right after it (they do not depend on each other's outputs, so one parallel pass
equals N sequential steps and equals inserting them into `inputs_embeds`). They take positions
`t + rope_delta` on all three MRoPE axes, continuing from the prompt like generated tokens. The answer follows,
teacher forced (Stage I's loss, the GRPO scorer) or decoded (generation): both start from the same cache built by
`inject`, so training and inference condition on the memory identically.

Cache layout of one example (slots): [prompt (left-padded to Tp) | N memory | answer / generated].

Shapes: prefix a `PrefixInputs` (B, Tp); memory (B, N, D) with D the backbone's hidden size (P_phi's output);
answer_ids / answer_valid (B, Ta) right-padded. Logits and log-probs are float32.
"""

from __future__ import annotations

import jax

from vital_jax import generation
from vital_jax.layers.kv_cache import KVCache
from vital_jax.models.qwen3_vl import cached
from vital_jax.models.qwen3_vl.cached import PrefixInputs
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration


def _check_memory(backbone: Qwen3VLForConditionalGeneration, prefix: PrefixInputs, memory: jax.Array) -> None:
    b, d = prefix.input_ids.shape[0], backbone.config.text.hidden_size
    if memory.ndim != 3 or memory.shape[0] != b or memory.shape[2] != d:
        raise ValueError(f"memory must be (B={b}, N, D={d}), got {memory.shape}")


def inject(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs, memory: jax.Array,
           cache_len: int, deterministic: bool = True, rng=None) -> tuple[KVCache, jax.Array]:
    """Prefill [Enc(X); Enc(q)], then write m_1..m_N as one block of input embeddings.

    Returns (kv_cache with Tp + N slots written, last_hidden (B, D): the post-norm state at m_N, which predicts
    y_1). N = 0 leaves the plain prompt cache (the no-memory baseline).
    """
    _check_memory(backbone, prefix, memory)
    kv_cache, last_hidden = cached.encode_prefix(backbone, backbone_params, prefix, cache_len, deterministic,
                                                 cached.fold_rng(rng, 0))
    if memory.shape[1] == 0:
        return kv_cache, last_hidden
    hidden, kv_cache = cached.append_embeddings(backbone, backbone_params, kv_cache, memory, None, deterministic,
                                                cached.fold_rng(rng, 1))
    return kv_cache, hidden[:, -1]


def answer_logits(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                  memory: jax.Array, answer_ids: jax.Array, answer_valid: jax.Array, deterministic: bool = True,
                  rng=None) -> jax.Array:
    """pi_theta(y_t | X, q, M, y_<t), teacher forced: logits (B, Ta, V) where position t predicts answer_ids[:, t]."""
    cache_len = prefix.input_ids.shape[1] + memory.shape[1] + answer_ids.shape[1]
    kv_cache, last_hidden = inject(backbone, backbone_params, prefix, memory, cache_len, deterministic, rng)
    return cached.teacher_forced_logits(backbone, backbone_params, kv_cache, last_hidden, answer_ids, answer_valid,
                                        deterministic, cached.fold_rng(rng, 2))


def answer_log_probs(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                     memory: jax.Array, answer_ids: jax.Array, answer_valid: jax.Array, deterministic: bool = True,
                     rng=None) -> jax.Array:
    """log pi_theta(y_t | X, q, M, y_<t) per answer token (B, Ta) float32, 0 at padding.

    The teacher-forced scorer: Eq. (2)'s terms, and the log-probs of GRPO's ratio (Eq. 3) and of r_causal
    (Eq. 5, called once with M and once with the interventional M').
    """
    logits = answer_logits(backbone, backbone_params, prefix, memory, answer_ids, answer_valid, deterministic, rng)
    return cached.token_log_probs(logits, answer_ids, answer_valid)


def generate(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs, memory: jax.Array,
             sampling: generation.SamplingConfig, rng=None) -> tuple[jax.Array, jax.Array]:
    """Generation with the memory injected: prefill the prompt, write the N memory vectors, then decode with
    `generation.decode`'s jitted while_loop. Returns (tokens (B, max_new_tokens) int32, lengths (B,) int32)."""
    cache_len = prefix.input_ids.shape[1] + memory.shape[1] + sampling.max_new_tokens
    kv_cache, last_hidden = inject(backbone, backbone_params, prefix, memory, cache_len)
    return cached.decode(backbone, backbone_params, kv_cache, last_hidden, sampling, rng)
