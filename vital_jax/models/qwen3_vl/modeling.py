"""Qwen3-VL in Flax linen: vision tower + Qwen3 text decoder with interleaved MRoPE and deepstack injection.

Forward modes as for Qwen3 (full sequence, prefill into an explicit `KVCache`, single-step decode fed token ids
or input embeddings). Image features replace the `<|image_pad|>` embeddings; deepstack features are added to the
residual stream after the first decoder layers at image-token positions only. Positions are (3, B, T):
explicit for prompts with images (from `mrope.get_rope_index`), derived from the cache otherwise, so that every
token or vector after the prompt gets `lengths + rope_delta` on all three axes.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vital_jax.layers.embedding import Embed
from vital_jax.layers.kv_cache import KVCache
from vital_jax.layers.linear import Linear, LoraConfig
from vital_jax.models.qwen3.modeling import DecoderStack, default_positions, run_decoder
from vital_jax.models.qwen3.modeling import init_cache as qwen3_init_cache
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.mrope import mrope_cos_sin
from vital_jax.models.qwen3_vl.vision import Qwen3VLVisionModel, VisionInputs


@flax.struct.dataclass
class Qwen3VLOutput:
    """logits (B, T, V) float32 or None; hidden_states (B, T, D) after the final norm; kv_cache or None."""

    logits: jax.Array | None
    hidden_states: jax.Array
    kv_cache: KVCache | None


class TextModel(nn.Module):
    """Token embedding + decoder stack (HF `model.language_model`)."""

    config: Qwen3VLConfig
    lora: LoraConfig | None = None

    def setup(self):
        text = self.config.text
        self.embed_tokens = Embed(text.vocab_size, text.hidden_size, dtype=text.dtype,
                                     param_dtype=text.param_dtype, embedding_init=nn.initializers.normal(0.02))
        self.model = DecoderStack(text, self.lora)

    def __call__(self, x_btd, cos, sin, token_valid, kv_cache, layer_residual_adds, deterministic, max_position):
        return run_decoder(self.model, x_btd, cos, sin, token_valid, kv_cache, layer_residual_adds, deterministic,
                           max_position)


def scatter_image_features(x_btd: jax.Array, image_mask_bt: jax.Array, features_md: jax.Array,
                           feature_index_bt: jax.Array | None = None) -> jax.Array:
    """Place features (M, D) at the True positions of image_mask (B, T); zeros elsewhere.

    Without `feature_index_bt` the k-th image token of the flattened batch (row major) takes row k of `features`;
    rows beyond the number of image tokens (bucket padding) are never read. With it (B, T) int32, each image token
    takes the row its entry names (entries at other positions are ignored): for packings that are not in batch
    order, e.g. each device's examples packed into that device's slice of the patch array.
    """
    if feature_index_bt is None:
        order = jnp.cumsum(image_mask_bt.reshape(-1).astype(jnp.int32)) - 1
    else:
        order = feature_index_bt.reshape(-1)
    gathered = jnp.take(features_md, jnp.clip(order, 0, features_md.shape[0] - 1), axis=0)
    gathered = gathered.reshape(x_btd.shape[:2] + (features_md.shape[-1],)).astype(x_btd.dtype)
    return jnp.where(image_mask_bt[..., None], gathered, jnp.zeros_like(x_btd))


class Qwen3VLForConditionalGeneration(nn.Module):
    """Submodules: `visual` (vision tower), `language_model` (embeddings + decoder), `lm_head` (absent if tied)."""

    config: Qwen3VLConfig
    lora: LoraConfig | None = None

    def setup(self):
        self.visual = Qwen3VLVisionModel(self.config.vision)
        self.language_model = TextModel(self.config, self.lora)
        if not self.config.text.tie_word_embeddings:
            text = self.config.text
            self.lm_head = Linear(text.vocab_size, dtype=text.dtype, param_dtype=text.param_dtype,
                                  output_dtype=jnp.float32)

    def embed(self, input_ids_bt: jax.Array) -> jax.Array:
        """Token embeddings (B, T, D)."""
        return self.language_model.embed_tokens(input_ids_bt)

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """LM head on post-norm hidden states -> float32 logits (B, T, V), accumulated and kept in float32 whatever
        the compute dtype (`Embed.attend`)."""
        if self.config.text.tie_word_embeddings:
            return self.language_model.embed_tokens.attend(hidden_btd)
        return self.lm_head(hidden_btd)

    def encode_images(self, pixel_patches: jax.Array, vision_inputs: VisionInputs):
        """Vision tower: (N, C*T*ps*ps) patches -> (image_embeds (M, D), deepstack list of (M, D)), M = N/4."""
        return self.visual(pixel_patches, vision_inputs)

    def __call__(self, input_ids=None, inputs_embeds=None, positions=None, token_valid=None,
                 pixel_patches=None, vision_inputs: VisionInputs | None = None, image_features=None,
                 image_feature_index=None, kv_cache: KVCache | None = None, return_logits: bool = True,
                 deterministic: bool = True) -> Qwen3VLOutput:
        """input_ids (B, T) int or inputs_embeds (B, T, D); positions (3, B, T) int (required with images);
        token_valid (B, T) bool; images as pixel_patches (N, C*T*ps*ps) + vision_inputs (from
        `vision.vision_inputs(grids, config.vision, pad_to)`), or precomputed image_features
        (image_embeds (M, D), [deepstack (M, D), ...]). The k-th valid `<|image_pad|>` token of the batch (row
        major) takes merged feature k (the caller guarantees their counts match, see `prompt.py`), or the row
        `image_feature_index` (B, T) int32 names (see `scatter_image_features`)."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds.astype(cfg.text.dtype)
        b, t = x.shape[:2]
        if token_valid is None:
            token_valid = jnp.ones((b, t), bool)
        if pixel_patches is not None:
            if vision_inputs is None:
                raise ValueError("pixel_patches need vision_inputs (vision.vision_inputs(grid_thw, config))")
            image_features = self.encode_images(pixel_patches, vision_inputs)
        residual_adds = ()
        if image_features is not None:
            if input_ids is None:
                raise ValueError("images need input_ids to locate the <|image_pad|> tokens")
            if positions is None:
                raise ValueError("prompts with images need explicit (3, B, T) positions from mrope.get_rope_index")
            image_embeds, deepstack = image_features
            image_mask = (input_ids == cfg.image_token_id) & token_valid
            x = jnp.where(image_mask[..., None],
                          scatter_image_features(x, image_mask, image_embeds, image_feature_index), x)
            residual_adds = [scatter_image_features(x, image_mask, f, image_feature_index) for f in deepstack]

        max_position = None
        if positions is None:
            positions = jnp.broadcast_to(default_positions(token_valid, kv_cache)[None], (3, b, t))
        else:
            max_position = jnp.max(jnp.where(token_valid[None], positions, -1), axis=(0, 2))
        cos, sin = mrope_cos_sin(positions, cfg.text.head_dim, cfg.text.rope_theta, cfg.mrope_section,
                                 cfg.text.dtype)
        hidden, kv_cache = self.language_model(x, cos, sin, token_valid, kv_cache, residual_adds, deterministic,
                                               max_position)
        return Qwen3VLOutput(self.logits(hidden) if return_logits else None, hidden, kv_cache)


def init_cache(config: Qwen3VLConfig, batch: int, max_len: int, dtype=None, per_layer: bool | None = None
               ) -> KVCache:
    """An empty KV cache for the text decoder (`qwen3.init_cache` of `config.text`)."""
    return qwen3_init_cache(config.text, batch, max_len, dtype, per_layer)
