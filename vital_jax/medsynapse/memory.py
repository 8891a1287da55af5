"""Diagnostic memory injection (§2.2, Eq. 1): x_full = [Enc(X); Enc(q); m_1 .. m_N; y_1 .. y_T].

The N memory vectors enter the backbone as input embeddings written into the same explicit KV cache as the
prompt, in one block of N slots right after it (they do not depend on each other's outputs, so one parallel pass
equals N sequential steps and equals inserting them into `inputs_embeds`). They take positions
`t + rope_delta` on all three MRoPE axes, continuing from the prompt like generated tokens. The answer follows,
teacher forced (Stage I's loss, the GRPO scorer) or decoded (generation): both start from the same cache built by
`inject`, so training and inference condition on the memory identically.

Where the memory sits (`MEMORY_POSITIONS`, config `medsynapse.memory_position`; the paper's Eq. 1 does not say
where the chat template's turn markers go): "assistant_turn" writes it after the whole prompt, i.e. after
`<|im_start|>assistant\n`, so the first answer token is predicted from m_N's state. "user_turn" writes it after the
question, inside the user turn: the prompt's last `prompt_tail` tokens (`<|im_end|>\n<|im_start|>assistant\n`,
`prompt.user_turn_end_length`) follow the memory, and the first answer token is predicted from the assistant
header's state as without memory. Every function here takes `prompt_tail` (0: "assistant_turn").

Cache layout of one example (slots): [prompt head (left-padded to Tp - S) | N memory | prompt tail (S) |
answer / generated], S = prompt_tail (the tail is empty for "assistant_turn").

Shapes: prefix a `PrefixInputs` (B, Tp); memory (B, N, D) with D the backbone's hidden size (P_phi's output);
answer_ids / answer_valid (B, Ta) right-padded. Logits and log-probs are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vital_jax import generation
from vital_jax.layers.kv_cache import KVCache
from vital_jax.models.qwen3_vl import cached
from vital_jax.models.qwen3_vl.cached import PrefixInputs
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration


MEMORY_POSITIONS = ("assistant_turn", "user_turn")


def _check_memory(backbone: Qwen3VLForConditionalGeneration, prefix: PrefixInputs, memory: jax.Array) -> None:
    b, d = prefix.input_ids.shape[0], backbone.config.text.hidden_size
    if memory.ndim != 3 or memory.shape[0] != b or memory.shape[2] != d:
        raise ValueError(f"memory must be (B={b}, N, D={d}), got {memory.shape}")


def split_prompt(prefix: PrefixInputs, prompt_tail: int) -> tuple[PrefixInputs, jax.Array | None]:
    """(the prompt without its last `prompt_tail` tokens, those tokens' ids (B, S) or None for 0).

    The prompts are left-padded and all end with the template's assistant header, so the last S slots of every
    row hold the same valid tokens; the head keeps its own MRoPE positions, and the tail continues after the
    memory as generated tokens do.
    """
    if not prompt_tail:
        return prefix, None
    if prompt_tail >= prefix.input_ids.shape[1]:
        raise ValueError(f"prompt_tail {prompt_tail} must be shorter than the prompt ({prefix.input_ids.shape[1]})")
    head = prefix.replace(
        input_ids=prefix.input_ids[:, :-prompt_tail], token_valid=prefix.token_valid[:, :-prompt_tail],
        positions=prefix.positions[:, :, :-prompt_tail],
        image_feature_index=(None if prefix.image_feature_index is None
                             else prefix.image_feature_index[:, :-prompt_tail]))
    return head, prefix.input_ids[:, -prompt_tail:]


def write_memory(backbone: Qwen3VLForConditionalGeneration, backbone_params, kv_cache: KVCache,
                 last_hidden: jax.Array, memory: jax.Array, tail_ids: jax.Array | None, deterministic: bool = True,
                 rng=None) -> tuple[KVCache, jax.Array]:
    """Append [m_1..m_N; prompt tail] after a prefilled prompt (head) in one pass of input embeddings.

    memory (B, N, D); tail_ids (B, S) or None (`split_prompt`). Returns (kv_cache, the post-norm state of the
    block's last slot (B, D), which predicts y_1); with nothing to write, the inputs unchanged.
    """
    block = memory
    if tail_ids is not None:
        tail = backbone.apply({"params": backbone_params}, tail_ids, method=backbone.embed)
        block = jnp.concatenate([memory, tail.astype(memory.dtype)], axis=1)
    if block.shape[1] == 0:
        return kv_cache, last_hidden
    hidden, kv_cache = cached.append_embeddings(backbone, backbone_params, kv_cache, block, None, deterministic, rng)
    return kv_cache, hidden[:, -1]


def inject(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs, memory: jax.Array,
           cache_len: int, deterministic: bool = True, rng=None, prompt_tail: int = 0,
           per_layer_cache: bool | None = None) -> tuple[KVCache, jax.Array]:
    """Prefill [Enc(X); Enc(q)], then write m_1..m_N as one block of input embeddings (with "user_turn",
    `prompt_tail` > 0: the prompt's head, then m_1..m_N and the prompt's tail as one block).

    Returns (kv_cache with Tp + N slots written, last_hidden (B, D): the post-norm state of the last slot written,
    which predicts y_1). N = 0 leaves the plain prompt cache (the no-memory baseline). per_layer_cache: the cache's
    layout (`cached.encode_prefix`; generation passes False).
    """
    _check_memory(backbone, prefix, memory)
    if memory.shape[1] == 0:
        prompt_tail = 0
    head, tail_ids = split_prompt(prefix, prompt_tail)
    kv_cache, last_hidden = cached.encode_prefix(backbone, backbone_params, head, cache_len, deterministic,
                                                 cached.fold_rng(rng, 0), per_layer_cache)
    return write_memory(backbone, backbone_params, kv_cache, last_hidden, memory, tail_ids, deterministic,
                        cached.fold_rng(rng, 1))


def answer_logits(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                  memory: jax.Array, answer_ids: jax.Array, answer_valid: jax.Array, deterministic: bool = True,
                  rng=None, prompt_tail: int = 0) -> jax.Array:
    """pi_theta(y_t | X, q, M, y_<t), teacher forced: logits (B, Ta, V) where position t predicts answer_ids[:, t]."""
    cache_len = prefix.input_ids.shape[1] + memory.shape[1] + answer_ids.shape[1]
    kv_cache, last_hidden = inject(backbone, backbone_params, prefix, memory, cache_len, deterministic, rng,
                                   prompt_tail)
    return cached.teacher_forced_logits(backbone, backbone_params, kv_cache, last_hidden, answer_ids, answer_valid,
                                        deterministic, cached.fold_rng(rng, 2))


def answer_log_probs(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                     memory: jax.Array, answer_ids: jax.Array, answer_valid: jax.Array, deterministic: bool = True,
                     rng=None, prompt_tail: int = 0) -> jax.Array:
    """log pi_theta(y_t | X, q, M, y_<t) per answer token (B, Ta) float32, 0 at padding.

    The teacher-forced scorer: Eq. (2)'s terms, and the log-probs of GRPO's ratio (Eq. 3) and of r_causal
    (Eq. 5, called once with M and once with the interventional M').
    """
    logits = answer_logits(backbone, backbone_params, prefix, memory, answer_ids, answer_valid, deterministic, rng,
                           prompt_tail)
    return cached.token_log_probs(logits, answer_ids, answer_valid)


def generate(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs, memory: jax.Array,
             sampling: generation.SamplingConfig, rng=None, prompt_tail: int = 0) -> tuple[jax.Array, jax.Array]:
    """Generation with the memory injected: prefill the prompt, write the N memory vectors, then decode with
    `generation.decode`'s jitted while_loop. Returns (tokens (B, max_new_tokens) int32, lengths (B,) int32)."""
    cache_len = prefix.input_ids.shape[1] + memory.shape[1] + sampling.max_new_tokens
    kv_cache, last_hidden = inject(backbone, backbone_params, prefix, memory, cache_len, prompt_tail=prompt_tail,
                                   per_layer_cache=False)
    return cached.decode(backbone, backbone_params, kv_cache, last_hidden, sampling, rng)
