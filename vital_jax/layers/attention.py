"""Grouped-query self-attention with per-head qk-norm, RoPE and an optional explicit KV cache."""

from __future__ import annotations

import contextlib
import contextvars
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vital_jax.layers.kv_cache import KVCache
from vital_jax.layers.linear import Linear, LoraConfig, adapter_dropout_keeps
from vital_jax.layers.norms import RMSNorm
from vital_jax.layers.rope import apply_rope


def make_attention_mask(query_slots_t: jax.Array, key_valid_bs: jax.Array) -> jax.Array:
    """Causal + padding mask (B, T, S) bool: query at slot q may see key slot s iff s <= q and s is valid.

    query_slots_t: (T,) int absolute slot of each query (its cache index, or arange(T) without a cache).
    key_valid_bs:  (B, S) bool validity of each key slot (padding and masked latent steps are False).
    """
    key_slots = jnp.arange(key_valid_bs.shape[1])
    causal_ts = key_slots[None, :] <= query_slots_t[:, None]
    return causal_ts[None, :, :] & key_valid_bs[:, None, :]


# `attention_impl` values: how the scores, softmax and weighted sum are computed (the projections, qk-norm, RoPE
# and the cache are the same for all).
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "pallas_flash")

# Pallas' TPU flash-attention kernel tiles queries in blocks of up to 128 rows (a multiple of 8, TPU sublanes) and
# keys in blocks of 128 (TPU lanes); shorter or ragged sequences are padded to whole blocks.
FLASH_BLOCK = 128
_FLASH_INTERPRET = contextvars.ContextVar("pallas_flash_interpret", default=False)


@contextlib.contextmanager
def pallas_interpret():
    """Within the block, "pallas_flash" attention traced on a non-TPU backend runs in Pallas' TPU interpret mode
    (`jax.experimental.pallas.tpu.force_tpu_interpret_mode`): the kernel's own program, simulated on the CPU, slowly.
    For parity tests and debugging; outside it, "pallas_flash" needs a TPU."""
    from jax.experimental.pallas import tpu as pltpu

    token = _FLASH_INTERPRET.set(True)
    try:
        with pltpu.force_tpu_interpret_mode():
            yield
    finally:
        _FLASH_INTERPRET.reset(token)


