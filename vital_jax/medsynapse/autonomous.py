"""The Autonomous Memory Module A_psi of MedSynapse-V (§2.4, Eq. 6): M_auto = A_psi(Enc_VLM(X, q)) in R^{N x d_h}.

A_psi replaces E_ana + P_phi at inference. Its input is the backbone's own visual tokens: the vision tower's
merged features (after the merger, the vectors that replace the `<|image_pad|>` embeddings in the prompt), which
the backbone computes anyway. The deepstack features and the question tokens are not inputs (the paper's
"visual encoding features"); the question still reaches the answer through the prompt in the cache.

From a variable number of visual tokens to N vectors: learned-query attention pooling, then the MLP.

    h_l = LayerNorm(v_l)                          every visual token l of the example (all of its images)
    a_nl = softmax_l(h_l . q_n / sqrt(D))          over the example's valid visual tokens only
    p_n = sum_l a_nl h_l                           N pooled vectors (D)
    m_n = fc2(gelu(fc1(p_n))) + s_n                the 2-layer MLP, D -> mlp_hidden -> D, plus slot n's offset

Why this and not adaptive pooling into N contiguous bins:
* The token count varies with the image size (native dynamic resolution), an example may hold several images,
  and batches are padded. A masked softmax handles all three with one fixed-shape program; padding and other
  examples' tokens get weight exactly 0, and the result does not depend on the order of the tokens or images.
  Contiguous bins would cut the row-major token sequence into horizontal stripes that cover different anatomy
  at every image size, split or merge images arbitrarily, and leave bins empty when there are fewer than N tokens.
* Each of the N queries learns which visual content its slot summarises, as P_phi's N probes do on the encoder's
  pool: the student's slots can specialise like the teacher memory M_pri they are trained to stand in for.
* It adds only the N x D queries (65 K at 8B) to the paper's "2-layer MLP + LayerNorm", and no key/value
  projections. Pooling before the MLP runs the MLP on N vectors instead of thousands of tokens, so inference
  costs a standard VLM plus N extra positions.
An example without visual tokens (text only) pools to zero, so its memory is the learned constant
fc2(gelu(b1)) + s_n.

The slot offsets s (N x D, one per memory slot) let A_psi give each slot the constant part of the teacher's slot:
P_phi's N probes make N distinct vectors even for an average image, while the shared MLP alone could separate the
slots only through their pooled inputs (convex mixtures of the same few visual tokens). Stage III can start A_psi
at the teacher's mean memory (`teacher_mean_init`): s = the per-slot mean of M_pri over the training images and
fc2 = 0, so the deployed model starts as the privileged branch does on an average image rather than from random
memories it has never seen, and Eq. (7) then trains the image-dependent part.

Initialisation: queries ~ N(0, 1), so the pooling logits start with unit spread (N distinct soft pools rather
than N copies of the mean); fc2's kernel ~ normal(output_rms / sqrt(mlp_hidden)), so the memory starts at the
token-embedding RMS as P_phi's does (`sampler.py`). Parameters and compute are float32 whatever the backbone's
dtype (the only weights Stage III trains).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vital_jax.layers.linear import Linear
from vital_jax.layers.norms import LayerNorm
from vital_jax.models.qwen3_vl.cached import PrefixInputs
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration, scatter_image_features


@dataclasses.dataclass(frozen=True)
class AutonomousConfig:
    """hidden_size D (the backbone's: its visual tokens' width and the memory's), num_queries N (16, = P_phi's),
    mlp_hidden (default D)."""

    hidden_size: int
    num_queries: int = 16
    mlp_hidden: int | None = None
    layer_norm_eps: float = 1e-5
    output_rms: float | None = 0.02

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or self.hidden_size


class AutonomousMemory(nn.Module):
    """A_psi: visual tokens (B, L, D) + valid (B, L) bool -> memory M_auto (B, N, D) float32.

    Parameters: `queries` (N, D), `norm` (LayerNorm scale/bias (D,)), `fc1` (D -> mlp_hidden), `fc2`
    (mlp_hidden -> D), kernels (in, out) with biases, `slot_bias` (N, D) (zeros at init).
    """

    config: AutonomousConfig

    @nn.compact
    def __call__(self, tokens_bld: jax.Array, valid_bl: jax.Array) -> jax.Array:
        cfg = self.config
        if tokens_bld.ndim != 3 or tokens_bld.shape[-1] != cfg.hidden_size:
            raise ValueError(f"visual tokens must be (B, L, D={cfg.hidden_size}), got {tokens_bld.shape}")
        h_bld = LayerNorm(cfg.layer_norm_eps, jnp.float32, name="norm")(tokens_bld.astype(jnp.float32))
        queries = self.param("queries", nn.initializers.normal(1.0), (cfg.num_queries, cfg.hidden_size),
                             jnp.float32)
        scores_bnl = jnp.einsum("bld,nd->bnl", h_bld, queries) / math.sqrt(cfg.hidden_size)
        scores_bnl = jnp.where(valid_bl[:, None, :], scores_bnl, -jnp.inf)
        # A row without valid tokens would be softmax(-inf...) = nan; it pools to zero instead.
        any_valid = jnp.any(valid_bl, axis=1)[:, None, None]
        weights_bnl = jax.nn.softmax(jnp.where(any_valid, scores_bnl, 0.0), axis=-1)
        weights_bnl = jnp.where(valid_bl[:, None, :] & any_valid, weights_bnl, 0.0)
        pooled_bnd = jnp.einsum("bnl,bld->bnd", weights_bnl, h_bld)
        x = Linear(cfg.mlp_width, use_bias=True, name="fc1")(pooled_bnd)
        x = nn.gelu(x, approximate=False)
        init = (nn.initializers.lecun_normal() if cfg.output_rms is None
                else nn.initializers.normal(cfg.output_rms / math.sqrt(cfg.mlp_width)))
        x = Linear(cfg.hidden_size, use_bias=True, kernel_init=init, name="fc2")(x).astype(jnp.float32)
        slot_bias = self.param("slot_bias", nn.initializers.zeros, (cfg.num_queries, cfg.hidden_size), jnp.float32)
        return x + slot_bias


def teacher_mean_init(params: dict, mean_memory: jax.Array) -> dict:
    """A_psi's params started at the teacher's mean memory: slot_bias = mean_memory (N, D) (the per-slot mean of
    M_pri over the training images), fc2's kernel and bias = 0, so M_auto = mean_memory for every input. The
    other leaves keep their random init: fc2's gradient is non-zero from the first step (it multiplies the
    non-zero gelu(fc1(p))), and fc1 / queries / norm receive gradients once fc2 has moved, as a LoRA factor
    started at zero does."""
    mean_memory = jnp.asarray(mean_memory, jnp.float32)
    if mean_memory.shape != params["slot_bias"].shape:
        raise ValueError(f"mean memory {mean_memory.shape} does not match A_psi's slots "
                         f"{params['slot_bias'].shape} (N, D)")
    fc2 = {k: jnp.zeros_like(v) for k, v in params["fc2"].items()}
    return {**params, "fc2": fc2, "slot_bias": mean_memory}


def visual_tokens(backbone: Qwen3VLForConditionalGeneration, backbone_params,
                  prefix: PrefixInputs) -> tuple[PrefixInputs, jax.Array, jax.Array]:
    """Enc_VLM(X): the backbone's merged visual tokens laid out on the prompt, computed once.

    Returns (prefix carrying the image features, so the prefill reuses them instead of rerunning the tower;
    tokens (B, Tp, D) with each example's visual tokens at its `<|image_pad|>` slots and zeros elsewhere;
    valid (B, Tp) bool, True exactly at those slots). A prefix without images gives all-False `valid`.
    """
    b, tp = prefix.input_ids.shape
    d = backbone.config.text.hidden_size
    features = prefix.image_features
    if features is None and prefix.pixel_patches is not None:
        features = backbone.apply({"params": backbone_params}, prefix.pixel_patches, prefix.vision_inputs,
                                  method=backbone.encode_images)
    if features is None:
        return prefix, jnp.zeros((b, tp, d), jnp.float32), jnp.zeros((b, tp), bool)
    valid = (prefix.input_ids == backbone.config.image_token_id) & prefix.token_valid
    tokens = scatter_image_features(jnp.zeros((b, tp, d), features[0].dtype), valid, features[0],
                                    prefix.image_feature_index)
    return prefix.replace(pixel_patches=None, vision_inputs=None, image_features=features), tokens, valid


def autonomous_memory(backbone: Qwen3VLForConditionalGeneration, autonomous: AutonomousMemory, params: dict,
                      prefix: PrefixInputs) -> tuple[PrefixInputs, jax.Array]:
    """Eq. (6): M_auto = A_psi(Enc_VLM(X)) from params {"backbone", "autonomous", ...}.

    Returns (the prefix with its image features computed, for the prefill; memory (B, N, D) float32).
    """
    prefix, tokens, valid = visual_tokens(backbone, params["backbone"], prefix)
    return prefix, autonomous.apply({"params": params["autonomous"]}, tokens, valid)
