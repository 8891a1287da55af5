"""Dense projection with an optional LoRA adapter, the one place LoRA lives in the model code.

Parameter names: `kernel` (in, out) [+ `bias` (out,)], and with LoRA `lora_a` (in, r), `lora_b` (r, out).
`lora_b` starts at zero so an adapted model equals its base model until trained (Hu et al., 2021).
The adapters are stored in float32 whatever `param_dtype` (the frozen kernel's storage) is, and cast to `dtype`
where they are used.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vital_jax.sharding import constrain_weight


def LORA_A_INIT(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:  # noqa: N802
    """uniform(-1/sqrt(in), 1/sqrt(in)) for A of shape (..., in, r), the usual LoRA A init (kaiming-uniform with
    a=sqrt(5)). Leading axes are stacked layers (the scanned layout, (L, in, r)), not a receptive field: read as
    one, they made the bound 1/sqrt(in * L), so a scanned 36-layer model's adapters started 6x smaller than the
    same model's unrolled ones (and learned like a 6x smaller alpha)."""
    batch_axis = tuple(range(len(shape) - 2))
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", batch_axis=batch_axis)(key, shape, dtype)
# The adapters are what trains: their fp32 copy is the master weight. In bf16 (8 mantissa bits) an AdamW step of
# lr 2e-5 is below half an ulp of any |a| > ~0.008 and rounds away (issue #18).
LORA_PARAM_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters. `targets` are projection names (q, k, v, o, gate, up, down)."""

    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# Dropout masks are drawn 16 bits per element: the keep probability is quantised to 1/65536 (0.95 -> 62259/65536,
# off by 3e-6) and one Threefry-2x32 evaluation (two 32-bit words) serves four elements.
DROPOUT_BITS = 16


def _keep_units(rate: float) -> int:
    """The keep probability in units of 2^-16 (`DROPOUT_BITS`); 2^16 means nothing is dropped."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    keep_units = round((1.0 - rate) * (1 << DROPOUT_BITS))
    if keep_units == 0:
        raise ValueError(f"dropout rate {rate} keeps less than 1 / 2^{DROPOUT_BITS} of the elements")
    return keep_units


