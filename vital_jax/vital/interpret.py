"""Dual interpretability (paper §3.3) and collapse diagnostics (Appendix C.6), re-attaching the scaffolding.

  decode_latents       the textual window: each z_k decoded greedily by the auxiliary decoder from [pj_in(z_k)]
  latent_heatmaps      the visual window: cos(VP(z_k), patch feature) over the vision encoder's patch grid
  retrieve_neighbours  nearest neighbours of VP(z_k) in a bank of ROI features
  step_similarity      Eq. (9): the inter-step cosine-similarity matrix, accumulated over a dataset
  norm_ratio           ||z_k|| against the mean token-embedding norm (feeding back states far larger than
                       embeddings is a known failure of latent loops)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vital_jax import generation, sharding
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.models.qwen3.modeling import Qwen3ForCausalLM, init_cache
from vital_jax.vital.model import VitalModel


def project_latents(model: VitalModel, params: dict, z: jax.Array) -> jax.Array:
    """VP(z_k): (B, K, D) -> (B, K, dv) float32 (eval mode)."""
    return model.visual_projector.apply({"params": params["visual_projector"]}, z)


def decode_latents(model: VitalModel, params: dict, z: jax.Array, max_new_tokens: int = 32,
                   eos_token_ids: tuple[int, ...] = (), relayout: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy text for every latent state. z (B, K, D) -> (tokens (B, K, N) int32, lengths (B, K)).

    The decoder sees exactly what it was trained on: [pj_in(z_k)] first, then its own tokens. relayout: decode in
    `qwen3.params.decoding_layout` (the same numbers; a decoder trained with scanned layers is unrolled once here
    instead of having each layer sliced out of its stack at every token); None, as the backbone's
    `cached.decode`: unless the mesh splits the weights.
    """
    b, k, _ = z.shape
    decoder_config, dp = model.decoder_config, params["decoder"]
    if generation.resolve_relayout(relayout):
        decoder_config, dp = qwen3_params.decoding_layout(decoder_config, dp)
    decoder = Qwen3ForCausalLM(decoder_config)
    h0 = model.pj_in.apply({"params": params["pj_in"]}, z).reshape(b * k, 1, -1)
    cache = init_cache(decoder_config, b * k, 1 + max_new_tokens, per_layer=False)
    out = decoder.apply({"params": dp}, inputs_embeds=h0, kv_cache=cache)

    def step_fn(p, ids_b1, valid_b1, kv):
        step = decoder.apply({"params": p}, input_ids=ids_b1, token_valid=valid_b1, kv_cache=kv)
        return step.logits[:, -1], step.kv_cache

    sampling = generation.SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids)
    # The decoder's output head gathered once, not at every token (as `qwen3_vl.cached.output_head_gathered`).
    head = ("embed_tokens", "embedding") if decoder_config.tie_word_embeddings else ("lm_head", "kernel")
    dp = sharding.gathered_before_loop(dp, head[:1], head[1])
    tokens, lengths = generation.decode(step_fn, dp, out.logits[:, -1], out.kv_cache, sampling)
    return tokens.reshape(b, k, -1), lengths.reshape(b, k)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity of (..., d) against (M, d) -> (..., M)."""
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return jnp.einsum("...d,md->...m", a, b)


def patch_heatmaps(projected: jax.Array, patch_features: jax.Array) -> jax.Array:
    """The visual window: projected (B, K, dv), patch features (B, Np, dv) with Np = g*g in raster order
    -> (B, K, g, g) cosine maps."""
    b, k, _ = projected.shape
    n = patch_features.shape[1]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"patch_features has {n} patches, not a square grid")
    sims = jax.vmap(cosine)(projected, patch_features)  # (B, K, Np)
    return sims.reshape(b, k, g, g)


def latent_heatmaps(model: VitalModel, params: dict, z: jax.Array, patch_features: jax.Array) -> jax.Array:
    """The visual window of every latent step (what `explain` draws and the training probe logs):
    z (B, K, D), patch features (B, g*g, dv) -> (B, K, g, g) cos(VP(z_k), patch)."""
    return patch_heatmaps(project_latents(model, params, z), patch_features)


def retrieve_neighbours(projected: jax.Array, bank: jax.Array, top_n: int = 5) -> tuple[jax.Array, jax.Array]:
    """Nearest ROI features to each VP(z_k). projected (..., dv), bank (M, dv) -> (scores, indices) (..., top_n)."""
    return jax.lax.top_k(cosine(projected, bank), min(top_n, bank.shape[0]))


def step_similarity(z: jax.Array, valid_steps: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (9) summands for one batch: (sum of cos(z_i, z_j) over examples (K, K), count of examples (K, K)).

    Add these up over a dataset and divide to get S; pairs involving an invalid step are not counted.
    """
    unit = z / jnp.maximum(jnp.linalg.norm(z.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)
    sims = jnp.einsum("bid,bjd->bij", unit, unit)
    pair = valid_steps[:, :, None] & valid_steps[:, None, :]
    return (np.asarray(jnp.where(pair, sims, 0.0).sum(0)), np.asarray(pair.sum(0)))


class StepSimilarity:
    """Running mean of the inter-step similarity matrix S over batches (Appendix C.6, Figure 11)."""

    def __init__(self, k_max: int):
        self.total = np.zeros((k_max, k_max))
        self.count = np.zeros((k_max, k_max))

    def update(self, z, valid_steps) -> None:
        total, count = step_similarity(z, valid_steps)
        self.total += total
        self.count += count

    def matrix(self) -> np.ndarray:
        """S (K, K); NaN where no example had both steps."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


def norm_ratio(model: VitalModel, params: dict, z: jax.Array, valid_steps: jax.Array) -> dict:
    """Mean ||z_k|| per step (K,), the mean token-embedding norm, and their ratio."""
    table = params["backbone"]["language_model"]["embed_tokens"]["embedding"]
    emb_norm = jnp.mean(jnp.linalg.norm(table.astype(jnp.float32), axis=-1))
    norms = jnp.linalg.norm(z.astype(jnp.float32), axis=-1)
    per_step = jnp.where(valid_steps, norms, 0.0).sum(0) / jnp.maximum(valid_steps.sum(0), 1)
    return {"z_norm_per_step": per_step, "embedding_norm": emb_norm, "ratio_per_step": per_step / emb_norm}
