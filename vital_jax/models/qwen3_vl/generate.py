"""Greedy / sampled generation for Qwen3-VL with images: prefill (vision + text) and cached decode in one jit."""

from __future__ import annotations

import functools

import jax

from vital_jax import generation
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration, init_cache
from vital_jax.models.qwen3_vl.vision import VisionInputs


def prefill(model: Qwen3VLForConditionalGeneration, params, input_ids, token_valid, positions, pixel_patches,
            vision_inputs, max_len: int):
    """Encode the prompt(s) into a fresh cache of `max_len` slots. Returns (output, last-token logits (B, V))."""
    cache = init_cache(model.config, input_ids.shape[0], max_len)
    out = model.apply({"params": params}, input_ids=input_ids, token_valid=token_valid, positions=positions,
                      pixel_patches=pixel_patches, vision_inputs=vision_inputs, kv_cache=cache)
    return out, generation.gather_last(out.logits, token_valid)


def decode_step_fn(model: Qwen3VLForConditionalGeneration):
    """`generation.decode` step: one token per example at position `lengths + rope_delta`."""

    def step_fn(params, ids_b1, valid_b1, kv_cache):
        out = model.apply({"params": params}, input_ids=ids_b1, token_valid=valid_b1, kv_cache=kv_cache)
        return out.logits[:, -1], out.kv_cache

    return step_fn


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def generate(params, input_ids, token_valid, positions, pixel_patches, vision_inputs: VisionInputs | None,
             config: Qwen3VLConfig, sampling: generation.SamplingConfig, rng=None):
    """Generate answers for (padded) prompts with images.

    input_ids, token_valid (B, T); positions (3, B, T) from `mrope.get_rope_index`; pixel_patches (N, P) and
    vision_inputs from `vision.vision_inputs` (or None for text-only prompts).
    Returns (tokens (B, max_new_tokens) int32, lengths (B,) int32).
    """
    model = Qwen3VLForConditionalGeneration(config)
    max_len = input_ids.shape[1] + sampling.max_new_tokens
    out, first_logits = prefill(model, params, input_ids, token_valid, positions, pixel_patches, vision_inputs,
                                max_len)
    return generation.decode(decode_step_fn(model), params, first_logits, out.kv_cache, sampling, rng)