def lora_dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout of x (..., n): each element kept with probability q = round((1 - rate) 2^16) / 2^16 and
    scaled by 1/q (so E[output] = x exactly), else 0. Masks come from `random_uint16`."""
    if _keep_units(rate) == 1 << DROPOUT_BITS:
        return x
    (keep,) = lora_dropout_keeps(rng, rate, [x.shape])
    return apply_lora_dropout(x, keep, rate)


def lora_dropout_keeps(rng: jax.Array, rate: float, shapes) -> list[jax.Array]:
    """Independent keep masks (bool) for several adapter inputs of shapes (*lead, n_i) with the same leading
    dimensions, from one `random_uint16` draw of (*lead, sum n_i) split along its last axis.

    Why one draw: each draw is the whole Threefry written out (~260 HLO ops), and XLA's compile time grows with
    every copy. A module whose projections all take adapters (attention's q, k, v, o; the MLP's gate, up, down)
    draws once instead of once per projection: at `benchmarks.peer_train_step`'s sizes (8 unrolled text layers)
    the masks made the train step's compile ~2x as long with a draw per projection.
    """
    shapes = [tuple(shape) for shape in shapes]
    lead = shapes[0][:-1]
    if any(shape[:-1] != lead for shape in shapes):
        raise ValueError(f"lora_dropout_keeps: the shapes {shapes} do not share their leading dimensions")
    with jax.named_scope("lora_dropout"):
        keep = random_uint16(rng, (*lead, sum(shape[-1] for shape in shapes))) < jnp.uint16(_keep_units(rate))
    bounds = list(itertools.accumulate(shape[-1] for shape in shapes))[:-1]
    return jnp.split(keep, bounds, axis=-1)


def apply_lora_dropout(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """x where `keep`, scaled by 1/q (q: the quantised keep probability of `rate`), else 0."""
    keep_units = _keep_units(rate)
    if keep_units == 1 << DROPOUT_BITS:
        return x
    with jax.named_scope("lora_dropout"):  # one name for profiles (benchmarks/profile_train_step.py)
        scale = jnp.asarray((1 << DROPOUT_BITS) / keep_units, x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def random_uint16(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint16 values of `shape`, four per Threefry-2x32 evaluation of (key, flat counter).

    Why not `jax.random.bits`: JAX lowers Threefry on CPU as a 5-iteration while loop whose carried arrays XLA
    copies at every iteration (the masks of one peer train step were ~26,000 copies), and its 32-bit draws XOR the
    hash's two output words into one. The same hash written out here (`threefry2x32`) is one elementwise loop
    that XLA fuses with the mask's use, and both words are kept: the peer train step ran 768 -> 725 ms (A/B in one
    process; at rate 0 it runs ~700 ms). The counters are the iota of `shape`, so the masks partition with the data
    under sharding as the partitionable `jax.random` ones do.
    """
    *lead, n = shape
    per_row = -(-n // 4)
    count = math.prod(lead) * per_row
    if count >= 2 ** 32:
        raise ValueError(f"random_uint16: {shape} needs {count} counters, more than 2^32")
    counter = jnp.zeros((*lead, per_row), jnp.uint32)
    stride = 1
    for axis in reversed(range(len(lead) + 1)):  # flat row-major index, from iotas (no reshape of a 1-D range)
        counter = counter + jax.lax.broadcasted_iota(jnp.uint32, counter.shape, axis) * jnp.uint32(stride)
        stride *= counter.shape[axis]
    key1, key2 = _threefry_key(rng)
    words = jnp.stack(threefry2x32(key1, key2, jnp.zeros_like(counter), counter), axis=-1)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # (*lead, per_row, 2, 2)
    return halves.reshape(*lead, 4 * per_row)[..., :n]


def _threefry_key(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 key words of a Threefry key (raw uint32[2] or typed); other generators' keys are hashed
    into two words with their own implementation."""
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    if data.shape != (2,) or data.dtype != jnp.uint32:
        data = jax.random.bits(rng, (2,), jnp.uint32)
    return data[0], data[1]


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key1: jax.Array, key2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al., 2011), the hash behind `jax.random`'s default generator, on
    uint32 arrays: (key words, counter words) -> two output words, elementwise."""
    injected = (key1, key2, key1 ^ key2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + injected[0], x2 + injected[1]
    for group in range(5):
        for rotation in _THREEFRY_ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = jax.lax.shift_left(x2, jnp.uint32(rotation)) | jax.lax.shift_right_logical(
                x2, jnp.uint32(32 - rotation))
            x2 = x1 ^ x2
        x1 = x1 + injected[(group + 1) % 3]
        x2 = x2 + injected[(group + 2) % 3] + jnp.uint32(group + 1)
    return x1, x2


# `jax.ad_checkpoint.checkpoint_name` of every Linear's output (no effect outside a rematerialised function).
PROJECTION_NAME = "projection"


class Linear(nn.Module):
    """y = x @ kernel (+ bias) (+ scaling * dropout(x) @ lora_a @ lora_b). Input (..., in) -> (..., out).

    The base product goes through `project` (a single row on the CPU runs on all cores)."""

    features: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraConfig | None = None
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    # The product's output dtype (it accumulates in float32 either way); None: `dtype`. Output heads ask float32:
    # see `Embed.attend`.
    output_dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, dropout_keep: jax.Array | None = None) -> jax.Array:
        """dropout_keep: the adapter's dropout mask (x's shape, bool) when the caller drew it (`adapter_dropout_keeps`);
        otherwise the layer draws its own."""
        in_features = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        kernel = constrain_weight(kernel, self.path, "kernel")
        x = x.astype(self.dtype)
        y = project(x, kernel.astype(self.dtype), self.output_dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + constrain_weight(bias, self.path, "bias").astype(self.dtype)
        if self.lora is not None:
            lora_a = self.param("lora_a", LORA_A_INIT, (in_features, self.lora.rank), LORA_PARAM_DTYPE)
            lora_b = self.param("lora_b", nn.initializers.zeros, (self.lora.rank, self.features), LORA_PARAM_DTYPE)
            lora_a = constrain_weight(lora_a, self.path, "lora_a")
            lora_b = constrain_weight(lora_b, self.path, "lora_b")
            if deterministic or self.lora.dropout == 0.0:
                x_drop = x
            elif dropout_keep is not None:
                x_drop = apply_lora_dropout(x, dropout_keep, self.lora.dropout)
            else:
                x_drop = lora_dropout(x, self.lora.dropout, self.make_rng("dropout"))
            y = y + self.lora.scaling * low_rank_product(x_drop, lora_a.astype(self.dtype),
                                                         lora_b.astype(self.dtype))
        # The name the "projections" remat policy saves (`qwen3.config.REMAT_POLICIES`): the output with the
        # adapter's product added, one array where saving every dot keeps the base and adapter outputs apart.
        return checkpoint_name(y, PROJECTION_NAME)


def project(x: jax.Array, kernel: jax.Array, output_dtype: jnp.dtype | None = None) -> jax.Array:
    """x @ kernel for x (..., in), kernel (in, out) -> (..., out) in `output_dtype` (None: as `jnp.dot`); a single
    row (one token of one example: a decode or latent step at batch 1) on the CPU backend as `one_row_blocks`
    partial products, summed in float32.

    Why: XLA:CPU runs a matrix-vector product on one thread, so a one-token step streamed its weights from one
    core while the other idled. The same product as a batch of partial products over blocks of the input
    features (a free view of the row-major kernel) runs its batch across XLA's intra-op threads, and the
    partial sums are added after. Measured on the 2-core EPYC (benchmarks/README.md, "One-row products on all
    cores"): `peer_inference`'s K = 4 program 262.6 -> 251.0 ms (best of 11, one process), no change on one
    core. Products of several rows are left to the ordinary dot, which parallelises them itself (split, they
    ran slower).
    """
    blocks = one_row_blocks(x, kernel)
    if blocks < 2:
        return jnp.dot(x, kernel, preferred_element_type=output_dtype)
    features_in, features_out = kernel.shape
    width = features_in // blocks
    parts = jax.lax.dot_general(x.reshape(blocks, 1, width), kernel.reshape(blocks, width, features_out),
                                (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    # Partial sums in float32 and one rounding to the output dtype, as the single product would round.
    out_dtype = output_dtype or jnp.result_type(x.dtype, kernel.dtype)
    return parts.sum(axis=0).astype(out_dtype).reshape(*x.shape[:-1], features_out)


# The most blocks a one-row product is split into (`one_row_blocks`): measured with 2 threads only; more blocks
# than threads gained nothing there (2 and 4 blocks ran alike).
MAX_ONE_ROW_BLOCKS = 8


@functools.cache
def cpu_threads() -> int:
    """The cores this process may run on (XLA:CPU sizes its intra-op thread pool by them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def one_row_blocks(x: jax.Array, kernel: jax.Array) -> int:
    """How many partial products `project` splits x @ kernel into: the CPU threads (at most MAX_ONE_ROW_BLOCKS),
    reduced to a divisor of the input features, when x is a single row and JAX runs on the CPU without a mesh;
    else 1 (one ordinary dot). Under a mesh the partitioner places the product; an accelerator runs a
    matrix-vector product on all its cores already."""
    if kernel.ndim != 2 or math.prod(x.shape[:-1]) != 1 or jax.default_backend() != "cpu":
        return 1
    if not jax.sharding.get_abstract_mesh().empty:
        return 1
    blocks = min(cpu_threads(), MAX_ONE_ROW_BLOCKS)
    while blocks > 1 and kernel.shape[0] % blocks:
        blocks -= 1
    return blocks


def adapter_dropout_keeps(module: nn.Module, lora: LoraConfig | None, deterministic: bool,
                          inputs: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    """The dropout masks of a module's adapted projections, from one draw (`lora_dropout_keeps`) with the
    module's own "dropout" rng: {projection name: keep mask of its input's shape}, for the names in `inputs`
    (name -> input shape) that `lora` targets; {} when nothing is dropped. Pass each to its `Linear`."""
    if lora is None or deterministic or lora.dropout == 0.0:
        return {}
    names = [name for name in inputs if name in lora.targets]
    if not names:
        return {}
    keeps = lora_dropout_keeps(module.make_rng("dropout"), lora.dropout, [inputs[name] for name in names])
    return dict(zip(names, keeps))


@jax.custom_vjp
def low_rank_product(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x @ a) @ b for x (..., in), a (in, r), b (r, out) -> (..., out), with its own backward pass.

    Why not plain autodiff: JAX transposes `h @ b` with respect to b as db = (dy^T h)^T, whose left operand is the
    large cotangent dy (..., out) contracted over its rows. XLA:CPU's dots want the left operand's contracted
    dimension minor, so it wrote every adapted projection's dy transposed, a strided copy fused into dy's producer
    (at `benchmarks.peer_train_step`'s sizes ~7 ms per MLP projection). Both weight gradients here keep the rank-r
    arrays (h, dh: (..., r)) on the left: db = h^T dy and da = (dh^T x)^T (written x^T dh, it is the saved input x
    that XLA stores transposed in the forward pass instead). The peer step, A/B in one process: 893 -> 828 ms
    (db), and 815 -> 785 ms for da's form against x^T dh.
    """
    return jnp.dot(jnp.dot(x, a), b)


def _low_rank_forward(x, a, b):
    h = jnp.dot(x, a)
    return jnp.dot(h, b), (x, a, b, h)


def _low_rank_backward(residuals, dy):
    x, a, b, h = residuals
    last = dy.ndim - 1
    rows = tuple(range(last))  # every leading (batch, token) dimension is contracted in the weight gradients
    dh = jax.lax.dot_general(dy, b, (((last,), (1,)), ((), ())))
    db = jax.lax.dot_general(h, dy, ((rows, rows), ((), ())))
    da = jax.lax.dot_general(dh, x, ((rows, rows), ((), ()))).T  # (r, in) -> (in, r): dh on the left, as db's h
    dx = jax.lax.dot_general(dh, a, (((last,), (1,)), ((), ())))
    return dx, da.astype(a.dtype), db.astype(b.dtype)


low_rank_product.defvjp(_low_rank_forward, _low_rank_backward)


def merge_lora(backbone_params: dict, lora: LoraConfig, dtype=None) -> dict:
    """Fold every adapter into its base kernel, W' = W + (alpha / r) A B (summed in float32), and drop the LoRA
    leaves. `dtype`: the merged kernels' dtype; None keeps each kernel's own. Merged into a bf16 kernel, every
    entry of the update below half an ulp of W rounds away (issue #18): a float32 export of a bf16-stored run
    passes float32 here, so the update survives.

    The result has exactly the base model's tree (what the HF exporter expects).
    """

    def visit(node):
        if not isinstance(node, dict):
            return node
        if "lora_a" in node and "kernel" in node:
            kernel = node["kernel"]
            # matmul, not dot: scanned layers stack adapters as (L, in, r) @ (L, r, out).
            delta = lora.scaling * jnp.matmul(node["lora_a"].astype(jnp.float32),
                                              node["lora_b"].astype(jnp.float32))
            merged = {k: v for k, v in node.items() if not k.startswith("lora_")}
            merged["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype if dtype is None else dtype)
            return merged
        return {k: visit(v) for k, v in node.items()}

    return visit(backbone_params)
