"""Greedy / sampled generation for Qwen3-VL with images: prefill (vision + text) and cached decode in one jit."""

from __future__ import annotations

import functools

import jax

from vital_jax import generation
from vital_jax.models.qwen3_vl import cached
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from vital_jax.models.qwen3_vl.vision import VisionInputs


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def generate(params, input_ids, token_valid, positions, pixel_patches, vision_inputs: VisionInputs | None,
             config: Qwen3VLConfig, sampling: generation.SamplingConfig, rng=None):
    """Generate answers for (padded) prompts with images.

    input_ids, token_valid (B, T); positions (3, B, T) from `mrope.get_rope_index`; pixel_patches (N, P) and
    vision_inputs from `vision.vision_inputs` (or None for text-only prompts).
    Returns (tokens (B, max_new_tokens) int32, lengths (B,) int32).
    """
    model = Qwen3VLForConditionalGeneration(config)
    prefix = cached.PrefixInputs(input_ids, token_valid, positions, pixel_patches, vision_inputs)
    kv_cache, last_hidden = cached.encode_prefix(model, params, prefix, input_ids.shape[1] + sampling.max_new_tokens,
                                                 per_layer_cache=False)
    return cached.decode(model, params, kv_cache, last_hidden, sampling, rng)
