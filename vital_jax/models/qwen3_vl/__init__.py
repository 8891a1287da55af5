"""Qwen3-VL: vision tower with deepstack, MRoPE text decoder, preprocessing, prompt building, and the cached
forward (prefill, blocks of input embeddings, teacher forcing, decoding: `cached.py`) the latent methods share."""

from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration, Qwen3VLOutput, init_cache
from vital_jax.models.qwen3_vl.mrope import get_rope_index
from vital_jax.models.qwen3_vl.params import load_params
from vital_jax.models.qwen3_vl.vision import VisionInputs, vision_inputs

__all__ = ["Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLOutput", "VisionInputs", "get_rope_index",
           "init_cache", "load_params", "vision_inputs"]
