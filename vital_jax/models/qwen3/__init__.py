"""Qwen3 causal LM (the VITAL auxiliary decoder; its layers are shared with the Qwen3-VL text model)."""

from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3.modeling import CausalLMOutput, DecoderStack, Qwen3ForCausalLM, init_cache
from vital_jax.models.qwen3.params import load_params

__all__ = ["CausalLMOutput", "DecoderStack", "Qwen3Config", "Qwen3ForCausalLM", "init_cache", "load_params"]
