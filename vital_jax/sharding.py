"""Device mesh, logical-axis table and PartitionSpecs for VITAL training (one place for all sharding decisions).

Mesh: three named axes ("data", "fsdp", "tensor") whose sizes come from `config.mesh.shape` (-1 = the remaining
devices). The batch is split over data x fsdp; parameters are FSDP-sharded over "fsdp" along their model (embed)
dimension and tensor-parallel over "tensor" along heads / mlp / vocab.

Parameters get a spec in two steps, as in MaxText / flax's `logical_axis_rules`:
  1. `param_logical_axes(path, shape)`: a rule table over the parameter path names each dimension with a logical
     axis (`.../q_proj/kernel` (D, N*H) -> ("embed", "heads"); LoRA adapters and biases inherit their kernel's
     names; norm scales are ("norm",), MedSynapse-V's learned query matrices ("queries", None));
  2. `LOGICAL_AXIS_RULES` maps logical axes to mesh axes ("embed" -> fsdp, "heads" -> tensor, ...).
A dimension that the mesh axes do not divide keeps the longest dividing prefix of its mesh axes, or is replicated,
and every such fallback is listed in the returned `ShardingReport` (and logged): nothing is silently replicated.
The same path rules serve the optimizer state (its `mu`/`nu` trees end with the parameter paths), the frozen tree
and checkpoint-restore targets; `optax.MaskedNode` leaves carry no array and stay MaskedNode.

Activations: `constrain(x, logical_axes)` pins an activation to its logical axes (a no-op unless a mesh is set
with `jax.set_mesh`). The decoder stacks pin the residual stream `("batch", "length", "act_embed")` at every
layer boundary (`vital_jax.models.qwen3.modeling.RESIDUAL_AXES`, loop and scan forms), which is also where the
latent recurrence's z_k leave the backbone.

Weights: every `Linear` and `Embed` pins its weight, where it is used, to the weight's spec without "fsdp"
(`constrain_weight`, rules `WEIGHT_COMPUTE_RULES`): FSDP's all-gather before the matmul (and reduce-scatter of
the gradient) is explicit. This is needed for correctness, not only for speed: left to itself, XLA's SPMD
partitioner (jax 0.10.2; Shardy and GSPMD alike) partitions `x @ W` with x's batch over data x fsdp, W split
(tensor, fsdp) and the output over (batch, ..., tensor) by swapping the batch shards of devices (data 0,
fsdp 1) and (data 1, fsdp 0) and never swapping them back, so those examples get each other's results. Any
consumer asking for the model dimension over "tensor" (the visual projector's fc1 did) triggers it, with or
without activation constraints. `tests/test_sharding.py` checks the raw pattern and the full train step on the
(2, 2, 2) mesh.

Typical use in training::

    mesh = mesh_from_config(config)
    state_sh, report = tree_shardings(state, mesh)        # TrainState: params, opt_state, step, rng
    frozen_sh = shardings_for(frozen, mesh)
    with jax.set_mesh(mesh):
        step = jax.jit(functools.partial(train_step, model, optimizer),
                       in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
SCANNED_LAYERS = "layers"  # the module name of `nn.scan`-ned decoder layers (Qwen3Config.scan_layers)
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (a name, a tuple of names, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("hidden", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("lora_rank", None),
    ("norm", None),
    ("queries", None),
    # activations and batches
    ("batch", BATCH_AXES),
    ("packed", BATCH_AXES),  # the packed image patches (Np, P) of a batch
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)

# Dense layers by the path of their module: (in, out) logical axes of the kernel. `bias` takes (out,),
# `lora_a` (in, lora_rank), `lora_b` (lora_rank, out). First match wins; matched at the end of the module path.
LINEAR_RULES: tuple[tuple[str, tuple[str | None, str | None]], ...] = (
    # Qwen3 / Qwen3-VL text decoder layers (backbone and auxiliary decoder)
    (r"q_proj", ("embed", "heads")),
    (r"(k_proj|v_proj)", ("embed", "kv_heads")),
    (r"o_proj", ("heads", "embed")),
    (r"(gate_proj|up_proj)", ("embed", "mlp")),
    (r"down_proj", ("mlp", "embed")),
    # The decoding layout's fused q|k|v and gate|up (`Qwen3Config.fused_projections`; decode loops run in it, also
    # inside training programs): split across the fused dimension, correct but not aligned with the parts, so
    # under tensor > 1 a step reshards the parts it splits off.
    (r"qkv_proj", ("embed", "heads")),
    (r"gate_up_proj", ("embed", "mlp")),
    (r"lm_head", ("embed", "vocab")),
    # Qwen3-VL vision tower: fused qkv rows are q|k|v, so "heads" splits the fused dimension (correct, not
    # head-aligned; fine for a frozen tower that is mostly FSDP-sharded).
    (r"attn/qkv", ("embed", "heads")),
    (r"attn/proj", ("heads", "embed")),
    (r"linear_fc1", ("embed", "mlp")),  # block MLPs and the (deepstack) patch mergers
    (r"linear_fc2", ("mlp", "embed")),
    (r"patch_embed", (None, "embed")),
    # SigLIP (the ROI-feature encoder): q/k/v_proj share the rules above, its MLP the fc1/fc2 rules below.
    (r"out_proj", ("heads", "embed")),
    # SAM image encoder (MedSynapse-V's anatomical encoder): attn/qkv and attn/proj share the Qwen3-VL rules.
    (r"mlp/lin1", ("embed", "mlp")),
    (r"mlp/lin2", ("mlp", "embed")),
    # MedSynapse-V's memory sampler P_phi: its attention and MLP share the rules above; d_f -> d_h out.
    (r"output_proj", ("embed", None)),
    # VITAL scaffolding: pj_in/proj, visual_projector/fc1, fc2. The heads run as their own root modules, so the
    # rules match the module name alone (that is the path `constrain_weight` sees); "attn/proj" matched above.
    (r"proj", ("embed", None)),
    (r"fc1", ("embed", "mlp")),
    (r"fc2", ("mlp", "embed")),
)

EMBEDDING_RULES: tuple[tuple[str, tuple[str | None, str | None]], ...] = (
    (r"embed_tokens", ("vocab", "embed")),
    (r"pos_embed", (None, "embed")),
    (r"position_embedding", (None, "embed")),  # SigLIP
)

# Learned per-slot matrices (N, width) read directly, not through a Linear: MedSynapse-V's meta-query probes Q_0
# (`sampler/probes`, N x d_f), A_psi's pooling queries (`autonomous/queries`, N x D) and its slot offsets
# (`autonomous/slot_bias`, N x D). N = 16 rows that every example reads whole, 256 KB at 8B: replicated on
# purpose, like the norm scales.
QUERY_PARAMS = ("probes", "queries", "slot_bias")

_LINEAR_RE = [(re.compile(rf"(^|/)({pattern})$"), axes) for pattern, axes in LINEAR_RULES]
_EMBEDDING_RE = [(re.compile(rf"(^|/)({pattern})$"), axes) for pattern, axes in EMBEDDING_RULES]


# ------------------------------------------------------------------------------------------------------ mesh
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape (data, fsdp, tensor); at most one entry may be -1 (= the devices left over)."""

    shape: tuple[int, ...] = (-1, 1, 1)
    axis_names: tuple[str, ...] = MESH_AXES

    def __post_init__(self):
        if len(self.shape) != len(self.axis_names):
            raise ValueError(f"mesh shape {self.shape} has {len(self.shape)} entries for axes {self.axis_names}")
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in self.shape):
            raise ValueError(f"mesh shape {self.shape}: sizes must be integers")
        if sum(1 for s in self.shape if s == -1) > 1:
            raise ValueError(f"mesh shape {self.shape}: at most one axis may be -1")
        bad = [s for s in self.shape if s != -1 and s < 1]
        if bad:
            raise ValueError(f"mesh shape {self.shape}: sizes must be positive or -1")

    @classmethod
    def from_config(cls, config) -> "MeshConfig":
        """Read `config.mesh.shape` (and optional `config.mesh.axis_names`) from an ml_collections ConfigDict
        (or any attribute/dict-style object). A config without a `mesh` field gives the default (-1, 1, 1):
        pure data parallelism over all devices."""
        mesh_cfg = _get(config, "mesh", None)
        if mesh_cfg is None:
            return cls()
        shape = _get(mesh_cfg, "shape", None)
        names = _get(mesh_cfg, "axis_names", None)
        return cls(shape=tuple(shape) if shape is not None else cls.shape,
                   axis_names=tuple(names) if names is not None else MESH_AXES)

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        """The concrete shape for `num_devices` devices; raises if it does not use them all."""
        known = math.prod(s for s in self.shape if s != -1)
        if -1 in self.shape:
            if num_devices % known:
                raise ValueError(f"mesh shape {self.shape}: {num_devices} devices are not divisible by {known}")
            shape = tuple(num_devices // known if s == -1 else s for s in self.shape)
        else:
            shape = tuple(self.shape)
        if math.prod(shape) != num_devices:
            raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices; there are {num_devices}")
        return shape


def _get(obj, name, default):
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices (of all processes) with `Auto` axes (GSPMD propagation, as the models expect).

    Uses `jax.make_mesh`, which orders devices for the physical topology (ICI rings on TPU). For multi-slice TPU
    topologies build the device array with `jax.experimental.mesh_utils.create_hybrid_device_mesh` instead.
    """
    devices = list(jax.devices() if devices is None else devices)
    concrete = MeshConfig(tuple(shape), tuple(axis_names)).resolve(len(devices))
    return jax.make_mesh(concrete, tuple(axis_names), axis_types=(AxisType.Auto,) * len(concrete), devices=devices)


def mesh_from_config(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh` with the shape of `config.mesh` (see `MeshConfig.from_config`)."""
    mesh_config = MeshConfig.from_config(config)
    return make_mesh(mesh_config.shape, mesh_config.axis_names, devices)


def _mesh_sizes(mesh) -> dict[str, int]:
    """Axis sizes of a Mesh, an AbstractMesh or a plain {name: size} mapping."""
    if isinstance(mesh, Mapping):
        return dict(mesh)
    return dict(mesh.shape)


# ----------------------------------------------------------------------------------------- logical -> mesh
@dataclasses.dataclass
class ShardingReport:
    """What did not get the sharding its rule asked for.

    fallbacks: one line per dimension that was (partly) replicated because the mesh axes do not divide it.
    unmatched: array leaves no rule covers (replicated).
    """

    fallbacks: list[str] = dataclasses.field(default_factory=list)
    unmatched: list[str] = dataclasses.field(default_factory=list)
    unmatched_sizes: list[int] = dataclasses.field(default_factory=list, repr=False)

    def extend(self, other: "ShardingReport") -> "ShardingReport":
        self.fallbacks += other.fallbacks
        self.unmatched += other.unmatched
        self.unmatched_sizes += other.unmatched_sizes
        return self

    def __bool__(self) -> bool:
        return bool(self.fallbacks or self.unmatched)

    def __str__(self) -> str:
        if not self:
            return "sharding: every array got the spec its rule asked for"
        lines = [f"sharding: {len(self.fallbacks)} dimension fallback(s), {len(self.unmatched)} leaf/leaves with "
                 f"no rule (replicated)"]
        lines += [f"  fallback {line}" for line in self.fallbacks]
        lines += [f"  no rule  {line}" for line in self.unmatched]
        return "\n".join(lines)

    def log(self, log: logging.Logger = logger, what: str = "tree") -> None:
        if self:
            log.warning("%s: %s", what, self)


def logical_to_mesh_axes(logical_axes: Sequence[str | None],
                         rules=LOGICAL_AXIS_RULES) -> tuple[tuple[str, ...], ...]:
    """Mesh axes of each dimension (a tuple per dimension, empty = replicated), before divisibility checks.

    A mesh axis already used by an earlier dimension is dropped from later ones (an axis can shard one
    dimension only). Unknown logical names raise.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is None:
            out.append(())
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the logical-axis rules")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes)
    return tuple(out)


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh, rules=LOGICAL_AXIS_RULES,
             name: str = "array") -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec of an array with the given logical axes, plus one note per dimension that fell back.

    A dimension keeps the longest prefix of its mesh axes whose size product divides it (e.g. a batch of 6 over
    data=2, fsdp=4 keeps "data"); axes missing from the mesh are ignored (a mesh without "tensor" replicates it).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{name}: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {tuple(shape)}")
    sizes = _mesh_sizes(mesh)
    spec, notes = [], []
    for dim, (axes, size) in enumerate(zip(logical_to_mesh_axes(logical_axes, rules), shape)):
        axes = tuple(a for a in axes if a in sizes)
        kept = axes
        while kept and size % math.prod(sizes[a] for a in kept):
            kept = kept[:-1]
        if kept != axes:
            wanted = math.prod(sizes[a] for a in axes)
            notes.append(f"{name} {tuple(shape)}: dim {dim} ({logical_axes[dim]}, size {size}) is not divisible by "
                         f"{'x'.join(axes)}={wanted}; sharded over {kept or 'nothing (replicated)'}")
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec), notes


# ------------------------------------------------------------------------------------------- parameter rules
def param_logical_axes(path: str, shape: Sequence[int]) -> tuple[str | None, ...] | None:
    """Logical axes of a parameter (or of an optimizer-state leaf ending with a parameter path), or None when no
    rule covers it. Scalars get ()."""
    ndim = len(shape)
    if ndim == 0:
        return ()
    module, _, leaf = path.rpartition("/")
    segments = module.split("/")
    if SCANNED_LAYERS in segments:
        # Scanned decoder layers (`model/layers/...`) stack every parameter along a leading layer axis.
        segments.remove(SCANNED_LAYERS)
        inner = param_logical_axes("/".join(segments + [leaf]), shape[1:])
        return None if inner is None else ("layers",) + inner
    if leaf in ("kernel", "bias", "lora_a", "lora_b"):
        for pattern, (fan_in, fan_out) in _LINEAR_RE:
            if pattern.search(module):
                axes = {"kernel": (fan_in, fan_out), "bias": (fan_out,), "lora_a": (fan_in, "lora_rank"),
                        "lora_b": ("lora_rank", fan_out)}[leaf]
                return axes if len(axes) == ndim else None
    if leaf == "embedding" and ndim == 2:
        for pattern, axes in _EMBEDDING_RE:
            if pattern.search(module):
                return axes
    if leaf in ("scale", "bias") and ndim == 1 and "norm" in module.rsplit("/", 1)[-1]:
        return ("norm",)
    if leaf in QUERY_PARAMS and ndim == 2:
        return ("queries", None)
    return None


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path) -> str:
    """'a/b/0/c' for a jax key path (dict keys, attribute names and sequence indices)."""
    return "/".join(_key_name(k) for k in key_path)


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


# Unmatched leaves at least this large are logged as warnings; smaller ones (rng keys, counters) only reported.
_WARN_UNMATCHED_SIZE = 1 << 16


def tree_specs(tree, mesh, rules=LOGICAL_AXIS_RULES, logical_axes_fn=param_logical_axes
               ) -> tuple[Any, ShardingReport]:
    """PartitionSpec for every array leaf of `tree` (params, TrainState, optimizer state, abstract trees), from
    its path. Scalars are replicated; MaskedNode stays MaskedNode. Returns (specs tree, report)."""
    report = ShardingReport()

    def one(key_path, leaf):
        if _is_masked(leaf):
            return leaf
        name = path_str(key_path)
        shape = tuple(np.shape(leaf))
        axes = logical_axes_fn(name, shape)
        if axes is None:
            report.unmatched.append(f"{name} {shape}")
            report.unmatched_sizes.append(math.prod(shape))
            return PartitionSpec()
        spec, notes = spec_for(axes, shape, mesh, rules, name)
        report.fallbacks.extend(notes)
        return spec

    specs = jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_masked)
    return specs, report


def _named(specs, mesh: Mesh):
    return jax.tree.map(lambda s: s if _is_masked(s) else NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec) or _is_masked(x))


def tree_shardings(tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> tuple[Any, ShardingReport]:
    """NamedSharding for every array leaf of `tree` (see `tree_specs`); returns (shardings tree, report)."""
    specs, report = tree_specs(tree, mesh, rules)
    return _named(specs, mesh), report


def shardings_for(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of arrays or ShapeDtypeStructs (e.g. the target of an orbax restore onto a
    different mesh); fallbacks and unmatched large leaves are logged."""
    shardings, report = tree_shardings(abstract_tree, mesh, rules)
    big = [u for u, n in zip(report.unmatched, report.unmatched_sizes) if n >= _WARN_UNMATCHED_SIZE]
    if report.fallbacks or big:
        logger.warning("%s", ShardingReport(report.fallbacks, big))
    return shardings


def abstract_with_shardings(tree, shardings) -> Any:
    """ShapeDtypeStructs carrying `shardings` (what `orbax` restore takes to place arrays on a new mesh)."""
    return jax.tree.map(lambda x, s: x if _is_masked(x) else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings, is_leaf=_is_masked)


def abstract_of(tree) -> Any:
    """ShapeDtypeStructs with each array's own shape, dtype and sharding: what a program is compiled for
    (`jax.jit(...).lower(*abstract_of(args))` compiles for those arrays without them)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def shard(tree, shardings) -> Any:
    """Place a (host or device) tree onto `shardings` (single-process; use `distributed` helpers across hosts)."""
    return jax.tree.map(lambda x, s: x if _is_masked(x) else jax.device_put(x, s), tree, shardings,
                        is_leaf=_is_masked)


def cast_floating(tree, dtype=jnp.bfloat16) -> Any:
    """Cast floating-point leaves to `dtype` (e.g. frozen base weights kept in bf16); others unchanged."""
    def cast(x):
        if _is_masked(x) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)
    return jax.tree.map(cast, tree, is_leaf=_is_masked)


# ---------------------------------------------------------------------------------------------------- batches
_PACKED_LEAVES = ("pixel_patches", "segment_ids", "interp_index", "interp_weight")


def batch_logical_axes(path: str, shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axes of a VitalBatch leaf (or of the pipeline's numpy-dict batch).

    Per-example arrays shard their leading dimension over the batch axes; MRoPE `positions` (3, B, T) their
    second; the packed image patches (Np, P) and their per-patch `vision_inputs` arrays use "packed" (same
    mesh axes as the batch, replicated when Np does not divide); `image_grid_thw` is host metadata (replicated).
    """
    parts = path.split("/")
    leaf = parts[-1]
    ndim = len(shape)
    if ndim == 0 or leaf == "image_grid_thw":
        return (None,) * ndim
    if leaf in _PACKED_LEAVES or "vision_inputs" in parts:
        return ("packed",) + (None,) * (ndim - 1)
    if leaf == "positions" and ndim == 3:
        return (None, "batch", "length")
    return ("batch",) + (None,) * (ndim - 1)


def batch_specs(batch, mesh, rules=LOGICAL_AXIS_RULES) -> tuple[Any, ShardingReport]:
    """PartitionSpecs of a batch (VitalBatch or numpy dict), with a report of any fallback to replication."""
    return tree_specs(batch, mesh, rules, logical_axes_fn=batch_logical_axes)


def batch_shardings(batch, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> tuple[Any, ShardingReport]:
    """NamedShardings of a batch; see `batch_logical_axes`."""
    specs, report = batch_specs(batch, mesh, rules)
    return _named(specs, mesh), report


# -------------------------------------------------------------------------------------------------- activations
def activation_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The spec `constrain` pins: `spec_for`'s, except that a dimension none of whose mesh axes divide it (an
    odd batch, a packed-patch count) is left to the partitioner (`UNCONSTRAINED`) instead of being forced to
    replication. A dimension that keeps a dividing prefix of its axes keeps that prefix."""
    spec, notes = spec_for(logical_axes, shape, mesh, rules)
    if not notes:
        return spec
    sizes = _mesh_sizes(mesh)
    wanted = [tuple(a for a in axes if a in sizes) for axes in logical_to_mesh_axes(logical_axes, rules)]
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return PartitionSpec(*[PartitionSpec.UNCONSTRAINED if want and entry is None else entry
                           for entry, want in zip(entries, wanted)])


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.Array:
    """`with_sharding_constraint` of x to its logical axes under the current mesh (`jax.set_mesh`); a no-op
    when no mesh is set. See `activation_spec` for dimensions the mesh axes do not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(logical_axes, x.shape, mesh, rules))


