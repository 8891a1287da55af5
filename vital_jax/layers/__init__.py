"""Blocks shared by several model families: norms, rotary embeddings, attention, KV cache, MLP, LoRA, the ViT
patch embedding."""

from vital_jax.layers.attention import Attention, make_attention_mask
from vital_jax.layers.kv_cache import KVCache
from vital_jax.layers.linear import Linear, LoraConfig
from vital_jax.layers.mlp import SwiGLU
from vital_jax.layers.norms import RMSNorm
from vital_jax.layers.patch_embed import PatchEmbedding
from vital_jax.layers.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = [
    "Attention", "KVCache", "Linear", "LoraConfig", "PatchEmbedding", "RMSNorm", "SwiGLU", "apply_rope",
    "make_attention_mask", "rope_cos_sin", "rope_inv_freq",
]
