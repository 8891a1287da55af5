"""Which parameters train (paper §4.1, Table 10), the masked optax optimizer, and merging LoRA for export.

Trainable: LoRA adapters of every backbone LLM layer, the auxiliary decoder (fully), pj_in and the visual
projector. Frozen: the vision tower and the backbone base weights. Frozen leaves are replaced by
`optax.MaskedNode()` in the trainable tree (`vital_jax/freeze.py`), so they get no gradient computation and carry
no optimizer state.
Trainable leaves are float32 master weights (and so is the AdamW state over them) whatever the frozen base's
storage dtype; the model casts them to its compute dtype where they are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vital_jax.freeze import MASKED, mask_from_predicate, merge, split
from vital_jax.layers.linear import merge_lora

__all__ = ["MASKED", "SCHEDULE_SCOPES", "curriculum_schedule", "fresh_moments", "is_trainable", "make_optimizer",
           "mask_from_predicate", "merge", "merge_lora", "split", "trainable_mask", "warmup_cosine_schedule",
           "weight_decay_mask"]


def is_trainable(path: str, train_decoder: bool = True) -> bool:
    """Path rule: 'backbone/...' trains only its LoRA leaves; the scaffolding trains entirely."""
    top = path.split("/", 1)[0]
    if top == "backbone":
        return path.rsplit("/", 1)[-1].startswith("lora_")
    if top == "decoder":
        return train_decoder
    return top in ("pj_in", "visual_projector", "pause_embeddings")


def trainable_mask(params: dict, train_decoder: bool = True) -> dict:
    """A tree of bools like `params`."""
    return mask_from_predicate(params, lambda path: is_trainable(path, train_decoder))


_MATRIX_LEAVES = ("kernel", "lora_a", "lora_b", "embedding")


def weight_decay_mask(trainable: dict) -> dict:
    """Decay matrices (kernels, LoRA adapters, embeddings), not biases or norm scales (the usual AdamW practice).

    By leaf name rather than ndim: with scanned layers a norm scale is (L, D), still a vector per layer. The pause
    control's `pause_embeddings` (K_max, D) do not decay: each row is one learned input vector, a constant offset
    like a bias, and the study's pause arm was trained so (decaying them would pull the control's inputs to 0).
    """
    def decays(path, x):
        return (not isinstance(x, optax.MaskedNode)) and getattr(path[-1], "key", None) in _MATRIX_LEAVES

    return jax.tree_util.tree_map_with_path(decays, trainable, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def make_optimizer(learning_rate, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999,
                   max_grad_norm: float = 1.0, decay_mask=None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (Table 12), over the trainable tree (MaskedNode leaves are skipped)."""
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )


def warmup_cosine_schedule(peak_lr: float, total_steps: int, warmup_ratio: float = 0.05):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0."""
    warmup = max(1, int(round(total_steps * warmup_ratio)))
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1), 0.0)


# How the learning-rate schedule and AdamW's moments span the curriculum (`config.optimizer.schedule_scope`).
SCHEDULE_SCOPES = ("curriculum", "phase")


def curriculum_schedule(peak_lr: float, steps_per_phase, warmup_ratio: float, scope: str):
    """The learning rate as a function of the global step: one `warmup_cosine_schedule` over the summed steps
    ("curriculum"), or one per phase over that phase's steps, restarting at each phase's first step ("phase")."""
    if scope == "curriculum":
        return warmup_cosine_schedule(peak_lr, sum(steps_per_phase), warmup_ratio)
    if scope != "phase":
        raise ValueError(f"schedule scope {scope!r} is not one of {SCHEDULE_SCOPES}")
    schedules = [warmup_cosine_schedule(peak_lr, n, warmup_ratio) for n in steps_per_phase]
    return optax.join_schedules(schedules, [int(b) for b in np.cumsum(steps_per_phase)[:-1]])


def fresh_moments(opt_state):
    """`opt_state` with every AdamW moment (and its bias-correction count) back at its start, the other states
    kept: the learning-rate schedule's step count goes on (it is the global step). What a phase of the "phase"
    schedule scope starts from, as a separate run would."""
    def reset(node):
        if isinstance(node, optax.ScaleByAdamState):
            return jax.tree.map(jnp.zeros_like, node)
        return node

    return jax.tree.map(reset, opt_state, is_leaf=lambda node: isinstance(node, optax.ScaleByAdamState))
