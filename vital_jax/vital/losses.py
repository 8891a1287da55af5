"""The loss terms of VITAL, all in float32: L_task, Eq. (4) L_text, Eq. (6) L_visual, Eq. (7) the joint loss.

Each term is returned per example (B,) together with a weight (B,) saying whether the example contributes
(e.g. an example with K_b = 0 has no latent step to supervise); the batch value is the weighted mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean CE over the valid tokens of each row. logits (..., T, V), targets/mask (..., T) ->
    (loss (...), has_tokens (...) bool). Rows without valid tokens get loss 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    count = mask.sum(axis=-1)
    loss = jnp.where(mask, nll, 0.0).sum(axis=-1) / jnp.maximum(count, 1)
    return loss, count > 0


def task_loss(answer_logits: jax.Array, answer_ids: jax.Array, answer_valid: jax.Array):
    """L_task: next-token CE over answer tokens only (Eq. 2 teacher forced). (B, Ta, V) -> per example (B,): each
    answer's token mean (the batch value: `token_mean` or `weighted_mean`, `VitalConfig.task_loss_reduction`)."""
    return token_cross_entropy(answer_logits, answer_ids, answer_valid)


def step_mask(latent_steps: jax.Array, k_max: int) -> jax.Array:
    """(B,) K_b -> (B, K_max) bool, True for the valid steps k <= K_b."""
    return jnp.arange(k_max)[None, :] < latent_steps[:, None]


def mean_over_steps(per_step: jax.Array, valid_steps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, K) values, (B, K) bool -> (mean over each example's valid steps (B,), has_steps (B,))."""
    count = valid_steps.sum(axis=-1)
    return jnp.where(valid_steps, per_step, 0.0).sum(axis=-1) / jnp.maximum(count, 1), count > 0


def text_loss(step_logits: jax.Array, step_ids: jax.Array, step_token_valid: jax.Array, valid_steps: jax.Array):
    """Eq. (4): L_text = 1/K sum_k CE(Decoder([pj_in(z_k); Embed(e_k)]), e_k), per example.

    step_logits (B, K, Ts, V): position t predicts step_ids[:, :, t] (t = 0 from the pj_in position).
    """
    per_step, _ = token_cross_entropy(step_logits, step_ids, step_token_valid & valid_steps[..., None])
    return mean_over_steps(per_step, valid_steps)


def interpolated_targets(roi_feature: jax.Array, global_feature: jax.Array, latent_steps: jax.Array,
                         k_max: int) -> jax.Array:
    """Eq. (8) (Appendix C.5): f_k = Normalize(a_k f_ROI + (1 - a_k) f_global), a_k = (k-1)/(K_b-1), a = 1 if
    K_b = 1. (B, dv), (B, dv), (B,) -> (B, K_max, dv); steps beyond K_b repeat f_ROI (they are masked anyway)."""
    k = jnp.arange(k_max, dtype=jnp.float32)[None, :]
    denom = jnp.maximum(latent_steps.astype(jnp.float32) - 1.0, 1.0)[:, None]
    alpha = jnp.where(latent_steps[:, None] <= 1, 1.0, jnp.minimum(k / denom, 1.0))
    mixed = alpha[..., None] * roi_feature[:, None] + (1.0 - alpha[..., None]) * global_feature[:, None]
    return mixed / jnp.maximum(jnp.linalg.norm(mixed, axis=-1, keepdims=True), 1e-12)


def visual_loss(projected: jax.Array, targets: jax.Array, valid_steps: jax.Array, reduction: str = "mean"):
    """Eq. (6): L_visual = 1/K sum_k ||VP(z_k) - f_ROI||_1, per example.

    projected (B, K, dv) float32; targets (B, dv) shared or (B, K, dv) per step. `reduction` over dv: "mean"
    (element mean, the default: comparable in scale to L_task) or "sum" (the literal L1 norm).
    """
    if targets.ndim == 2:
        targets = targets[:, None, :]
    diff = jnp.abs(projected.astype(jnp.float32) - targets.astype(jnp.float32))
    per_step = diff.mean(axis=-1) if reduction == "mean" else diff.sum(axis=-1)
    return mean_over_steps(per_step, valid_steps)


def weighted_mean(per_example: jax.Array, weight: jax.Array) -> jax.Array:
    """Batch mean over the examples with weight True (0 if none)."""
    weight = weight.astype(jnp.float32)
    return (per_example * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def token_mean(per_example_mean: jax.Array, token_count: jax.Array, weight: jax.Array) -> jax.Array:
    """The mean over every token of the examples with weight True, from their token means (B,) and token counts
    (B,): sum_b mean_b n_b / sum_b n_b (0 if no token)."""
    tokens = jnp.where(weight, token_count, 0).astype(jnp.float32)
    return (per_example_mean * tokens).sum() / jnp.maximum(tokens.sum(), 1.0)


def joint_loss(l_task, l_text, l_visual, lambda_text: float, lambda_visual: float):
    """Eq. (7): L = L_task + lambda_1 L_text + lambda_2 L_visual."""
    return l_task + lambda_text * l_text + lambda_visual * l_visual
