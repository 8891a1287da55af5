"""Qwen3-VL vision tower: patch embed, resampled learned positions, 2-D rotary ViT blocks, 2x2 merger, deepstack.

Several images (or video frames) are packed into one sequence of N patches, in the processor's order: per image,
frames in turn, and within a frame 2x2 merge blocks in raster order of blocks, each block's four patches in
raster order. Attention is block-diagonal: a patch sees only the patches of its own frame (as HF's cu_seqlens).

Everything that depends on the image grids (rotary positions, position-embedding interpolation taps, segment ids)
is computed on the host in numpy by `vision_inputs`, so the jitted model only sees arrays. With `pad_to`, every
call has the same shapes whatever the image sizes: padding patches form their own segment (they attend only to
each other, never to real patches and vice versa) and their merged outputs are to be ignored
(`VisionInputs.merged_valid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.layers.attention import attend, default_score_block_mib, query_chunk_for_score_budget
from vital_jax.layers.embedding import Embed
from vital_jax.layers.linear import Linear
from vital_jax.layers.norms import LayerNorm
from vital_jax.layers.rope import angles_to_cos_sin, apply_rope, rope_inv_freq
from vital_jax.models.qwen3_vl.vision_config import Qwen3VLVisionConfig
from vital_jax.sharding import constrain

GridTHW = Sequence[tuple[int, int, int]]
# Logical axes of the packed patch stream (N, D), pinned at every block boundary under a mesh.
PACKED_AXES = ("packed", "act_embed")


@flax.struct.dataclass
class VisionInputs:
    """Per-patch, grid-derived arrays for N (possibly padded) patches. A pytree: pass it through `jax.jit`.

    segment_ids:   (N,) int32    0 for padding, k >= 1 for the k-th frame of the packed images (attention groups).
    positions:     (N, 2) int32  (row, col) of each patch in its frame's patch grid, for the 2-D rotary.
    interp_index:  (N, 4) int32  rows of the learned position table that bilinear resampling reads...
    interp_weight: (N, 4) f32    ...and their weights (zero for padding).
    num_slices:    static int S  the patches form S equal slices that no attention segment crosses (each batch
                   shard's images packed into its own slice, `distributed.global_vital_batch`): attention is then
                   computed per slice, (S, N/S, N/S) scores instead of (N, N). 1 = one packing.
    frame_patches: static int P  when every frame has P patches and the padding is a whole number of P-patch
                   blocks (so no frame crosses a multiple of P): attention is computed per frame, (N/P, P, P)
                   scores with no mask, as HF's cu_seqlens splits it. 0 = frames of several sizes: per slice with
                   the block-diagonal segment mask. Padding blocks then attend within their own block instead
                   of to all padding; their outputs are ignored either way (`merged_valid`).
    """

    segment_ids: jax.Array
    positions: jax.Array
    interp_index: jax.Array
    interp_weight: jax.Array
    num_slices: int = flax.struct.field(pytree_node=False, default=1)
    frame_patches: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def num_patches(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def valid(self):
        """(N,) bool: real (non-padding) patches."""
        return self.segment_ids > 0

    def merged_valid(self, merge_unit: int):
        """(N / merge_unit,) bool: real merged tokens (a merge block is never split by padding)."""
        return self.segment_ids[::merge_unit] > 0


def _check_grid(grid_thw: GridTHW, merge: int) -> list[tuple[int, int, int]]:
    grid_array = np.asarray(grid_thw)
    if grid_array.ndim != 2 or grid_array.shape[1] != 3:
        raise ValueError(f"grid_thw must be a sequence of (t, h, w) triples; got shape {grid_array.shape}")
    grid = [tuple(int(v) for v in g) for g in grid_array]
    if not grid:
        raise ValueError("grid_thw is empty: need at least one (t, h, w) image grid")
    for i, (t, h, w) in enumerate(grid):
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)}: t, h, w must be positive and h, w multiples of the "
                             f"spatial merge size {merge}")
    return grid


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True) taps into a `side`-long axis for target positions `index` of `size`.

    Float32 arithmetic in the same order as torch, so the weights are bit-identical to transformers'.
    """
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)


