"""Qwen3-VL over an explicit KV cache, the way the latent methods use it: prefill a multimodal prompt, append
blocks of input embeddings after it, then teacher-force or decode the answer.

Method-agnostic building blocks shared by VITAL (`vital/latent.py`: K latent slots, one per scan step) and
MedSynapse-V (`medsynapse/memory.py`: N memory vectors in one block); training and generation of each method go
through the same functions, so they see identical caches.

Positions: the prompt takes explicit MRoPE positions (3, B, Tp) from `mrope.get_rope_index`; every vector or token
written after it gets `lengths + rope_delta` on all three axes (`KVCache.position_offset`), counting only valid
slots, as transformers does for generated tokens.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vital_jax import generation, sharding
from vital_jax.layers.kv_cache import KVCache
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration, init_cache
from vital_jax.models.qwen3_vl.mrope import get_rope_index
from vital_jax.models.qwen3_vl.params import decoding_layout
from vital_jax.models.qwen3_vl.vision import VisionInputs, vision_inputs


@flax.struct.dataclass
class PrefixInputs:
    """The multimodal prefix of a batch (all arrays; built on the host by `prefix_inputs`).

    input_ids, token_valid: (B, Tp), left-padded so every prompt ends at slot Tp - 1.
    positions: (3, B, Tp) MRoPE positions (from `mrope.get_rope_index`).
    pixel_patches: (Np, C*T*ps*ps) or None; vision_inputs: the matching `VisionInputs` or None.
    image_feature_index: (B, Tp) int32 or None: the merged-feature row of each image token when the patches are
      not packed in batch order (`distributed.global_vital_batch` packs each batch shard's examples into its own
      slice); None: the k-th image token of the batch takes row k.
    image_features: (image_embeds (M, D), [deepstack (M, D), ...]) already computed by the vision tower, used
      instead of pixel_patches when those are None (a caller that needs the merged visual tokens itself, e.g.
      MedSynapse-V's A_psi, runs the tower once and passes them here).
    """

    input_ids: jax.Array
    token_valid: jax.Array
    positions: jax.Array
    pixel_patches: jax.Array | None = None
    vision_inputs: VisionInputs | None = None
    image_feature_index: jax.Array | None = None
    image_features: tuple | None = None


def prefix_inputs(prompt_ids: np.ndarray, prompt_valid: np.ndarray, image_grid_thw: np.ndarray | None,
                  pixel_patches: np.ndarray | None, config: Qwen3VLConfig) -> PrefixInputs:
    """Host-side: MRoPE positions and vision-tower inputs for left-padded prompts with one image each.

    Padding patches (pixel_patches beyond the grids' patch count) become their own attention segment.
    """
    grids = [tuple(int(v) for v in g) for g in image_grid_thw] if image_grid_thw is not None else []
    positions, _ = get_rope_index(prompt_ids, prompt_valid, grids, config.image_token_id,
                                  config.vision.spatial_merge_size)
    vis = None
    if grids:
        vis = vision_inputs(grids, config.vision, pad_to=int(pixel_patches.shape[0]))
    return PrefixInputs(
        input_ids=jnp.asarray(prompt_ids, jnp.int32), token_valid=jnp.asarray(prompt_valid, bool),
        positions=jnp.asarray(positions, jnp.int32),
        pixel_patches=None if not grids else jnp.asarray(pixel_patches, jnp.float32), vision_inputs=vis)


def fold_rng(rng: jax.Array | None, *salt: int) -> jax.Array | None:
    """`rng` folded with each salt in turn (None stays None): one dropout stream per call site."""
    if rng is None:
        return None
    for s in salt:
        rng = jax.random.fold_in(rng, s)
    return rng


def _dropout(rng):
    return {} if rng is None else {"dropout": rng}


def encode_prefix(model: Qwen3VLForConditionalGeneration, params, prefix: PrefixInputs, cache_len: int,
                  deterministic: bool = True, rng=None, per_layer_cache: bool | None = None
                  ) -> tuple[KVCache, jax.Array]:
    """Encode image + question into a fresh cache of `cache_len` slots, laid out as `init_cache(...,
    per_layer=per_layer_cache)` (generation passes False).

    Returns (kv_cache, last_hidden (B, D)): the prompt's last post-norm hidden state, which predicts the token
    after the prompt.
    """
    batch = prefix.input_ids.shape[0]
    out = model.apply({"params": params}, input_ids=prefix.input_ids, token_valid=prefix.token_valid,
                      positions=prefix.positions, pixel_patches=prefix.pixel_patches,
                      vision_inputs=prefix.vision_inputs, image_features=prefix.image_features,
                      image_feature_index=prefix.image_feature_index,
                      kv_cache=init_cache(model.config, batch, cache_len, per_layer=per_layer_cache),
                      return_logits=False, deterministic=deterministic, rngs=_dropout(rng))
    return out.kv_cache, generation.gather_last(out.hidden_states, prefix.token_valid)


def append_embeddings(model: Qwen3VLForConditionalGeneration, params, kv_cache: KVCache, embeds_btd: jax.Array,
                      valid_bt: jax.Array | None = None, deterministic: bool = True,
                      rng=None) -> tuple[jax.Array, KVCache]:
    """Write T input-embedding vectors (B, T, D) into the next T cache slots in one pass.

    Vector t of a row gets position `lengths + rope_delta + t` on all three MRoPE axes (counting valid vectors
    only) and attends causally to the cache and to the vectors before it, exactly as if the vectors had been
    inserted into `inputs_embeds` after the cached sequence. valid_bt (B, T) bool: False slots are written but stay
    invisible and do not advance positions. Returns (post-norm hidden states (B, T, D), kv_cache).
    """
    b, t = embeds_btd.shape[:2]
    valid_bt = jnp.ones((b, t), bool) if valid_bt is None else valid_bt
    out = model.apply({"params": params}, inputs_embeds=embeds_btd, token_valid=valid_bt, kv_cache=kv_cache,
                      return_logits=False, deterministic=deterministic, rngs=_dropout(rng))
    return out.hidden_states, out.kv_cache


def lm_logits(model: Qwen3VLForConditionalGeneration, params, hidden: jax.Array) -> jax.Array:
    """The LM head on post-norm states (..., D) -> float32 logits (..., V)."""
    return model.apply({"params": params}, hidden, method=model.logits)


def teacher_forced_logits(model: Qwen3VLForConditionalGeneration, params, kv_cache: KVCache,
                          last_hidden: jax.Array, answer_ids: jax.Array, answer_valid: jax.Array,
                          deterministic: bool = True, rng=None) -> jax.Array:
    """Teacher-forced answer logits (B, Ta, V) float32, where position t predicts answer_ids[:, t].

    The first answer token is predicted from `last_hidden` (B, D), the post-norm state of the cache's last valid
    slot; answer tokens a_1..a_{Ta-1} are then fed in one parallel pass over the same cache.
    answer_ids / answer_valid (B, Ta) are right-padded.
    """
    out = model.apply({"params": params}, input_ids=answer_ids[:, :-1], token_valid=answer_valid[:, :-1],
                      kv_cache=kv_cache, return_logits=False, deterministic=deterministic, rngs=_dropout(rng))
    # One LM head over all Ta positions: the head's weight (D x V, the largest matrix at small model sizes) is
    # read once per pass instead of twice, forward and backward (two calls cost 1.7x one on CPU).
    hidden = jnp.concatenate([last_hidden[:, None, :].astype(out.hidden_states.dtype), out.hidden_states], axis=1)
    return lm_logits(model, params, hidden)


def token_log_probs(logits: jax.Array, token_ids: jax.Array, token_valid: jax.Array) -> jax.Array:
    """log p(token) (B, T) float32 from logits (B, T, V); 0 where token_valid is False."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, token_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(token_valid, picked, 0.0)


def decode_step_fn(model: Qwen3VLForConditionalGeneration):
    """`generation.decode` step: one token per example at position `lengths + rope_delta`."""

    def step_fn(params, ids_b1, valid_b1, kv_cache):
        out = model.apply({"params": params}, input_ids=ids_b1, token_valid=valid_b1, kv_cache=kv_cache)
        return out.logits[:, -1], out.kv_cache

    return step_fn


def decoding_model(model: Qwen3VLForConditionalGeneration, params
                   ) -> tuple[Qwen3VLForConditionalGeneration, dict]:
    """(model, params) in `qwen3_vl_params.decoding_layout`: the same numbers (float32 adapters folded in, up to
    rounding), laid out for one-token steps. Works on traced params inside a jitted program, where the new layout
    is computed once per call, before the token loop; a tree already in that layout comes back unchanged. The KV
    cache's layout does not depend on it: a cache written by the training layout decodes in this one."""
    config, params, lora = decoding_layout(model.config, params, model.lora)
    if config == model.config and lora == model.lora:
        return model, params
    return Qwen3VLForConditionalGeneration(config, lora), params


def output_head_gathered(model: Qwen3VLForConditionalGeneration, params: dict) -> dict:
    """`params` with the output head's weight (`lm_head`, or the tied embedding table) gathered for a token loop
    (`sharding.gathered_before_loop`). The head is read at every token and sits outside the decoder layers, so
    neither layout (`decoding_model`) gathers it before the loop; left to the step's own constraint, only XLA's
    loop-invariant code motion keeps it from being all-gathered at every token (V x D, the largest matrix: 1.2 GB
    of bf16 at 8B; with the pass off, as `benchmarks.medsynapse_8b` compiles, 2.3 GiB per decode step on CPU)."""
    if model.config.text.tie_word_embeddings:
        return sharding.gathered_before_loop(params, ("language_model", "embed_tokens"), "embedding")
    return sharding.gathered_before_loop(params, ("lm_head",), "kernel")


def decode(model: Qwen3VLForConditionalGeneration, params, kv_cache: KVCache, last_hidden: jax.Array,
           sampling: generation.SamplingConfig, rng=None, relayout: bool | None = None
           ) -> tuple[jax.Array, jax.Array]:
    """Greedy/sampled decoding after the cache (the jitted `generation.decode` while_loop).

    last_hidden (B, D): the post-norm state of the cache's last valid slot (it predicts the first new token).
    The cache needs `sampling.max_new_tokens` free slots. Returns (tokens (B, max_new_tokens) int32, lengths (B,)).

    relayout: decode in `decoding_model`'s layout. A training program (GRPO and IMT rollouts, the training probe)
    holds its backbone in the training layout: under `scan_layers` every token's step would slice each layer's
    weights out of the stacked arrays, and XLA materialises those slices, so each token would copy the whole text
    decoder before reading it (on CPU 26.8 instead of 14.2 ms per token at hidden 1024 x 8 layers; at 8B, bf16,
    ~14 GB copied per token). Relaid out, the copy is made once per call. The price is memory: while the loop
    runs, the relaid-out text weights (unstacked; merged where float32 LoRA is folded in) live beside the
    originals. None (the default) relays out unless the mesh splits the weights (`sharding.weights_sharded`). Under
    FSDP the unrolled layers' gathered weights all end up live at once, at full size (the gathers do not depend on
    the activations, and nothing orders them one layer at a time as the scan does): medsynapse_8b's Stage III on
    CPU, 11.2 -> 48.9 GiB per device. As held, on the other hand, every step all-gathers every layer again (26 GiB
    per device per step by the same count), so a mesh with the memory to spare should pass True (the 8B MedSynapse-V
    recipe does). Under tensor parallelism the fused q|k|v and gate|up would be split across their parts, which
    every step would then reshard. False decodes in the given layout. The output head is gathered once per call in
    either layout (`output_head_gathered`).
    """
    first_logits = lm_logits(model, params, last_hidden)
    if generation.resolve_relayout(relayout):
        model, params = decoding_model(model, params)
    return generation.decode(decode_step_fn(model), output_head_gathered(model, params), first_logits, kv_cache,
                             sampling, rng)