def _gathered_rules(rules) -> tuple:
    """The rules with the fsdp axis removed from every entry: how a weight looks while its layer uses it."""
    out = []
    for name, axes in rules:
        if axes is not None:
            axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a != "fsdp") or None
        out.append((name, axes))
    return tuple(out)


WEIGHT_COMPUTE_RULES = _gathered_rules(LOGICAL_AXIS_RULES)


def weights_sharded() -> bool:
    """Whether the program being traced runs under a mesh that splits weights: an "fsdp" axis (weights gathered where
    they are used, `constrain_weight`) or a "tensor" axis of more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and any(dict(mesh.shape).get(axis, 1) > 1 for axis in ("fsdp", "tensor"))


def constrain_weight(x: jax.Array, module_path: Sequence[str], leaf: str) -> jax.Array:
    """A parameter as the layer at `module_path` uses it: gathered over "fsdp", still split over "tensor".

    This is FSDP made explicit (the weight is all-gathered right before its matmul and its gradient
    reduce-scattered back). Leaving the choice to the SPMD partitioner is not safe: with the batch over
    data x fsdp and tensor > 1, XLA (jax 0.10.2, Shardy and GSPMD alike) can partition `x @ W` for W split
    (tensor, fsdp) by permuting the batch shards of x between devices and never permuting them back, so
    examples get each other's outputs (`tests/test_sharding.py::test_fsdp_tensor_matmul_partitioning`).
    `module_path` is the module's path (`self.path`; a `layers` segment of scanned layers is ignored, the
    weight inside the scan body has no layer axis). Without a mesh this is a no-op; under a mesh a weight that no
    rule covers is an error (left to the partitioner it could hit the bug above).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    segments = [s for s in module_path if s != SCANNED_LAYERS]
    axes = param_logical_axes("/".join(list(segments) + [leaf]), x.shape)
    if axes is None:
        raise ValueError(f"no sharding rule covers the weight {'/'.join(segments + [leaf])} {tuple(x.shape)}; add "
                         f"its module to LINEAR_RULES / EMBEDDING_RULES in vital_jax/sharding.py")
    spec, _ = spec_for(axes, x.shape, mesh, WEIGHT_COMPUTE_RULES)
    return jax.lax.with_sharding_constraint(x, spec)


