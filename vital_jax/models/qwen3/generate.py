"""Prefill + cached generation for Qwen3, compiled as one jitted program."""

from __future__ import annotations

import functools

import jax

from vital_jax import generation
from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3.modeling import Qwen3ForCausalLM, init_cache


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def generate(params, input_ids, token_valid, config: Qwen3Config, sampling: generation.SamplingConfig,
             rng=None):
    """Generate continuations of (left- or right-)padded prompts.

    params: Flax params of `Qwen3ForCausalLM(config)`; input_ids (B, T) int32; token_valid (B, T) bool.
    Returns (tokens (B, max_new_tokens) int32, lengths (B,) int32), see `generation.decode`.
    """
    model = Qwen3ForCausalLM(config)
    batch, prompt_len = input_ids.shape
    cache = init_cache(config, batch, prompt_len + sampling.max_new_tokens, per_layer=False)
    out = model.apply({"params": params}, input_ids=input_ids, token_valid=token_valid, kv_cache=cache)
    first_logits = generation.gather_last(out.logits, token_valid)

    def step_fn(p, ids_b1, valid_b1, kv_cache):
        step = model.apply({"params": p}, input_ids=ids_b1, token_valid=valid_b1, kv_cache=kv_cache)
        return step.logits[:, -1], step.kv_cache

    return generation.decode(step_fn, params, first_logits, out.kv_cache, sampling, rng)
