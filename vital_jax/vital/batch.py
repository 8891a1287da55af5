"""The device-side VITAL batch and its construction from the numpy batches of `vital_jax.data.pipeline`."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.mrope import get_rope_index
from vital_jax.models.qwen3_vl.vision import vision_inputs
from vital_jax.vital.latent import PrefixInputs


@flax.struct.dataclass
class VitalBatch:
    """One training/evaluation batch of five-tuples (image, question, answer, K-step chain, ROI feature).

    prefix: PrefixInputs (image + question, left-padded to Tp).
    answer_ids, answer_valid: (B, Ta) right-padded answer tokens (ending with <|im_end|>), Ta >= 2.
    latent_steps: (B,) int32 K_b <= K_max.
    step_ids, step_valid: (B, K_max, Ts) reasoning-chain tokens of each step (decoder vocabulary).
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