def gathered_before_loop(params: dict, path: Sequence[str], leaf: str) -> dict:
    """`params` with the weight params[path[0]]...[path[-1]][leaf] as its layer uses it (`constrain_weight`), for a
    token loop to receive as an argument; without a mesh that splits weights, `params` unchanged.

    Why: a weight read at every token whose gather nothing outside the loop performs (an output head) is otherwise
    all-gathered by its layer's constraint at every iteration; gathered here, before the loop, it is gathered once
    per call (and the constraint inside finds it gathered)."""
    if not weights_sharded():
        return params

    def replace(tree: dict, names: Sequence[str]) -> dict:
        if not names:
            return {**tree, leaf: constrain_weight(tree[leaf], path, leaf)}
        return {**tree, names[0]: replace(tree[names[0]], names[1:])}

    return replace(params, list(path))


__all__ = [
    "BATCH_AXES", "LINEAR_RULES", "WEIGHT_COMPUTE_RULES", "activation_spec", "LOGICAL_AXIS_RULES", "MESH_AXES",
    "MeshConfig", "ShardingReport", "abstract_with_shardings", "batch_logical_axes", "batch_shardings", "batch_specs",
    "cast_floating", "constrain", "constrain_weight", "gathered_before_loop", "logical_to_mesh_axes", "make_mesh",
    "mesh_from_config", "param_logical_axes", "path_str", "shard", "shardings_for", "spec_for", "tree_shardings",
    "tree_specs",
]
