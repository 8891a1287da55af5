"""Qwen3-VL multimodal RoPE: (T, H, W) positions, interleaved frequencies, and prompt position ids.

`get_rope_index` runs on the host (numpy) where prompts are built; the model only takes the (3, B, T) array.
After the prompt, every token or input vector gets position `lengths + rope_delta` on all three axes (see
`KVCache.position_offset`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.layers.rope import angles_to_cos_sin, rope_inv_freq


def mrope_axis_of_frequency(head_dim: int, mrope_section: Sequence[int]) -> np.ndarray:
    """Which position axis (0=T, 1=H, 2=W) drives each of the head_dim/2 frequencies.

    Interleaved layout: frequency j follows H when j % 3 == 1 and j < 3 * section[1], W when j % 3 == 2 and
    j < 3 * section[2], and T otherwise.
    """
    axis = np.zeros(head_dim // 2, np.int32)
    for dim, offset in ((1, 1), (2, 2)):
        axis[offset:mrope_section[dim] * 3:3] = dim
    return axis


def mrope_cos_sin(positions_3bt: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int],
                  dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """positions (3, B, T) int -> cos, sin (B, T, head_dim) (angles in float32, cast to `dtype`)."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    axis = mrope_axis_of_frequency(head_dim, mrope_section)
    # angles[b, t, j] = positions[axis[j], b, t] * inv_freq[j]
    pos_btj = jnp.moveaxis(positions_3bt.astype(jnp.float32), 0, -1)[..., axis]
    return angles_to_cos_sin(pos_btj * inv_freq, dtype)


def get_rope_index(input_ids: np.ndarray, token_valid: np.ndarray | None,
                   image_grid_thw: Sequence[Sequence[int]], image_token_id: int,
                   spatial_merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """MRoPE positions of a batch of prompts (host-side numpy).

    input_ids (B, T) int; token_valid (B, T) bool or None (padding, left or right, gets position 0 and does
    not count); image_grid_thw: (t, h, w) patch grid of each image, in order of appearance across the batch.
    Text tokens get `cur, cur+1, ...` on all three axes; an image whose merged grid is (gh, gw), placed at
    `cur`, gets T=cur, H=cur+row, W=cur+col, then `cur += max(gh, gw)`.
    Returns positions (3, B, T) int32 and rope_deltas (B,) int32 = max position + 1 - number of valid tokens.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    valid = np.ones((batch, length), bool) if token_valid is None else np.asarray(token_valid, bool)
    positions = np.zeros((3, batch, length), np.int32)
    deltas = np.zeros((batch,), np.int32)
    grids = iter([tuple(int(v) for v in g) for g in image_grid_thw])
    for b in range(batch):
        cols = np.flatnonzero(valid[b])
        ids = input_ids[b, cols]
        row_pos = []
        cur, i = 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                row_pos.append(np.full((3, 1), cur, np.int64))
                cur, i = cur + 1, i + 1
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(f"row {b}: more image-token runs than image grids ({len(image_grid_thw)})") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            n = t * gh * gw
            run = ids[i:i + n]
            if len(run) != n or np.any(run != image_token_id):
                raise ValueError(f"row {b}: image at token {int(cols[i])} has grid {(t, h, w)} = {n} merged tokens "
                                 f"but the prompt holds a different number of image tokens")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            row_pos.append(np.stack([tt.ravel() + cur, hh.ravel() + cur, ww.ravel() + cur]))
            cur += max(gh, gw)
            i += n
        if row_pos:
            pos = np.concatenate(row_pos, axis=1)
            positions[:, b, cols] = pos
            deltas[b] = pos.max() + 1 - len(cols)
    if next(grids, None) is not None:
        raise ValueError(f"{len(image_grid_thw)} image grids given but fewer image-token runs in the prompts")
    return positions, deltas
