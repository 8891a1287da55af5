"""One optimisation step of VITAL: the joint loss (Eq. 7), gradients for trainable parameters only, AdamW.

The train state keeps the trainable tree (MaskedNode in frozen places) and the optimizer state over it; the
frozen tree (vision tower, backbone base weights) is passed separately and never differentiated or updated.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vital_jax import freeze, sharding
from vital_jax.vital import trainable
from vital_jax.vital.batch import VitalBatch
from vital_jax.vital.model import VitalModel


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # trainable tree, MaskedNode where frozen
    opt_state: Any
    rng: jax.Array


def init_train_state(params: dict, optimizer: optax.GradientTransformation, rng: jax.Array,
                     train_decoder: bool = True) -> tuple[TrainState, dict]:
    """Split full params into (TrainState over the trainable tree, frozen tree).

    The trainable tree and its optimizer state are float32 master weights, whatever dtype `params` came in (a
    16-bit copy would round small AdamW updates away, issue #18); the frozen tree keeps its storage dtype.
    """
    train, frozen = trainable.split(params, trainable.trainable_mask(params, train_decoder))
    train = sharding.cast_floating(train, jnp.float32)
    return TrainState(jnp.zeros((), jnp.int32), train, optimizer.init(train), rng), frozen


def global_norm(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def train_step(model: VitalModel, optimizer: optax.GradientTransformation, state: TrainState, frozen: dict,
               batch: VitalBatch, learning_rate_fn=None) -> tuple[TrainState, dict]:
    """Returns (new state, metrics). Metrics: loss, each term, grad_norm, z norms, inter-step similarity, lr."""
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(train_params):
        out = model.forward(trainable.merge(train_params, frozen), batch, deterministic=False, rng=step_rng)
        return out.loss, out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state = freeze.apply_update(optimizer, grads, state.opt_state, state.params)
    metrics = {"loss": loss, "task_loss": out.task_loss, "grad_norm": global_norm(grads),
               **latent_diagnostics(out.z, out.valid_steps)}
    # A term with weight 0 is not computed (VitalModel.forward): logging its 0 would read as a perfect fit.
    if model.config.lambda_text != 0:
        metrics["text_loss"] = out.text_loss
    if model.config.lambda_visual != 0:
        metrics["visual_loss"] = out.visual_loss
    if learning_rate_fn is not None:
        metrics["learning_rate"] = learning_rate_fn(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def latent_diagnostics(z: jax.Array, valid_steps: jax.Array) -> dict:
    """Collapse diagnostics (Appendix C.6), measured in the training forward (dropout on): mean ||z_k|| over valid
    steps and the mean cosine similarity of consecutive valid steps (1.0 = the loop is a no-op). A program with one
    latent slot (phase 1 of the curriculum) has no consecutive steps and logs no cosine; a batch of such programs
    whose examples all have K <= 1 logs NaN (undefined), not a number that would read as diverse steps."""
    z = z.astype(jnp.float32)
    norms = jnp.linalg.norm(z, axis=-1)
    mean_norm = jnp.where(valid_steps, norms, 0.0).sum() / jnp.maximum(valid_steps.sum(), 1)
    out = {"z_norm": mean_norm}
    if z.shape[1] < 2:
        return out
    unit = z / jnp.maximum(norms[..., None], 1e-12)
    cos = jnp.sum(unit[:, 1:] * unit[:, :-1], axis=-1)
    pair_valid = valid_steps[:, 1:] & valid_steps[:, :-1]
    pairs = pair_valid.sum()
    mean_cos = jnp.where(pair_valid, cos, 0.0).sum() / jnp.maximum(pairs, 1)
    out["adjacent_step_cosine"] = jnp.where(pairs > 0, mean_cos, jnp.nan)
    return out