def vision_inputs(grid_thw: GridTHW, config: Qwen3VLVisionConfig, pad_to: int | None = None) -> VisionInputs:
    """Host-side arrays for packed images with patch grids `grid_thw` [(t, h, w), ...] (numpy, not traced).

    pad_to: total patch count to pad to (a multiple of `config.merge_unit`, >= sum of t*h*w), so that jitted
    calls see one shape for all image sizes. Without it N is exactly sum(t*h*w).
    """
    merge, side = config.spatial_merge_size, config.num_grid_per_side
    grid = _check_grid(grid_thw, merge)
    segments, positions, taps, weights = [], [], [], []
    segment = 0
    for t, h, w in grid:
        # Patch k of a frame in merge-block order: block (k // m^2) in raster order over (h/m, w/m) blocks,
        # then (k % m^2) in raster order inside the m x m block.
        k = np.arange(h * w)
        block, inner = k // (merge * merge), k % (merge * merge)
        row = (block // (w // merge)) * merge + inner // merge
        col = (block % (w // merge)) * merge + inner % merge
        h_taps, h_weights = _axis_taps(row, h, side)
        w_taps, w_weights = _axis_taps(col, w, side)
        frame_taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        frame_weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            segment += 1
            segments.append(np.full(h * w, segment))
            positions.append(np.stack([row, col], axis=-1))
            taps.append(frame_taps)
            weights.append(frame_weights)
    total = sum(len(s) for s in segments)
    if pad_to is not None:
        if pad_to < total or pad_to % config.merge_unit:
            raise ValueError(f"pad_to={pad_to} must be >= the {total} patches of grid_thw={grid} and a multiple "
                             f"of {config.merge_unit} (patches per merged token)")
        pad = pad_to - total
        segments.append(np.zeros(pad))
        positions.append(np.zeros((pad, 2)))
        taps.append(np.zeros((pad, 4)))
        weights.append(np.zeros((pad, 4)))
    return VisionInputs(
        frame_patches=uniform_frame_patches(grid, pad_to) if config.frame_attention else 0,
        segment_ids=np.concatenate(segments).astype(np.int32),
        positions=np.concatenate(positions).astype(np.int32),
        interp_index=np.concatenate(taps).astype(np.int32),
        interp_weight=np.concatenate(weights).astype(np.float32),
    )


def uniform_frame_patches(grid_thw: GridTHW, pad_to: int | None = None) -> int:
    """P when every frame of `grid_thw` has P patches and the packing (padded to `pad_to`) is a whole number of
    P-patch blocks, else 0: `VisionInputs.frame_patches`."""
    sizes = {int(h) * int(w) for _, h, w in grid_thw}
    if len(sizes) != 1:
        return 0
    p = sizes.pop()
    return p if pad_to is None or pad_to % p == 0 else 0


def num_patches(grid_thw: GridTHW) -> int:
    """Patches of packed images: sum of t*h*w (the rows of `pixel_patches`)."""
    return int(sum(t * h * w for t, h, w in grid_thw))


class VisionAttention(nn.Module):
    """Non-causal MHA with fused qkv (bias), 2-D rotary applied in float32, masked by segment id.

    x (N, D), cos/sin (N, head_dim) float32, mask (S, N/S, N/S) bool (attention within each of S slices) or None
    (each slice is one frame: every patch sees every other; no mask array) and the segment ids it was made of,
    (S, N/S) int (mask = equal ids; "pallas_flash" reads the ids, the others the mask) -> (N, D). Each slice is one
    row of `attend`'s batch, so `attention_impl` switches the vision tower like the
    text decoder.
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    query_chunk: int = 0
    score_block_mib: float | None = 0.0   # None: `attention.default_score_block_mib()` (by backend)

    @nn.compact
    def __call__(self, x_nd, cos_nh, sin_nh, mask_snn, segments_sn):
        n, d = x_nd.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        qkv = Linear(3 * d, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x_nd)
        # HF's fused rows are q | k | v, each split into heads.
        q_nkh, k_nkh, v_nkh = jnp.moveaxis(qkv.reshape(n, 3, heads, head_dim), 1, 0)
        q_nkh = apply_rope(q_nkh[None].astype(jnp.float32), cos_nh[None], sin_nh[None])[0].astype(self.dtype)
        k_nkh = apply_rope(k_nkh[None].astype(jnp.float32), cos_nh[None], sin_nh[None])[0].astype(self.dtype)
        slices, per_slice = segments_sn.shape
        q, k, v = (t.reshape(slices, per_slice, heads, head_dim) for t in (q_nkh, k_nkh, v_nkh))
        query_chunk = 0
        if self.attention_impl == "xla":
            budget_mib = default_score_block_mib() if self.score_block_mib is None else self.score_block_mib
            query_chunk = self.query_chunk or query_chunk_for_score_budget(
                slices, heads, per_slice, per_slice, budget_mib * 2 ** 20)
        out_nd = attend(q, k, v, mask_snn, self.attention_impl, self.dtype, segment_ids_bt=segments_sn,
                        query_chunk=query_chunk).reshape(n, d)
        return Linear(d, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out_nd)


class VisionMLP(nn.Module):
    """linear_fc2(gelu(linear_fc1(x))) with biases. (..., D) -> (..., D)."""

    intermediate_size: int
    approximate_gelu: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Linear(self.intermediate_size, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="linear_fc1")(x)
        h = jax.nn.gelu(h, approximate=self.approximate_gelu)
        return Linear(x.shape[-1], use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="linear_fc2")(h)


class VisionBlock(nn.Module):
    """Pre-LayerNorm transformer block. x (N, D) -> (N, D)."""

    config: Qwen3VLVisionConfig

    @nn.compact
    def __call__(self, x_nd, cos_nh, sin_nh, mask_snn, segments_sn):
        cfg = self.config
        norm = dict(eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = LayerNorm(**norm, name="norm1")(x_nd)
        x_nd = x_nd + VisionAttention(cfg.num_heads, cfg.dtype, cfg.param_dtype, cfg.attention_impl,
                                        cfg.attention_query_chunk, cfg.attention_score_block_mib,
                                        name="attn")(h, cos_nh, sin_nh, mask_snn, segments_sn)
        h = LayerNorm(**norm, name="norm2")(x_nd)
        return x_nd + VisionMLP(cfg.intermediate_size, cfg.gelu_approximate, cfg.dtype, cfg.param_dtype,
                                name="mlp")(h)


class PatchMerger(nn.Module):
    """Concatenate each merge block's patches and project: (N, D) -> (N / m^2, out_hidden_size).

    postshuffle_norm=False (final merger): LayerNorm(D) per patch, then concatenate.
    postshuffle_norm=True (deepstack mergers): concatenate, then LayerNorm(m^2 * D).
    The activation between fc1 and fc2 is the exact (erf) GELU, unlike the blocks' tanh GELU.
    """

    config: Qwen3VLVisionConfig
    postshuffle_norm: bool

    @nn.compact
    def __call__(self, x_nd):
        cfg = self.config
        merged = cfg.merge_unit * x_nd.shape[-1]
        norm = LayerNorm(eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")
        if self.postshuffle_norm:
            x_mc = norm(x_nd.reshape(-1, merged))
        else:
            x_mc = norm(x_nd).reshape(-1, merged)
        h = Linear(merged, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="linear_fc1")(x_mc)
        h = jax.nn.gelu(h, approximate=False)
        return Linear(cfg.out_hidden_size, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      name="linear_fc2")(h)


class Qwen3VLVisionModel(nn.Module):
    """The Qwen3-VL vision tower (HF `model.visual`).

    __call__(pixel_patches, inputs):
      pixel_patches: (N, C*T*ps*ps) float, the processor's flattened patches (merge-block order), N patches of
        all images packed (padding rows, if any, at the end; their values are irrelevant).
      inputs: a `VisionInputs` from `vision_inputs(grid_thw, config, pad_to)`, or the grid itself as a static
        sequence of (t, h, w) (then the arrays are built here, once per distinct grid under jit).
    Returns (image_embeds (N/4, out_hidden_size), deepstack_features: list of (N/4, out_hidden_size), one per
    `deepstack_visual_indexes` entry, in block order), in `config.dtype`. Rows of padding merge blocks are garbage;
    select real ones with `inputs.merged_valid(config.merge_unit)`.
    """

    config: Qwen3VLVisionConfig

    @nn.compact
    def __call__(self, pixel_patches, inputs: VisionInputs | GridTHW):
        cfg = self.config
        if not isinstance(inputs, VisionInputs):
            inputs = vision_inputs(inputs, cfg)
        n = inputs.num_patches
        if pixel_patches.shape != (n, cfg.patch_dim):
            raise ValueError(f"pixel_patches has shape {pixel_patches.shape}; expected ({n}, {cfg.patch_dim}) "
                             f"= (patches of the grids, in_channels*temporal_patch_size*patch_size^2)")

        # The Conv3d with kernel == stride over one patch is a dense layer; kept in float32 (bf16 NaN reports).
        x_nd = Linear(cfg.hidden_size, use_bias=True, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                      name="patch_embed")(pixel_patches.astype(jnp.float32))
        table = Embed(cfg.num_position_embeddings, cfg.hidden_size, dtype=jnp.float32,
                      param_dtype=cfg.param_dtype, name="pos_embed")
        x_nd = x_nd + jnp.einsum("ntd,nt->nd", table(inputs.interp_index), inputs.interp_weight)
        x_nd = x_nd.astype(cfg.dtype)

        # 2-D rotary: the first head_dim/4 angles rotate with the row, the next head_dim/4 with the column.
        inv_freq = rope_inv_freq(cfg.head_dim // 2, cfg.rope_theta)
        angles_n2f = inputs.positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)
        cos_nh, sin_nh = angles_to_cos_sin(angles_n2f.reshape(n, -1), jnp.float32)
        if n % inputs.num_slices:
            raise ValueError(f"{n} patches do not split into num_slices={inputs.num_slices} equal slices")
        if inputs.frame_patches:
            p = inputs.frame_patches
            if n % p or (n // inputs.num_slices) % p:
                raise ValueError(f"{n} patches in {inputs.num_slices} slice(s) are not whole frames of "
                                 f"frame_patches={p}")
            # One group per frame: no mask (XLA would fold an all-True one away; cuDNN would still be given it as
            # a bias and compute that bias's gradient).
            mask_snn = None
            segments_sn = jnp.zeros((n // p, p), jnp.int32)
        else:
            segments_sn = jnp.asarray(inputs.segment_ids).reshape(inputs.num_slices, -1)
            mask_snn = segments_sn[:, :, None] == segments_sn[:, None, :]

        block_cls = nn.remat(VisionBlock) if cfg.remat else VisionBlock
        deepstack = []
        for i in range(cfg.depth):
            x_nd = block_cls(cfg, name=f"blocks_{i}")(x_nd, cos_nh, sin_nh, mask_snn, segments_sn)
            x_nd = constrain(x_nd, PACKED_AXES)
            if i in cfg.deepstack_visual_indexes:
                # Merger k belongs to block deepstack_visual_indexes[k]; features come out in block order (as HF).
                k = cfg.deepstack_visual_indexes.index(i)
                deepstack.append(PatchMerger(cfg, postshuffle_norm=True, name=f"deepstack_merger_list_{k}")(x_nd))
        image_embeds = PatchMerger(cfg, postshuffle_norm=False, name="merger")(x_nd)
        return image_embeds, deepstack
