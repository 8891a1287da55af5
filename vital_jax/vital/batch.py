"""The device-side VITAL batch and its construction from the numpy batches of `vital_jax.data.pipeline`."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.models.qwen3_vl.cached import PrefixInputs, prefix_inputs
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig


@flax.struct.dataclass
class VitalBatch:
    """One training/evaluation batch of five-tuples (image, question, answer, K-step chain, ROI feature).

    prefix: PrefixInputs (image + question, left-padded to Tp).
    answer_ids, answer_valid: (B, Ta) right-padded answer tokens (ending with <|im_end|>), Ta >= 2.
    latent_steps: (B,) int32 K_b <= K.
    step_ids, step_valid: (B, K, Ts) reasoning-chain tokens of each step (decoder vocabulary); K <= K_max is the
        number of latent slots the program runs (`latent_slots`).
    roi_feature: (B, dv) float32 unit-norm f_ROI. global_feature: (B, dv) or None (Appendix C.5 only).
    example_valid: (B,) bool, False for padding examples.
    """

    prefix: PrefixInputs
    answer_ids: jax.Array
    answer_valid: jax.Array
    latent_steps: jax.Array
    step_ids: jax.Array
    step_valid: jax.Array
    roi_feature: jax.Array
    example_valid: jax.Array
    global_feature: jax.Array | None = None


def check_token_ids(batch: dict, backbone_vocab: int, decoder_vocab: int) -> None:
    """Host-side guard: a token id outside an embedding table would silently become a NaN embedding inside jit
    (gathers fill out-of-range rows), so reject it here, naming the batch rows (`record_index`)."""
    checks = (("prompt_ids", "prompt_valid", backbone_vocab), ("answer_ids", "answer_valid", backbone_vocab),
              ("step_ids", "step_valid", decoder_vocab))
    for ids_key, valid_key, vocab in checks:
        ids = np.asarray(batch[ids_key])
        bad = ((ids < 0) | (ids >= vocab)) & np.asarray(batch[valid_key], bool)
        if bad.any():
            rows = np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0]
            records = np.asarray(batch.get("record_index", np.arange(ids.shape[0])))[rows]
            raise ValueError(f"{ids_key}: token ids {sorted(set(ids[bad].tolist()))[:5]} are outside the model's "
                             f"vocabulary of {vocab} (batch rows {rows.tolist()}, record_index {records.tolist()}); "
                             "was the data tokenised with another tokenizer?")


def trained_latent_steps(record_k: int, k_max: int, latent_steps_cap: int = -1) -> int:
    """The K that training runs a record of K = `record_k` with: capped by `latent_steps_cap` (>= 0; the model
    caps each example's K so, `VitalModel.forward`) and by K_max. What evaluation's per-record K and the training
    probe use, so that they show the model at the K it was trained at."""
    return min(record_k, k_max, latent_steps_cap if latent_steps_cap >= 0 else k_max)


def latent_slots(k_max: int, phase_max_k: int, latent_steps_cap: int = -1) -> int:
    """Latent slots a training program needs: the phase's largest K, capped by `latent_steps_cap` (>= 0)."""
    return trained_latent_steps(phase_max_k, k_max, latent_steps_cap)


def slice_latent_slots(batch: dict, slots: int, latent_steps_cap: int = -1) -> dict:
    """Host side: keep the first `slots` step slots of a pipeline batch (step_ids / step_valid (B, K_max, Ts)).

    The scan and the auxiliary decoder then run `slots` steps instead of K_max: slots past every example's K_b only
    cost compute (they are masked out of every term). An example whose K_b (after the cap) needs more slots is an
    error naming it, never a silent cut.
    """
    steps = np.asarray(batch["latent_steps"])
    if latent_steps_cap >= 0:
        steps = np.minimum(steps, latent_steps_cap)
    over = np.nonzero((steps > slots) & np.asarray(batch.get("example_valid", np.ones(len(steps), bool))))[0]
    if over.size:
        records = np.asarray(batch.get("record_index", np.arange(len(steps))))[over]
        raise ValueError(f"batch rows {over.tolist()} (record_index {records.tolist()}) have latent_steps "
                         f"{steps[over].tolist()}, more than the {slots} latent slots of this phase")
    return {**batch, "step_ids": batch["step_ids"][:, :slots], "step_valid": batch["step_valid"][:, :slots]}


def from_numpy(batch: dict, config: Qwen3VLConfig) -> VitalBatch:
    """Convert a pipeline batch (dict of numpy arrays, see `vital_jax.data.pipeline`) to a VitalBatch."""
    prefix = prefix_inputs(batch["prompt_ids"], batch["prompt_valid"], batch.get("image_grid_thw"),
                           batch.get("pixel_patches"), config)
    b = batch["prompt_ids"].shape[0]
    return VitalBatch(
        prefix=prefix,
        answer_ids=jnp.asarray(batch["answer_ids"], jnp.int32),
        answer_valid=jnp.asarray(batch["answer_valid"], bool),
        latent_steps=jnp.asarray(batch["latent_steps"], jnp.int32),
        step_ids=jnp.asarray(batch["step_ids"], jnp.int32),
        step_valid=jnp.asarray(batch["step_valid"], bool),
        roi_feature=jnp.asarray(batch["roi_feature"], jnp.float32),
        example_valid=jnp.asarray(batch.get("example_valid", np.ones((b,), bool)), bool),
        global_feature=(jnp.asarray(batch["global_feature"], jnp.float32) if "global_feature" in batch else None),
    )


__all__ = ["PrefixInputs", "VitalBatch", "check_token_ids", "from_numpy", "prefix_inputs"]
