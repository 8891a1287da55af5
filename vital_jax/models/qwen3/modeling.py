"""Qwen3 decoder in Flax linen: decoder layer, decoder stack and causal LM with an explicit KV cache.

Forward modes (all through `Qwen3ForCausalLM.__call__`):
  * full sequence (training): `kv_cache=None`, causal + padding mask over the T inputs;
  * prefill: pass an empty `KVCache` (see `init_cache`); the T inputs are written at slots [index, index+T);
  * decode step: the same call with T=1 on a filled cache.
Inputs are token ids *or* input embeddings (the VITAL latent loop feeds hidden states back as embeddings),
with explicit or derived positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vital_jax.layers.attention import Attention, make_attention_mask
from vital_jax.layers.embedding import Embed
from vital_jax.layers.kv_cache import KVCache
from vital_jax.layers.linear import Linear, LoraConfig
from vital_jax.layers.mlp import SwiGLU
from vital_jax.layers.norms import RMSNorm
from vital_jax.layers.rope import rope_cos_sin, rope_inv_freq
from vital_jax.models.qwen3.config import REMAT_POLICIES, Qwen3Config
from vital_jax.sharding import constrain

# Logical axes of the residual stream (B, T, D), pinned at every decoder-layer boundary under a mesh.
RESIDUAL_AXES = ("batch", "length", "act_embed")
# The projections `Qwen3Config.fused_projections` joins (into qkv_proj and gate_up_proj).
FUSED_TARGETS = ("q", "k", "v", "gate", "up")


@flax.struct.dataclass
class CausalLMOutput:
    """logits (B, T, V) float32 or None; hidden_states (B, T, D) after the final RMSNorm; kv_cache or None."""

    logits: jax.Array | None
    hidden_states: jax.Array
    kv_cache: KVCache | None


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). x (B, T, D) -> (B, T, D)."""

    config: Qwen3Config
    layer_idx: int
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, mask_bts, kv_cache: KVCache | None, deterministic: bool = True):
        """kv_cache: the stack's cache, of which this layer writes and reads layer `layer_idx` (the scanned
        stack hands each layer a one-layer cache, so there it is 0)."""
        cfg = self.config
        adapted = set(self.lora.targets) & set(FUSED_TARGETS) if self.lora is not None else set()
        if cfg.fused_projections and adapted:
            raise ValueError(f"fused_projections: LoRA on {sorted(adapted)} cannot adapt a fused projection; fold "
                             f"the adapters in first (layers.linear.merge_lora)")
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="input_layernorm")(x_btd)
        attn_out, kv_cache = Attention(
            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, lora=self.lora,
            attention_impl=cfg.attention_impl, fused_qkv=cfg.fused_projections, name="self_attn",
        )(h, cos_bth, sin_bth, mask_bts, kv_cache, self.layer_idx, deterministic)
        x_btd = x_btd + attn_out
        h = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="post_attention_layernorm")(x_btd)
        mlp = SwiGLU(cfg.intermediate_size, cfg.dtype, cfg.param_dtype, self.lora, cfg.fused_projections, name="mlp")
        x_btd = x_btd + mlp(h, deterministic)
        return x_btd, kv_cache


