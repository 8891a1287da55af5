"""The attention implementations (`attention_impl`) side by side at the 8B model's shapes, on whatever device JAX
sees: each one's forward + backward time and its largest difference from "xla" (the reference), in bfloat16.

    python -m benchmarks.attention_kernels [--batch 16 --prompt_len 512 --repeats 10] [--impls xla,dot_product,cudnn]
        [--quick]   # small shapes, CPU-friendly: the CI smoke test of the script

Two cases, as the train step calls `layers.attention.attend`: the text decoder's prefill (Qwen3-VL-8B's text: 32
query heads over 8 kv heads of 128, a causal mask with left padding, `batch` rows of `prompt_len`) and the vision
tower's (one 448x448 image: 784 patches, 16 heads of 72, one row, no mask: every patch of a frame sees the frame,
as the tower calls it). Every impl gets the same bf16 q, k, v and mask; the loss is the sum of squares of the output
over the rows that see a key. An impl that
cannot run here ("cudnn" off an NVIDIA GPU, "pallas_flash" off a TPU: `attention.check_backend`) is reported as such
and left out. Run before an MFU measurement on a GPU: it shows whether "cudnn" agrees with the reference at these
shapes (max |diff| of the outputs and of dq, dk, dv) and what it saves per layer in time and in XLA's temporary
buffers (the materialised scores), within seconds. The last line is the time ratio of the last impl against "xla"
for the text case.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import xla_memory
from benchmarks.latent_overhead import best_ms
from vital_jax.layers.attention import ATTENTION_IMPLS, attend, check_backend


def text_case(rng, batch: int, length: int, heads: int, kv_heads: int, head_dim: int):
    """q, k, v bf16 and the causal mask with left padding (row b pads its first b * length / (4 batch) slots)."""
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, n, head_dim)), jnp.bfloat16)
               for n in (heads, kv_heads, kv_heads))
    pad = (np.arange(batch) * length) // (4 * batch)
    valid = np.arange(length)[None, :] >= pad[:, None]
    mask = np.tril(np.ones((length, length), bool))[None] & valid[:, None, :]
    return q, k, v, jnp.asarray(mask)


def vision_case(rng, patches: int, heads: int, head_dim: int):
    """q, k, v bf16 of one frame and no mask (`vision.VisionAttention` under per-frame attention)."""
    q, k, v = (jnp.asarray(rng.standard_normal((1, patches, heads, head_dim)), jnp.bfloat16) for _ in range(3))
    return q, k, v, None


def rows_seeing_a_key(q, mask) -> np.ndarray:
    """(B, T) bool: the query rows with a visible key (all of them without a mask). mask: a concrete array."""
    return np.ones(q.shape[:2], bool) if mask is None else np.asarray(mask).any(-1)


def step_fn(impl: str, mask):
    """jit of (q, k, v) -> (output, (dq, dk, dv)) for the sum of squares of the output over rows that see a key."""

    def loss(q, k, v):
        out = attend(q, k, v, mask, impl, jnp.bfloat16)
        seen = jnp.asarray(rows_seeing_a_key(q, mask))[:, :, None]
        return jnp.sum(jnp.where(seen, out.astype(jnp.float32), 0.0) ** 2), out

    return jax.jit(lambda q, k, v: jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v))


def relative_diff(a, b) -> float:
    """max |a - b| / max |b| over the leaves of two trees (the gradients' scale grows with the loss's)."""
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) /
                     jnp.max(jnp.abs(y.astype(jnp.float32)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compare(name: str, case, impls: list[str], repeats: int) -> dict[str, float]:
    q, k, v, mask = case
    print(f"{name}: q {tuple(q.shape)}, k/v {tuple(k.shape)}, bf16")
    (_, ref_out), ref_grads = step_fn("xla", mask)(q, k, v)
    times = {}
    seen = rows_seeing_a_key(q, mask)
    programs, rows = {}, {}
    for impl in impls:
        compiled, memory = xla_memory.compile_measured(step_fn(impl, mask), (q, k, v), ("temp",))
        (_, out), grads = compiled(q, k, v)   # also the warm-up call
        out_diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))[seen]))
        programs[impl] = functools.partial(compiled, q, k, v)
        rows[impl] = (f"max |diff| vs xla: output {out_diff:.3g}, dq/dk/dv {relative_diff(grads, ref_grads):.3g} "
                      f"of their largest entry | XLA temporaries {memory['temp'] / 2**20:.1f} MiB")
    times = best_ms(programs, repeats)   # interleaved round by round, so load affects every impl alike
    for impl in impls:
        print(f"  {impl:12s} forward+backward {times[impl]:9.3f} ms | {rows[impl]}")
    return times


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--impls", default="xla,dot_product,cudnn", help=f"comma list of {ATTENTION_IMPLS}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="small shapes: the CI smoke test of the script")
    args = p.parse_args(argv)
    heads, kv_heads, head_dim, patches, vision_heads, vision_dim = 32, 8, 128, 784, 16, 72
    if args.quick:
        args.batch, args.prompt_len, args.repeats = 2, 64, 2
        heads, kv_heads, head_dim, patches, vision_heads, vision_dim = 4, 2, 16, 64, 2, 24
    impls = []
    for impl in args.impls.split(","):
        if impl not in ATTENTION_IMPLS:
            raise SystemExit(f"unknown impl {impl!r}; one of {ATTENTION_IMPLS}")
        try:
            check_backend(impl)
            impls.append(impl)
        except ValueError as e:
            print(f"{impl}: not run here: {e}")
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; impls {impls}")
    rng = np.random.default_rng(0)
    text = compare("text prefill", text_case(rng, args.batch, args.prompt_len, heads, kv_heads, head_dim), impls,
                   args.repeats)
    compare("vision tower", vision_case(rng, patches, vision_heads, vision_dim), impls, args.repeats)
    last = impls[-1]
    print(f"ratio xla / {last} (text prefill, forward+backward): {text['xla'] / text[last]:.2f}x")


if __name__ == "__main__":
    main()
