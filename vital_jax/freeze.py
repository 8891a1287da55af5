"""Freeze part of a parameter tree: split it by a path predicate into a trainable and a frozen tree.

Each tree keeps the full structure with `optax.MaskedNode()` in the other group's places, so differentiating with
respect to the trainable tree computes no gradient for frozen leaves and an optax optimizer over it carries no
state for them (MaskedNode has no leaves). Method-agnostic: each method states its own rule of what trains
(VITAL: `vital/trainable.py`; MedSynapse-V: per stage, `medsynapse/stage1.py`).
"""

from __future__ import annotations

import jax
import optax

from vital_jax.models.hf_mapping import flatten, unflatten

MASKED = optax.MaskedNode()


def is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def mask_from_predicate(params: dict, predicate) -> dict:
    """A tree of bools like `params`: predicate('a/b/kernel') for each leaf path."""
    return unflatten({p: bool(predicate(p)) for p in flatten(params)})


def split(params: dict, mask: dict) -> tuple[dict, dict]:
    """(trainable, frozen): the same tree twice, with MaskedNode in place of the other group's leaves."""
    flat, flat_mask = flatten(params), flatten(mask)
    trainable = {p: (v if flat_mask[p] else MASKED) for p, v in flat.items()}
    frozen = {p: (MASKED if flat_mask[p] else v) for p, v in flat.items()}
    return unflatten(trainable), unflatten(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split`."""
    return jax.tree.map(lambda t, f: f if is_masked(t) else t, trainable, frozen, is_leaf=is_masked)


def apply_update(optimizer: optax.GradientTransformation, grads: dict, opt_state, params: dict):
    """One optimizer step on the trainable tree -> (new params, new optimizer state). Under
    `jax.named_scope("optimizer")`: the update's fused ops carry no optax name of their own, and the scope lets
    profiles (benchmarks.profile_train_step) attribute them to the optimizer."""
    with jax.named_scope("optimizer"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