class DecoderStack(nn.Module):
    """The layers and final norm, given input embeddings and rotary tables (so Qwen3-VL can reuse it with MRoPE).

    x (B, T, D); cos, sin (B, T, H); mask (B, T, S) bool. `layer_residual_adds[i]` (B, T, D), if given, is added
    to the residual stream after layer i (Qwen3-VL's deepstack injection). Returns (hidden after final norm, cache).
    With `config.scan_layers` the layers are one `nn.scan` (parameters `layers/...` with a leading layer axis);
    otherwise a Python loop over `layers_{i}`. Both give the same numbers.
    """

    config: Qwen3Config
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, mask_bts, kv_cache: KVCache | None = None,
                 layer_residual_adds: Sequence[jax.Array] = (), deterministic: bool = True):
        cfg = self.config
        x_btd = constrain(x_btd, RESIDUAL_AXES)
        if cfg.scan_layers:
            x_btd, kv_cache = self._scanned_layers(x_btd, cos_bth, sin_bth, mask_bts, kv_cache, layer_residual_adds,
                                                   deterministic)
            return RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="norm")(x_btd), kv_cache
        layer_cls = DecoderLayer
        if cfg.remat:
            # Recompute each layer's activations in the backward pass instead of storing them.
            # static_argnums counts `self`: (self, x, cos, sin, mask, kv_cache, deterministic).
            layer_cls = nn.remat(DecoderLayer, static_argnums=(6,), policy=REMAT_POLICIES[cfg.remat_policy])
        for i in range(cfg.num_hidden_layers):
            x_btd, kv_cache = layer_cls(cfg, i, self.lora, name=f"layers_{i}")(
                x_btd, cos_bth, sin_bth, mask_bts, kv_cache, deterministic)
            if i < len(layer_residual_adds):
                x_btd = x_btd + layer_residual_adds[i].astype(x_btd.dtype)
            x_btd = constrain(x_btd, RESIDUAL_AXES)
        return RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="norm")(x_btd), kv_cache

    def _scanned_layers(self, x_btd, cos_bth, sin_bth, mask_bts, kv_cache, layer_residual_adds, deterministic):
        """The layers as one scan: carry x; scanned (layer index, this layer's cache keys/values and shared-prefix
        keys/values); broadcast the rotary tables, the mask, the cache bookkeeping and the stacked deepstack adds
        (n, B, T, D)."""
        cfg = self.config
        adds = jnp.stack(list(layer_residual_adds)) if len(layer_residual_adds) else None

        def body(layer, x, layer_xs, cos, sin, mask, cache_meta, adds):
            index, k, v, prefix_k, prefix_v = layer_xs
            cache = None
            if cache_meta is not None:
                cache = cache_meta.replace(k=k[None], v=v[None])
                if prefix_k is not None:
                    cache = cache.replace(prefix_k=prefix_k[None], prefix_v=prefix_v[None])
            x, cache = layer(x, cos, sin, mask, cache, deterministic)
            if adds is not None:
                # Layers past the deepstack levels add exactly zero, as the loop form adds nothing.
                add = jax.lax.dynamic_index_in_dim(adds, jnp.minimum(index, adds.shape[0] - 1), keepdims=False)
                x = x + jnp.where(index < adds.shape[0], add.astype(x.dtype), jnp.zeros((), x.dtype))
            x = constrain(x, RESIDUAL_AXES)
            return x, (None if cache is None else (cache.k[0], cache.v[0]))

        if cfg.remat:
            # Inside a scan the recomputation of layer i can only run in backward iteration i, so remat
            # really bounds the live activations to one layer (plus the saved layer inputs).
            body = nn.remat(body, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat_policy])
        scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(0,) + (nn.broadcast,) * 5, length=cfg.num_hidden_layers)
        index = jnp.arange(cfg.num_hidden_layers)
        if kv_cache is None:
            layer_xs, cache_meta = (index, None, None, None, None), None
        else:
            # Per-layer arrays are scanned over (the shared prefix's too, read only); the bookkeeping is broadcast.
            # A cache laid out for unrolled layers (`init_cache` of the decoding layout) is stacked first.
            kv_cache = kv_cache.stacked()
            layer_xs = (index, kv_cache.k, kv_cache.v, kv_cache.prefix_k, kv_cache.prefix_v)
            cache_meta = kv_cache.replace(k=None, v=None, prefix_k=None, prefix_v=None)
        x_btd, new_kv = scan(DecoderLayer(cfg, 0, self.lora, name="layers"), x_btd, layer_xs, cos_bth, sin_bth,
                             mask_bts, cache_meta, adds)
        if kv_cache is not None:
            kv_cache = kv_cache.replace(k=new_kv[0], v=new_kv[1])
        return x_btd, kv_cache