def check_backend(impl: str) -> None:
    """ValueError if `impl` cannot run on JAX's default backend here: "pallas_flash" is a TPU kernel (outside
    `pallas_interpret()`), "cudnn" an NVIDIA GPU one. The commands call it when they build a model; inside `attend`
    it cannot be checked, because building parameters traces the model abstractly (no kernel runs) on any host.
    Elsewhere the kernel's own error comes when the program is compiled ("Only interpret mode is supported on CPU
    backend"; cuDNN's "... not supported")."""
    backend = jax.default_backend()
    if impl == "pallas_flash" and backend != "tpu" and not _FLASH_INTERPRET.get():
        raise ValueError(
            f"attention_impl='pallas_flash' is JAX's Pallas TPU flash-attention kernel and needs a TPU (JAX's "
            f"backend is {backend!r}); use 'xla' or 'dot_product' here, or run under "
            f"vital_jax.layers.attention.pallas_interpret() to simulate the kernel on the CPU")
    if impl == "cudnn" and backend != "gpu":
        raise ValueError(f"attention_impl='cudnn' is cuDNN's fused flash attention and needs an NVIDIA GPU (JAX's "
                         f"backend is {backend!r}); use 'xla' or 'dot_product' here")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pallas_flash(q_btnh, k_bskh, v_bskh, mask_bts, dtype, segment_ids_bt=None):
    """JAX's Pallas TPU flash attention (`jax.experimental.pallas.ops.tpu.flash_attention`, forward and backward
    kernels): the (T, S) probabilities are never materialised, only tiles of them in VMEM. With `segment_ids_bt`
    (self-attention within groups: the vision tower's frames) the kernel's own segment ids mask and no (T, S)
    array exists at all; otherwise the boolean mask enters as an additive bias (B, N, T, S) (causal + padding +
    latent-step validity with cache offsets, which segment ids cannot express).
    GQA: the kernel wants as many kv heads as query heads, so kv head j is repeated for its N / K query heads."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    b, t, n, h = q_btnh.shape
    s, kh = k_bskh.shape[1], k_bskh.shape[2]
    block_q = min(FLASH_BLOCK, _round_up(t, 8))
    t_pad, s_pad = _round_up(t, block_q), _round_up(s, FLASH_BLOCK)
    q_bnth = jnp.pad(jnp.transpose(q_btnh, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
    k_bnsh, v_bnsh = (jnp.pad(jnp.repeat(jnp.transpose(x, (0, 2, 1, 3)), n // kh, axis=1).astype(q_btnh.dtype),
                              ((0, 0), (0, 0), (0, s_pad - s), (0, 0))) for x in (k_bskh, v_bskh))
    if segment_ids_bt is not None:
        # Padding positions form their own segment (-1; real ids are >= 0): padded rows see only padded keys.
        bias_bnts = None
        segments = tpu_flash.SegmentIds(
            q=jnp.pad(segment_ids_bt.astype(jnp.int32), ((0, 0), (0, t_pad - t)), constant_values=-1),
            kv=jnp.pad(segment_ids_bt.astype(jnp.int32), ((0, 0), (0, s_pad - s)), constant_values=-1))
    else:
        # Padded keys are masked; padded query rows see every real key (any finite row) and are cut off below.
        visible = jnp.pad(mask_bts, ((0, 0), (0, t_pad - t), (0, s_pad - s)))
        visible = visible.at[:, t:, :s].set(True)
        # The kernel's own mask value: finite, so a row with no visible key gives a (meaningless) finite output.
        bias_bnts = jnp.broadcast_to(jnp.where(visible, 0.0, -0.7 * float(jnp.finfo(jnp.float32).max))[:, None],
                                     (b, n, t_pad, s_pad)).astype(jnp.float32)
        segments = None
    blocks = tpu_flash.BlockSizes(
        block_q=block_q, block_k_major=FLASH_BLOCK, block_k=FLASH_BLOCK, block_b=1,
        block_q_major_dkv=block_q, block_k_major_dkv=FLASH_BLOCK, block_k_dkv=FLASH_BLOCK, block_q_dkv=block_q,
        block_k_major_dq=FLASH_BLOCK, block_k_dq=FLASH_BLOCK, block_q_dq=block_q)
    out_bnth = tpu_flash.flash_attention(q_bnth, k_bnsh, v_bnsh, ab=bias_bnts, segment_ids=segments,
                                         sm_scale=h ** -0.5, block_sizes=blocks)
    return jnp.transpose(out_bnth[:, :, :t], (0, 2, 1, 3)).reshape(b, t, n * h).astype(dtype)


def _cudnn(q_btnh, k_bskh, v_bskh, mask_bts):
    """cuDNN's fused flash attention, `jax.nn.dot_product_attention(implementation="cudnn")`: the (T, S) scores are
    never materialised, forward or backward. bfloat16 / float16 only (cuDNN has no float32 flash kernel), head dim
    <= 256 and a multiple of 8 (both Qwen3-VL towers: 128 and 72). The (B, T, S) mask enters as an additive
    (B, 1, T, S) bias (JAX converts it, and the backward pass then also computes that bias's gradient); cuDNN's
    training kernels with a bias take only even T and S, so an odd length gets one more query row (dropped) and one
    more key (masked). mask None (every key visible: the vision tower's frames) calls the kernel without a bias,
    at any length."""
    if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 activations (the model config's dtype); "
                         f"got {q_btnh.dtype}: use 'xla' or 'dot_product' for float32")
    b, t, n, h = q_btnh.shape
    k_bskh, v_bskh = k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype)
    if mask_bts is None:
        out = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, implementation="cudnn")
        return out.reshape(b, t, n * h)
    pad_t, pad_s = t % 2, k_bskh.shape[1] % 2
    if pad_t or pad_s:
        q_btnh = jnp.pad(q_btnh, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
        k_bskh, v_bskh = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k_bskh, v_bskh))
        mask_bts = jnp.pad(mask_bts, ((0, 0), (0, pad_t), (0, pad_s)))   # False: the extra key is never visible
    out = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None, :, :], implementation="cudnn")
    return out[:, :t].reshape(b, t, n * h)


def attend(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array | None, impl: str = "xla",
           dtype=jnp.float32, segment_ids_bt: jax.Array | None = None, query_chunk: int = 0) -> jax.Array:
    """softmax(q k^T / sqrt(h) + mask) v with grouped-query heads -> (B, T, N * H).

    q (B, T, N, H); k, v (B, S, K, H) with N a multiple of K (query head i reads kv head i // (N // K));
    mask (B, T, S) bool, or None when every query sees every key (no mask array at all: "cudnn" then runs its
    kernel without a bias, the others are unchanged, an all-True mask being folded away by XLA). segment_ids (B, T)
    int, optional, for self-attention within groups (T = S, mask =
    equal ids): "pallas_flash" then uses the kernel's segment ids instead of the mask. query_chunk > 0 ("xla"
    only): queries in blocks of that many rows, each against all keys (`_xla_attend_in_query_blocks`).
    impl "xla": this module's own einsums, float32 scores and softmax whatever `dtype` (the parity reference);
    "dot_product": `jax.nn.dot_product_attention` with its default implementation, which is JAX's own XLA
    formulation on every backend (jax 0.10: "defaults to None, which currently falls back to xla"; no fused kernel)
    and computes the softmax in the inputs' dtype; "cudnn": the same function with implementation="cudnn", cuDNN's
    fused flash attention on NVIDIA GPUs (`_cudnn`; bf16 / fp16); "pallas_flash": JAX's Pallas flash-attention
    kernel for TPUs (`_pallas_flash`; on other backends only under `pallas_interpret()`, see `check_backend`). Under
    both kernels one query row (T = 1: decode and latent steps) takes the "xla" one-query path. A query row with no
    visible key (left padding) gives a meaningless output under any of them; callers mask those rows.
    """
    b, t, n, h = q_btnh.shape
    kh = k_bskh.shape[2]
    if impl == "dot_product":
        out = jax.nn.dot_product_attention(q_btnh, k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype),
                                           mask=None if mask_bts is None else mask_bts[:, None, :, :])
        return out.reshape(b, t, n * h)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "cudnn" and t > 1:
        return _cudnn(q_btnh, k_bskh, v_bskh, mask_bts)
    if mask_bts is None:
        mask_bts = jnp.ones((b, t, k_bskh.shape[1]), bool)
    if t == 1 and impl in ("cudnn", "pallas_flash"):
        # One query (a decode or latent step) is a matrix-vector product bound by reading the cache. A flash kernel
        # (tiles of query rows) does not speed it up, and its inputs would copy the cache at every step and layer
        # (pallas_flash: kv heads repeated per query head, transposed and padded to 128 keys, and a float32 bias;
        # cudnn: the bias). The "xla" one-query path reads the cache as it lies.
        return _xla_attend_one_query(q_btnh, k_bskh, v_bskh, mask_bts, dtype)
    if impl == "pallas_flash":
        return _pallas_flash(q_btnh, k_bskh, v_bskh, mask_bts, dtype, segment_ids_bt)
    if 0 < query_chunk < t:
        return _xla_attend_in_query_blocks(q_btnh, k_bskh, v_bskh, mask_bts, dtype, query_chunk)
    if t == 1:
        return _xla_attend_one_query(q_btnh, k_bskh, v_bskh, mask_bts, dtype)
    # Head-major and 4-D: q head i uses kv head i // g, so the g query heads of kv head j become g * T rows of one
    # (B, K, g T, H) x (B, K, H, S) batched matmul, and the mask is tiled to those rows. Why this layout: XLA:CPU
    # ran the same math written as 5-D einsums over the (B, T, N, H) inputs (scores "bkgts") with layout copies of
    # the whole score array and a slow masked select over its 5-D view; transposing the small q, k, v instead
    # measured 1.6x faster for the vision tower's (2, 8, 784, 784) attention (52 -> 33 ms forward, 181 -> 106 ms
    # with the backward) and 1.2-1.7x for text prefill, decode unchanged (benchmarks/README.md).
    g = n // kh
    q_bkrh = jnp.transpose(q_btnh.reshape(b, t, kh, g, h), (0, 2, 3, 1, 4)).reshape(b, kh, g * t, h)
    k_bksh, v_bksh = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k_bskh, v_bskh))
    # 1/sqrt(H) scales q, not the scores: XLA:CPU's fused attention (one YNN fusion of both dots and the softmax,
    # in the vision tower) otherwise reads the scale as a materialised (B, K, gT, S) array, built at 13 ms a step.
    q_bkrh = q_bkrh * jnp.asarray(h ** -0.5, q_bkrh.dtype)
    scores = jnp.matmul(q_bkrh, jnp.swapaxes(k_bksh, -1, -2)).astype(jnp.float32)
    mask_brs = jnp.tile(mask_bts, (1, g, 1)) if g > 1 else mask_bts
    scores = jnp.where(mask_brs[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out_bkgth = jnp.matmul(probs, v_bksh).reshape(b, kh, g, t, h)
    return jnp.transpose(out_bkgth, (0, 3, 1, 2, 4)).reshape(b, t, n * h)


def _xla_attend_one_query(q_b1nh, k_bskh, v_bskh, mask_b1s, dtype):
    """The "xla" attention of one query position (a decode or latent step) over a cache, with no copy of it.

    The general path transposes k and v to (B, K, S, H), and XLA:CPU materialises that copy of every layer's cache
    at every step (~1 ms per answer token at the benchmark's sizes, an eighth of the step). Here the cache is read
    as it lies, a (B, S, K H) matrix, and multiplied by a block-diagonal (K H, K g) query matrix whose block j holds
    the g query heads of kv head j: K times the score FLOPs (a decode step has few), the off-diagonal products
    exactly zero, so the scores are the same numbers. Likewise the output: probs (B, K g, S) x values (B, S, K H),
    of which the diagonal (K g, H) blocks are kept."""
    b, _, n, h = q_b1nh.shape
    s, kh = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kh
    eye = jnp.eye(kh, dtype=q_b1nh.dtype)
    q_bkgh = q_b1nh.reshape(b, kh, g, h) * jnp.asarray(h ** -0.5, q_b1nh.dtype)
    q_blockdiag = jnp.einsum("bkgh,kj->bkhjg", q_bkgh, eye).reshape(b, kh * h, kh * g)
    scores = jnp.matmul(k_bskh.reshape(b, s, kh * h).astype(q_b1nh.dtype), q_blockdiag).astype(jnp.float32)
    scores = jnp.where(mask_b1s[:, 0, :, None], scores, jnp.finfo(jnp.float32).min)   # (B, S, K g)
    probs = jax.nn.softmax(scores, axis=1).astype(dtype)
    out = jnp.matmul(jnp.swapaxes(probs, 1, 2), v_bskh.reshape(b, s, kh * h).astype(dtype))   # (B, K g, K H)
    out_bkgh = jnp.einsum("bkgjh,kj->bkgh", out.reshape(b, kh, g, kh, h), eye.astype(dtype))
    return out_bkgh.reshape(b, 1, n * h)


def attend_shared_prefix(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array,
                         prefix_k_pskh: jax.Array, prefix_v_pskh: jax.Array, prefix_valid_ps: jax.Array,
                         impl: str = "xla", dtype=jnp.float32) -> jax.Array:
    """`attend` over [a prompt shared by G rows; each row's own keys], one softmax over both -> (B, T, N * H).

    q (B, T, N, H) with B = P * G, row b continuing prompt b // G; k, v (B, S, K, H) and mask (B, T, S): the rows'
    own slots (as `attend`); prefix_k, prefix_v (P, Sp, K, H) and prefix_valid (P, Sp) bool: the prompts, visible
    to every query of their G rows (they precede all own slots). The same numbers as `attend` over each row's copy
    of its prompt followed by its own slots (up to float32 summation order). "xla" reads each prompt's keys and
    values once for its G rows (`KVCache.share_prefix`): the G query rows of a prompt are stacked into one matrix
    against them. The other impls take their kernel's inputs as they are, so for several queries per row (the
    teacher-forced scorer, where the attention's FLOPs dwarf the copy) they get the prompt repeated per row, made
    per layer and dropped (the cache still holds it once). One query per row (a decode step) takes the "xla" path
    whatever `impl`: it is a matrix-vector product bound by reading the cache, which a fused kernel does not speed
    up, while repeating the prompt for it would write and read G copies of it at every step.
    """
    b, t, n, h = q_btnh.shape
    p, sp, kh = prefix_k_pskh.shape[:3]
    if b % p:
        raise ValueError(f"attend_shared_prefix: {b} query rows do not divide into {p} prompts")
    group = b // p
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "xla" and t > 1:
        k_full = jnp.concatenate([jnp.repeat(prefix_k_pskh, group, axis=0).astype(k_bskh.dtype), k_bskh], axis=1)
        v_full = jnp.concatenate([jnp.repeat(prefix_v_pskh, group, axis=0).astype(v_bskh.dtype), v_bskh], axis=1)
        prefix_mask = jnp.broadcast_to(jnp.repeat(prefix_valid_ps, group, axis=0)[:, None, :], (b, t, sp))
        return attend(q_btnh, k_full, v_full, jnp.concatenate([prefix_mask, mask_bts], axis=2), impl, dtype)
    if t == 1:
        return _xla_attend_one_query_shared_prefix(q_btnh, k_bskh, v_bskh, mask_bts, prefix_k_pskh, prefix_v_pskh,
                                                   prefix_valid_ps, dtype)
    s, g = k_bskh.shape[1], n // kh
    neg = jnp.finfo(jnp.float32).min
    # Layout (P, K, G, g T, ...): a prompt's G rows x g query heads of kv head j are one block of rows, so the
    # prefix products are one (G g T, H) x (H, Sp) matmul per (prompt, kv head).
    q = q_btnh * jnp.asarray(h ** -0.5, q_btnh.dtype)
    q_pkwrh = jnp.transpose(q.reshape(p, group, t, kh, g, h), (0, 3, 1, 4, 2, 5)).reshape(p, kh, group, g * t, h)
    pk_pkhs = jnp.transpose(prefix_k_pskh, (0, 2, 3, 1)).astype(q.dtype)
    pv_pksh = jnp.transpose(prefix_v_pskh, (0, 2, 1, 3)).astype(dtype)
    k_pkwhs = jnp.transpose(k_bskh.reshape(p, group, s, kh, h), (0, 3, 1, 4, 2)).astype(q.dtype)
    v_pkwsh = jnp.transpose(v_bskh.reshape(p, group, s, kh, h), (0, 3, 1, 2, 4)).astype(dtype)
    scores_prefix = jnp.matmul(q_pkwrh.reshape(p, kh, group * g * t, h), pk_pkhs).astype(jnp.float32)
    scores_prefix = jnp.where(prefix_valid_ps[:, None, None, :], scores_prefix, neg).reshape(p, kh, group, g * t, sp)
    own_mask = jnp.broadcast_to(mask_bts.reshape(p, 1, group, 1, t, s), (p, 1, group, g, t, s))
    scores_own = jnp.where(own_mask.reshape(p, 1, group, g * t, s),
                           jnp.matmul(q_pkwrh, k_pkwhs).astype(jnp.float32), neg)
    probs_prefix, probs_own = _softmax_over_two(scores_prefix, scores_own, axis=-1)
    out = (jnp.matmul(probs_prefix.astype(dtype).reshape(p, kh, group * g * t, sp), pv_pksh)
           .reshape(p, kh, group, g * t, h) + jnp.matmul(probs_own.astype(dtype), v_pkwsh))
    out = jnp.transpose(out.reshape(p, kh, group, g, t, h), (0, 2, 4, 1, 3, 5))   # (P, G, T, K, g, H)
    return out.reshape(b, t, n * h)


def _softmax_over_two(scores_a: jax.Array, scores_b: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """softmax over the concatenation of two score arrays along `axis`, returned as its two parts (float32), without
    building the concatenation."""
    top = jax.lax.stop_gradient(jnp.maximum(scores_a.max(axis, keepdims=True), scores_b.max(axis, keepdims=True)))
    exp_a, exp_b = jnp.exp(scores_a - top), jnp.exp(scores_b - top)
    total = exp_a.sum(axis, keepdims=True) + exp_b.sum(axis, keepdims=True)
    return exp_a / total, exp_b / total


def _xla_attend_one_query_shared_prefix(q_b1nh, k_bskh, v_bskh, mask_b1s, prefix_k_pskh, prefix_v_pskh,
                                        prefix_valid_ps, dtype):
    """`attend_shared_prefix` for one query per row (a decode step), reading both caches as they lie, as
    `_xla_attend_one_query` does: the prompt's (Sp, K H) matrix is multiplied by the block-diagonal query matrices
    of its G rows side by side, (K H, G K g), so each prompt is read once per step for all its rows."""
    b, _, n, h = q_b1nh.shape
    p, sp, kh = prefix_k_pskh.shape[:3]
    s, group, g = k_bskh.shape[1], b // p, n // kh
    neg = jnp.finfo(jnp.float32).min
    eye = jnp.eye(kh, dtype=q_b1nh.dtype)
    q_bkgh = q_b1nh.reshape(b, kh, g, h) * jnp.asarray(h ** -0.5, q_b1nh.dtype)
    q_own = jnp.einsum("bkgh,kj->bjhkg", q_bkgh, eye).reshape(b, kh * h, kh * g)
    q_prefix = jnp.einsum("pwkgh,kj->pjhwkg", q_bkgh.reshape(p, group, kh, g, h), eye).reshape(
        p, kh * h, group * kh * g)
    scores_prefix = jnp.matmul(prefix_k_pskh.reshape(p, sp, kh * h).astype(q_b1nh.dtype), q_prefix)
    scores_prefix = jnp.where(prefix_valid_ps[:, :, None], scores_prefix.astype(jnp.float32), neg)
    scores_own = jnp.matmul(k_bskh.reshape(b, s, kh * h).astype(q_b1nh.dtype), q_own).astype(jnp.float32)
    scores_own = jnp.where(mask_b1s[:, 0, :, None], scores_own, neg)                         # (B, S, K g)
    # Both as (P, G, slots, K g) for the joint softmax over the slot axis.
    scores_prefix = jnp.transpose(scores_prefix.reshape(p, sp, group, kh * g), (0, 2, 1, 3))
    probs_prefix, probs_own = _softmax_over_two(scores_prefix, scores_own.reshape(p, group, s, kh * g), axis=2)
    probs_prefix = jnp.transpose(probs_prefix, (0, 2, 1, 3)).reshape(p, sp, group * kh * g).astype(dtype)
    out_prefix = jnp.matmul(jnp.swapaxes(probs_prefix, 1, 2), prefix_v_pskh.reshape(p, sp, kh * h).astype(dtype))
    out_own = jnp.matmul(jnp.swapaxes(probs_own.reshape(b, s, kh * g).astype(dtype), 1, 2),
                         v_bskh.reshape(b, s, kh * h).astype(dtype))                        # (B, K g, K H)
    out = out_prefix.reshape(b, kh * g, kh * h) + out_own
    out_bkgh = jnp.einsum("bkgjh,kj->bkgh", out.reshape(b, kh, g, kh, h), eye.astype(dtype))
    return out_bkgh.reshape(b, 1, n * h)


# The "xla" attention's score budget where none is configured (`default_score_block_mib`).
CPU_SCORE_BLOCK_MIB = 20.0


def default_score_block_mib() -> float:
    """CPU_SCORE_BLOCK_MIB on a CPU backend, 0 (one block) on GPUs and TPUs. The blocks are a CPU-cache measure: a
    softmax's passes over a block of float32 scores that fits the L3 cache run fast (benchmarks/README.md), while an
    accelerator runs one large batched matmul better than many small unrolled ones (and has no such cache)."""
    return CPU_SCORE_BLOCK_MIB if jax.default_backend() == "cpu" else 0.0


def query_chunk_for_score_budget(batch: int, heads: int, queries: int, keys: int, budget_bytes: float) -> int:
    """Query rows per block so that each block's float32 scores (batch x heads x rows x keys) fit `budget_bytes`,
    in the fewest equal blocks: 0 (one block) when all of them fit or the budget is 0. For `attend`'s
    query_chunk."""
    if budget_bytes <= 0:
        return 0
    blocks = math.ceil(4 * batch * heads * queries * keys / budget_bytes)
    return 0 if blocks <= 1 else math.ceil(queries / blocks)


def _xla_attend_in_query_blocks(q_btnh, k_bskh, v_bskh, mask_bts, dtype, query_chunk: int):
    """The "xla" attention, `query_chunk` query rows at a time (the last block may be shorter), concatenated: the
    same numbers (each row's softmax sees all its keys). Why: XLA:CPU runs a softmax's passes (max, exp-and-sum,
    divide) over whole float32 score arrays; a (heads, 784, 784) block of scores does not stay in the caches
    between them, a (heads, 56, 784) one does: measured on this project's 2-core machine, the vision tower's
    per-frame attention (8 heads, 784 patches) 31-37 -> 13-16 ms. Blocks are unrolled (static slices), so XLA
    can also run two of them at once on two cores; a `lax.map` over them measured slower (16-28 ms)."""
    t = q_btnh.shape[1]
    blocks = [attend(q_btnh[:, i:i + query_chunk], k_bskh, v_bskh, mask_bts[:, i:i + query_chunk], "xla", dtype)
              for i in range(0, t, query_chunk)]
    return jnp.concatenate(blocks, axis=1)


class Attention(nn.Module):
    """Qwen3 attention: q/k/v/o without bias, RMSNorm over head_dim on q and k *before* RoPE, GQA.

    Inputs: x (B, T, D); cos, sin (B, T, H); mask (B, T, S) bool, S = T without a cache or the cache length.
    With `kv_cache`, the new keys/values are written at `kv_cache.index` for layer `layer_idx` and the
    queries attend over the whole cached layer (and its shared prefix, if it has one: `attend_shared_prefix`).
    Returns (out (B, T, D), kv_cache or None).
    `attention_impl`: see `attend` (prefill, training and every decode step use the same one).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraConfig | None = None
    attention_impl: str = "xla"
    fused_qkv: bool = False

    def _proj(self, name: str, features: int) -> Linear:
        lora = self.lora if (self.lora is not None and name in self.lora.targets) else None
        return Linear(features, dtype=self.dtype, param_dtype=self.param_dtype, lora=lora, name=f"{name}_proj")

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, mask_bts, kv_cache: KVCache | None = None,
                 layer_idx: int = 0, deterministic: bool = True):
        b, t, d = x_btd.shape
        n, kh, h = self.num_heads, self.num_kv_heads, self.head_dim
        keeps = adapter_dropout_keeps(self, self.lora, deterministic, {
            "q": x_btd.shape, "k": x_btd.shape, "v": x_btd.shape, "o": (b, t, n * h)})
        if self.fused_qkv:
            qkv = self._proj("qkv", (n + 2 * kh) * h)(x_btd, deterministic)
            q, k, v = jnp.split(qkv, [n * h, (n + kh) * h], axis=-1)
        else:
            q = self._proj("q", n * h)(x_btd, deterministic, keeps.get("q"))
            k = self._proj("k", kh * h)(x_btd, deterministic, keeps.get("k"))
            v = self._proj("v", kh * h)(x_btd, deterministic, keeps.get("v"))
        q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kh, h), v.reshape(b, t, kh, h)
        q = RMSNorm(self.rms_norm_eps, self.param_dtype, name="q_norm")(q)
        k = RMSNorm(self.rms_norm_eps, self.param_dtype, name="k_norm")(k)
        q = apply_rope(q, cos_bth.astype(q.dtype), sin_bth.astype(q.dtype))
        k = apply_rope(k, cos_bth.astype(k.dtype), sin_bth.astype(k.dtype))

        if kv_cache is not None:
            kv_cache = kv_cache.write_layer(layer_idx, k, v)
            k, v = kv_cache.layer(layer_idx)
            k, v = k.astype(self.dtype), v.astype(self.dtype)

        if kv_cache is not None and kv_cache.has_shared_prefix:
            prefix_k, prefix_v = kv_cache.prefix_layer(layer_idx)
            out = attend_shared_prefix(q, k, v, mask_bts, prefix_k, prefix_v, kv_cache.prefix_valid,
                                       self.attention_impl, self.dtype)
        else:
            out = attend(q, k, v, mask_bts, self.attention_impl, self.dtype)
        return self._proj("o", d)(out, deterministic, keeps.get("o")), kv_cache
