"""Stage I of MedSynapse-V, semantic alignment warmup (§2.2, Eq. 2): only P_phi trains.

L_warm(phi) = - sum_t log pi_theta(y*_t | X, q, M, y*_<t), M = P_phi(E_ana(X)), with the VLM backbone theta and the
anatomical encoder E_ana frozen. Paper settings: lr 2e-4, 3 epochs (`make_optimizer`'s default is that lr; the
authors' skeleton adds AdamW weight decay 0.01, clipping at 1.0 and a cosine schedule with 3 % warmup).

Parameters are one dict {"sampler": phi, "backbone": theta}. `init_train_state` splits it (`vital_jax/freeze.py`)
into the trainable tree (phi, with optax.MaskedNode in the backbone's places) and the frozen tree, so the
gradient is taken with respect to phi alone and the optimizer holds state for phi alone; the backbone cannot
change. The encoder is not an input: the batch carries its feature map F = E_ana(X) (B, H_f, W_f, d_f), computed
outside the step or cached offline, which is the same thing for a frozen encoder.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vital_jax import freeze, sharding
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler
from vital_jax.models.qwen3_vl.cached import PrefixInputs
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration

LEARNING_RATE = 2e-4
EPOCHS = 3
REDUCTIONS = ("sum", "token_mean")


@flax.struct.dataclass
class WarmupBatch:
    """prefix: image + question (B, Tp), left-padded; feature_map: E_ana(X) (B, H_f, W_f, d_f);
    answer_ids / answer_valid: the reference answer y* (B, Ta), right-padded; example_valid (B,) bool."""

    prefix: PrefixInputs
    feature_map: jax.Array
    answer_ids: jax.Array
    answer_valid: jax.Array
    example_valid: jax.Array


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # trainable tree: phi, MaskedNode in the backbone's places
    opt_state: Any
    rng: jax.Array


def is_trainable(path: str) -> bool:
    """Stage I: the sampler's leaves train; everything else (the backbone) is frozen."""
    return path.split("/", 1)[0] == "sampler"


def warmup_loss(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler, params: dict,
                batch: WarmupBatch, reduction: str = "sum", deterministic: bool = True, rng=None,
                prompt_tail: int = 0):
    """Eq. (2) in float32. Returns (loss, aux) with aux = {"nll_per_example" (B,), "tokens" (B,), "memory_rms"}.

    reduction: "sum" (default, the paper): each example's summed answer NLL, averaged over valid examples;
    "token_mean" (the authors' skeleton, a plain token-level cross entropy): the NLL summed over the batch's
    answer tokens divided by their number. prompt_tail: where the memory sits (`memory.inject`; 0: after the
    prompt).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    sampler_rngs = {} if rng is None else {"dropout": rng}
    memory = sampler.apply({"params": params["sampler"]}, batch.feature_map, deterministic, rngs=sampler_rngs)
    log_probs = memory_lib.answer_log_probs(backbone, params["backbone"], batch.prefix, memory, batch.answer_ids,
                                            batch.answer_valid, prompt_tail=prompt_tail)
    counted = batch.answer_valid & batch.example_valid[:, None]
    nll = -jnp.where(counted, log_probs, 0.0).sum(axis=1)
    tokens = counted.sum(axis=1)
    if reduction == "sum":
        loss = nll.sum() / jnp.maximum(batch.example_valid.sum(), 1)
    else:
        loss = nll.sum() / jnp.maximum(tokens.sum(), 1)
    # The memory's scale against the token embeddings it sits among (NOTES: Coconut's fed-back states drift).
    memory_rms = jnp.sqrt(jnp.mean(jnp.square(memory)))
    return loss, {"nll_per_example": nll, "tokens": tokens, "memory_rms": memory_rms}


def _decays(path, x) -> bool:
    return (not freeze.is_masked(x)) and getattr(path[-1], "key", None) in ("kernel", "probes")


def make_optimizer(learning_rate=LEARNING_RATE, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """AdamW with global-norm clipping over the trainable tree (MaskedNode leaves are skipped). Weight decay on
    the matrices (kernels and the probes Q_0), not on biases or LayerNorm scales."""
    decay_mask = functools.partial(jax.tree_util.tree_map_with_path, _decays, is_leaf=freeze.is_masked)
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )


def init_train_state(params: dict, optimizer: optax.GradientTransformation, rng: jax.Array) -> tuple[TrainState, dict]:
    """Split {"sampler", "backbone"} into (TrainState over phi in float32, frozen tree)."""
    if set(params) != {"sampler", "backbone"}:
        raise ValueError(f"Stage I params are {{'sampler', 'backbone'}}, got {sorted(params)}")
    train, frozen = freeze.split(params, freeze.mask_from_predicate(params, is_trainable))
    train = sharding.cast_floating(train, jnp.float32)
    return TrainState(jnp.zeros((), jnp.int32), train, optimizer.init(train), rng), frozen


def train_step(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler,
               optimizer: optax.GradientTransformation, state: TrainState, frozen: dict, batch: WarmupBatch,
               reduction: str = "sum", prompt_tail: int = 0) -> tuple[TrainState, dict]:
    """One AdamW step on phi. Returns (new state, metrics: loss, grad_norm, memory_rms, answer_tokens)."""
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(train_params):
        return warmup_loss(backbone, sampler, freeze.merge(train_params, frozen), batch, reduction,
                           deterministic=False, rng=step_rng, prompt_tail=prompt_tail)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state = freeze.apply_update(optimizer, grads, state.opt_state, state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "memory_rms": aux["memory_rms"],
               "answer_tokens": aux["tokens"].sum()}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler,
                    optimizer: optax.GradientTransformation, reduction: str = "sum", prompt_tail: int = 0):
    """`train_step` jitted over (state, frozen, batch); the modules, optimizer, reduction and the memory's place
    are fixed."""
    return jax.jit(functools.partial(train_step, backbone, sampler, optimizer, reduction=reduction,
                                     prompt_tail=prompt_tail))