def default_positions(token_valid_bt: jax.Array, kv_cache: KVCache | None) -> jax.Array:
    """Positions (B, T) that count only valid tokens: padding does not advance the position (left or right)."""
    if kv_cache is not None:
        return kv_cache.next_positions(token_valid_bt)
    return jnp.maximum(jnp.cumsum(token_valid_bt.astype(jnp.int32), axis=1) - 1, 0)


def run_decoder(stack: DecoderStack, x_btd, cos_bth, sin_bth, token_valid_bt, kv_cache: KVCache | None,
                layer_residual_adds: Sequence[jax.Array] = (), deterministic: bool = True,
                max_position_b: jax.Array | None = None):
    """Build the mask (with or without a cache), run the stack, and advance the cache. Shared by Qwen3-VL.

    max_position_b (B,): pass when positions were explicit, so the cache continues after them.
    """
    t = x_btd.shape[1]
    if kv_cache is None:
        mask = make_attention_mask(jnp.arange(t), token_valid_bt)
        return stack(x_btd, cos_bth, sin_bth, mask, None, layer_residual_adds, deterministic)
    kv_cache = kv_cache.with_new_slots(token_valid_bt)
    mask = make_attention_mask(kv_cache.index + jnp.arange(t), kv_cache.valid)
    hidden, kv_cache = stack(x_btd, cos_bth, sin_bth, mask, kv_cache, layer_residual_adds, deterministic)
    return hidden, kv_cache.advance(token_valid_bt, max_position_b)


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 causal LM. Submodules: `embed_tokens`, `model` (DecoderStack), `lm_head` (absent when tied)."""

    config: Qwen3Config
    lora: LoraConfig | None = None

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                     embedding_init=nn.initializers.normal(0.02))
        self.model = DecoderStack(cfg, self.lora)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  output_dtype=jnp.float32)

    def embed(self, input_ids_bt: jax.Array) -> jax.Array:
        """Token embeddings (B, T, D) in the compute dtype."""
        return self.embed_tokens(input_ids_bt)

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """LM head on post-norm hidden states (B, T, D) -> float32 logits (B, T, V), accumulated and kept in float32
        whatever the compute dtype (`Embed.attend`)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden_btd)
        return self.lm_head(hidden_btd)

    def __call__(self, input_ids=None, inputs_embeds=None, positions=None, token_valid=None,
                 kv_cache: KVCache | None = None, return_logits: bool = True,
                 deterministic: bool = True) -> CausalLMOutput:
        """input_ids (B, T) int or inputs_embeds (B, T, D); positions (B, T) int (default: count of valid tokens,
        continuing from the cache); token_valid (B, T) bool (default all True; False = padding)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds.astype(self.config.dtype)
        b, t = x.shape[:2]
        if token_valid is None:
            token_valid = jnp.ones((b, t), bool)
        max_position = None
        if positions is None:
            positions = default_positions(token_valid, kv_cache)
        else:
            max_position = jnp.max(jnp.where(token_valid, positions, -1), axis=1)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config.head_dim, self.config.rope_theta),
                                self.config.dtype)
        hidden, kv_cache = run_decoder(self.model, x, cos, sin, token_valid, kv_cache,
                                       deterministic=deterministic, max_position_b=max_position)
        return CausalLMOutput(self.logits(hidden) if return_logits else None, hidden, kv_cache)


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=None, per_layer: bool | None = None) -> KVCache:
    """An empty cache for `config` (dtype defaults to the compute dtype). per_layer: one array per layer or one
    stacked array (`KVCache`'s docstring says why both); None lays it out like the layers, stacked for
    `scan_layers`. Generation passes False: its token loop runs on the stacked cache."""
    if per_layer is None:
        per_layer = not config.scan_layers
    return KVCache.init(config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim,
                        dtype or config.dtype, per_layer=per_layer)
