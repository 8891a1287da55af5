"""Multi-host setup: `jax.distributed.initialize` when the environment asks for it, and global batches.

`maybe_initialize_distributed()` must run before anything touches a JAX device. It decides how (first match):
  1. explicit: `coordinator_address` / `num_processes` / `process_id` arguments, else the environment variables
     VITAL_COORDINATOR ("host:port"), VITAL_NUM_PROCESSES, VITAL_PROCESS_ID (and optional
     VITAL_LOCAL_DEVICE_IDS "0,1", default "all" visible devices; jax's cluster detection is then switched off);
     one process is a no-op;
  2. SLURM: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID, SLURM_LOCALID set (inside `srun`):
     jax's own cluster detection. jax then gives each task the single GPU `SLURM_LOCALID` (one task per GPU); with
     one task per node all GPUs of the node are used instead (from VITAL_LOCAL_DEVICE_IDS, SLURM_GPUS_ON_NODE or
     CUDA_VISIBLE_DEVICES);
  3. Cloud TPU VM (libtpu installed and a TPU host detected): `jax.distributed.initialize()` without arguments,
     jax reads the pod topology from the TPU metadata;
  4. otherwise nothing (one process).
VITAL_DISTRIBUTED=off disables all of it; VITAL_DISTRIBUTED=on forces step 3's argument-less call (any cluster
jax can detect, e.g. Open MPI).

Global batches: the input pipeline yields each process's own examples (numpy, `vital_jax.data.pipeline` contract,
shapes bucketed per process). `global_vital_batch` agrees on shapes across processes and returns a VitalBatch of
global `jax.Array`s sharded over the mesh's batch axes. Image patches never leave their process: the examples of
each batch shard are packed into that shard's own slice of the patch array (sharded like the batch), and
`PrefixInputs.image_feature_index` tells the model which merged row each image token takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vital_jax import sharding
from vital_jax.models.qwen3_vl.cached import PrefixInputs
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.mrope import get_rope_index
from vital_jax.models.qwen3_vl.vision import VisionInputs, uniform_frame_patches, vision_inputs
from vital_jax.vital.batch import VitalBatch

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "VITAL_COORDINATOR"
ENV_NUM_PROCESSES = "VITAL_NUM_PROCESSES"
ENV_PROCESS_ID = "VITAL_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "VITAL_LOCAL_DEVICE_IDS"
ENV_DISTRIBUTED = "VITAL_DISTRIBUTED"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_SWITCH_OFF = ("off", "0", "false", "no")
_SWITCH_ON = ("on", "1", "true", "yes")
_TPU_ENV_HINTS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                  "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")


class DistributedSetupError(ValueError):
    """The multi-process setup (arguments or VITAL_* / SLURM_* environment) is malformed or inconsistent; the
    message names the variable and the value to set."""


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """What `maybe_initialize_distributed` does. method: "none", "explicit", "slurm", "tpu", "auto" or
    "already"; kwargs: the arguments for `jax.distributed.initialize`; reason: one line for the log."""

    method: str
    kwargs: dict
    reason: str


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name].strip())
    except ValueError:
        raise DistributedSetupError(f"{name}={env[name]!r} is not an integer") from None


def _local_device_ids(value: str | None) -> list[int] | None:
    if value is None or value.strip().lower() in ("", "all"):
        return None
    try:
        ids = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        ids = None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise DistributedSetupError(f"{ENV_LOCAL_DEVICE_IDS}={value!r}: set distinct device indices >= 0 separated "
                                    "by commas (e.g. 0,1) or 'all'")
    return ids


def _slurm_node_gpus(env: Mapping[str, str]) -> list[int] | None:
    if env.get(ENV_LOCAL_DEVICE_IDS):
        return _local_device_ids(env[ENV_LOCAL_DEVICE_IDS])
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return list(range(int(env["SLURM_GPUS_ON_NODE"])))
    if env.get("CUDA_VISIBLE_DEVICES"):
        return list(range(len(env["CUDA_VISIBLE_DEVICES"].split(","))))
    return None


def _on_tpu_vm(env: Mapping[str, str]) -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    return any(env.get(k) for k in _TPU_ENV_HINTS) or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def plan_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                     env: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> DistributedPlan:
    """Decide (without side effects) how to initialise; see the module docstring for the order."""
    env = os.environ if env is None else env
    switch = env.get(ENV_DISTRIBUTED, "auto").strip().lower()
    if switch not in _SWITCH_OFF + _SWITCH_ON + ("auto", ""):
        raise DistributedSetupError(f"{ENV_DISTRIBUTED}={env[ENV_DISTRIBUTED]!r}: set on, off or auto")
    if switch in _SWITCH_OFF:
        return DistributedPlan("none", {}, f"{ENV_DISTRIBUTED}={switch}")
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _env_int(env, ENV_NUM_PROCESSES)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _env_int(env, ENV_PROCESS_ID)
    if local_device_ids is None:
        local_device_ids = _local_device_ids(env.get(ENV_LOCAL_DEVICE_IDS))

    if coordinator_address is not None or num_processes is not None or process_id is not None:
        if num_processes is not None and num_processes < 1:
            raise DistributedSetupError(f"num_processes / {ENV_NUM_PROCESSES}={num_processes}: set the number of "
                                        "processes, >= 1")
        if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
            raise DistributedSetupError(f"process_id / {ENV_PROCESS_ID}={process_id} is outside [0, {num_processes}) "
                                        f"for {num_processes} process(es): set it to 0 .. {num_processes - 1}")
        if num_processes == 1:
            # No jax.distributed, but the devices named are still the only ones this process may use.
            kwargs = {"local_device_ids": list(local_device_ids)} if local_device_ids is not None else {}
            return DistributedPlan("none", kwargs, "explicit single process")
        missing = [name for name, value in (("coordinator_address / " + ENV_COORDINATOR, coordinator_address),
                                            ("num_processes / " + ENV_NUM_PROCESSES, num_processes),
                                            ("process_id / " + ENV_PROCESS_ID, process_id)) if value is None]
        if missing:
            raise DistributedSetupError("explicit multi-process setup is incomplete; missing: " + ", ".join(missing))
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
        if local_device_ids is not None:
            kwargs["local_device_ids"] = list(local_device_ids)
        else:
            # Explicit means explicit: without this, jax's cluster detection would still fill local_device_ids
            # (e.g. [SLURM_LOCALID] inside srun) and hide all but one GPU of a one-task-per-node job.
            kwargs["cluster_detection_method"] = "deactivate"
        return DistributedPlan("explicit", kwargs, f"process {process_id}/{num_processes} via {coordinator_address}")

    if all(env.get(k) for k in _SLURM_VARS):
        tasks = int(env["SLURM_NTASKS"])
        if tasks <= 1:
            return DistributedPlan("none", {}, "SLURM job with one task")
        kwargs = {}
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 0)
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        if local_device_ids is not None:
            kwargs["local_device_ids"] = list(local_device_ids)
        elif per_node == "1" or (nodes and tasks == nodes):
            # One task per node: jax would otherwise pick only GPU SLURM_LOCALID (= 0) of each node.
            gpus = _slurm_node_gpus(env)
            if gpus is None:
                raise DistributedSetupError("SLURM job with one task per node: cannot tell the node's GPUs; set "
                                            f"{ENV_LOCAL_DEVICE_IDS}=0,1,... (or SLURM --gpus-per-node)")
            kwargs["local_device_ids"] = gpus
        return DistributedPlan("slurm", kwargs, f"SLURM task {env['SLURM_PROCID']}/{tasks}")

    if switch in _SWITCH_ON:
        return DistributedPlan("auto", {}, f"{ENV_DISTRIBUTED}={switch}: jax cluster auto-detection")
    if _on_tpu_vm(env) if tpu_vm is None else tpu_vm:
        return DistributedPlan("tpu", {}, "Cloud TPU VM: jax reads the pod topology")
    return DistributedPlan("none", {}, "no multi-process environment detected")


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                                 initialization_timeout: int = 300) -> DistributedPlan:
    """Call `jax.distributed.initialize` if this is a multi-process run (see module docstring); returns the plan.

    Call it first thing in an entry point, before any JAX computation. Safe to call twice.
    """
    if jax.distributed.is_initialized():
        return DistributedPlan("already", {}, "jax.distributed is already initialised")
    plan = plan_distributed(coordinator_address, num_processes, process_id, local_device_ids)
    if plan.method == "none":
        if "local_device_ids" in plan.kwargs:
            _use_only_devices(plan.kwargs["local_device_ids"])
        logger.info("single process (%s)", plan.reason)
        return plan
    if jax.config.jax_cpu_collectives_implementation is None:
        # Cross-process collectives for CPU devices (a no-op for GPU/TPU runs).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("jax.distributed.initialize: %s (%s)", plan.method, plan.reason)
    jax.distributed.initialize(initialization_timeout=initialization_timeout, **plan.kwargs)
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())
    return plan


def _use_only_devices(ids: Sequence[int]) -> None:
    """What `jax.distributed.initialize(local_device_ids=...)` does for a GPU process, for a single process that
    runs without it (before any backend starts; they read the setting once)."""
    visible = ",".join(str(i) for i in ids)
    jax.config.update("jax_cuda_visible_devices", visible)
    jax.config.update("jax_rocm_visible_devices", visible)


def is_primary() -> bool:
    """True on process 0, the one that writes logs, metrics and exports."""
    return jax.process_index() == 0


@contextlib.contextmanager
def warnings_from_primary():
    """Inside, processes other than 0 drop their absl warnings (errors still show): for code whose warnings are
    about what every process shares (the dataset, the encoder directory), which N processes would print N times."""
    if process_position()[0] == 0:
        yield
        return
    absl_logger = logging.getLogger("absl")
    before = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(before)


class PrimaryFailedError(RuntimeError):
    """Process 0's part of a step that it does alone failed (`on_primary`); its log says why."""


def process_position() -> tuple[int, int]:
    """(this process's index, the number of processes): one place, so a test can play one process of many."""
    return jax.process_index(), jax.process_count()


def _primary_outcome(ok: bool) -> bool:
    """Process 0's `ok`, on every process; a collective, so also the barrier the others wait at."""
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def on_primary(work: Callable[[], object], what: str, error_type: type[Exception] = PrimaryFailedError):
    """`work()` on process 0 alone while the other processes wait for it (one process: just `work()`), for what
    must happen once for all of them (a build into a shared directory, writing artefacts). The barrier carries
    process 0's outcome: process 0 raises its own error once the others know, and they raise `error_type` saying
    process 0 could not `what` (else they would wait at the barrier until jax's timeout, or go on without it).
    Returns what `work` returned on process 0, None on the others."""
    index, count = process_position()
    if count == 1:
        return work()
    result = error = None
    if index == 0:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - re-raised below, once the other processes know
            error = e
    ok = _primary_outcome(error is None)
    if error is not None:
        raise error
    if not ok:
        raise error_type(f"process 0 could not {what}; its log says why; process {index} stops with it")
    return result


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective: every process calls it at the same point; one process:
    `flag`). For decisions that must be the same everywhere: stop and save (SIGTERM may reach one process, or
    arrive a step apart), give up on a batch one process could not prepare."""
    return process_sum(int(bool(flag))) > 0


def process_sum(value: int) -> int:
    """`value` summed over all processes (a collective like `any_process`; one process: `value`). For counts each
    process knows of its own rows only, e.g. the valid examples of a global batch in the logged throughput."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.sum(multihost_utils.process_allgather(np.asarray(int(value), np.int32))))


# ------------------------------------------------------------------------------------------------ global arrays
def process_rows(named_sharding: NamedSharding, global_shape: Sequence[int], axis: int = 0) -> np.ndarray:
    """Sorted indices along `axis` of the global array that this process's devices hold (what its local data
    must contain, in this order, for `jax.make_array_from_process_local_data`)."""
    rows = set()
    for index in named_sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows.update(range(*index[axis].indices(global_shape[axis])))
    return np.asarray(sorted(rows), np.int64)


def host_local_to_global(local_tree, shardings, global_shapes=None):
    """Per-process numpy shards -> global jax.Arrays (`jax.make_array_from_process_local_data` on every leaf)."""
    if global_shapes is None:
        return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
                            local_tree, shardings)
    return jax.tree.map(lambda x, s, g: jax.make_array_from_process_local_data(s, np.asarray(x), tuple(g)),
                        local_tree, shardings, global_shapes, is_leaf=lambda x: isinstance(x, tuple))


def global_from_host_copy(x: np.ndarray, named_sharding: NamedSharding) -> jax.Array:
    """A global array from a full copy held by every process (each process reads only its devices' slices)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, named_sharding, lambda index: x[index])


_PER_EXAMPLE = ("prompt_ids", "prompt_valid", "answer_ids", "answer_valid", "latent_steps", "step_ids",
                "step_valid", "roi_feature", "example_valid", "global_feature")


def global_per_example(local: np.ndarray, mesh: Mesh, logical_axes: Sequence[str | None] | None = None) -> jax.Array:
    """This process's rows of a per-example array (B_local, ...) -> the global array (B_local x processes, ...),
    sharded over the batch axes like `global_vital_batch`'s per-example arrays (the process holds the global
    rows `process_rows` names, in order). logical_axes: default ("batch", None, ...)."""
    local = np.asarray(local)
    axes = tuple(logical_axes) if logical_axes is not None else ("batch",) + (None,) * (local.ndim - 1)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    spec, _ = sharding.spec_for(axes, global_shape, mesh)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, global_shape)


def host_copy(tree):
    """The whole of every array of `tree` as a numpy array on this process. A leaf sharded across processes (not
    fully addressable) is gathered with a collective, so every process must call this with the same tree, in the
    same order; the other leaves are read locally."""
    def to_host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(to_host, tree)


def host_rows(x: jax.Array, rows: Sequence[int]) -> np.ndarray:
    """Rows `rows` (along axis 0, in that order) of a global array, read from this process's shards: with several
    processes a batch-sharded array is not addressable as a whole, but each process holds its own examples' rows.
    Every other axis must be unsharded; a row no local shard holds is an error naming it."""
    rows = [int(r) for r in rows]
    if x.is_fully_addressable:
        return np.asarray(x)[rows]
    out = np.zeros((len(rows),) + tuple(x.shape[1:]), x.dtype)
    found = np.zeros(len(rows), bool)
    where: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        where.setdefault(r, []).append(i)
    for shard in x.addressable_shards:
        if any(index.indices(size) != (0, size, 1) for index, size in zip(shard.index[1:], x.shape[1:])):
            raise ValueError(f"host_rows: an array of shape {x.shape} is sharded beyond its first axis "
                             f"({shard.index})")
        start, stop, _ = shard.index[0].indices(x.shape[0])
        data = None
        for r in range(start, stop):
            if r in where:
                data = np.asarray(shard.data) if data is None else data
                out[where[r]], found[where[r]] = data[r - start], True
    if not found.all():
        missing = [r for r, ok in zip(rows, found) if not ok]
        raise ValueError(f"process {jax.process_index()} holds no shard of rows {missing[:8]} of an array of shape "
                         f"{x.shape}")
    return out

def global_vital_batch(local: Mapping[str, np.ndarray], config: Qwen3VLConfig, mesh: Mesh) -> VitalBatch:
    """This process's pipeline batch (numpy dict) -> the global VitalBatch, sharded over the batch axes.

    Every process calls it with its own `local` (same batch size everywhere; the process supplies the global rows
    `process_rows` names, in order). Prompts are left-padded to the longest Tp of all processes; the other
    per-example arrays must agree in shape. Image patches stay local: with S batch shards of B/S examples, shard
    j's examples are packed (in row order) into rows [j * Np_s, (j + 1) * Np_s) of the packed arrays, which are
    sharded over the batch axes like the examples, so each device holds exactly its own examples' patches and the
    hosts exchange only a few integers. Np_s is the same for every shard: the pipeline's per-process bucket split
    over the process's shards, doubled until the fullest shard fits (so shapes stay few). Attention segments are
    made unique across shards, the vision tower attends within each slice (`VisionInputs.num_slices`: scores of
    (S, Np/S, Np/S), not (Np, Np), which a pod-sized global batch could not hold), and `image_feature_index`
    (B, Tp) gives each image token its merged-feature row.
    Works unchanged in a single process.
    """
    local = {k: np.asarray(v) for k, v in local.items()}
    nproc = jax.process_count()
    b_local = local["prompt_ids"].shape[0]
    if "example_valid" not in local:
        local["example_valid"] = np.ones((b_local,), bool)
    keys = [k for k in _PER_EXAMPLE if k in local]
    has_images = "pixel_patches" in local and local.get("image_grid_thw") is not None
    grids = np.asarray(local["image_grid_thw"], np.int64).reshape(-1, 3) if has_images else np.zeros((0, 3))
    if has_images and len(grids) != b_local:
        raise ValueError(f"image_grid_thw has {len(grids)} rows for {b_local} examples (one image per example)")

    global_b = b_local * nproc
    batch_spec, notes = sharding.spec_for(("batch",), (global_b,), mesh)
    if notes:
        raise ValueError(f"global batch of {global_b} ({nproc} processes x {b_local}) does not divide the mesh's "
                         f"batch axes {sharding.BATCH_AXES} of {dict(mesh.shape)}")
    rows = process_rows(NamedSharding(mesh, batch_spec), (global_b,))
    if len(rows) != b_local:
        raise ValueError(f"process {jax.process_index()} addresses {len(rows)} of {global_b} batch rows but holds "
                         f"{b_local} examples: the mesh's batch axes must split the batch evenly over processes")
    batch_axes = () if not len(batch_spec) or batch_spec[0] is None else (
        (batch_spec[0],) if isinstance(batch_spec[0], str) else tuple(batch_spec[0]))
    num_shards = math.prod(mesh.shape[a] for a in batch_axes)
    shard_size = global_b // num_shards
    my_shards = sorted({int(r) // shard_size for r in rows})
    sizes = np.prod(grids, axis=1) if has_images else np.zeros((0,), np.int64)
    shard_patches = [int(sizes[rows // shard_size == j].sum()) for j in my_shards]
    shard_frames = [int(grids[rows // shard_size == j, 0].sum()) for j in my_shards] if has_images else [0]

    # 1. Agree on shapes: one int vector per process (fullest shard, largest Np share, most frames in a shard,
    #    Tp, the fixed trailing dims).
    merge = config.vision.merge_unit
    np_share = local["pixel_patches"].shape[0] // len(my_shards) if has_images else 0
    fixed = [s for k in keys if k not in ("prompt_ids", "prompt_valid") for s in local[k].shape[1:]]
    # The patches per frame when all of this process's frames have one size (-1: no images here, 0: several
    # sizes): attention per frame needs every process to agree on it (`VisionInputs.frame_patches`).
    local_frame = (-1 if not has_images else uniform_frame_patches([tuple(g) for g in grids])
                   if config.vision.frame_attention else 0)
    meta = np.asarray([max(shard_patches), np_share, max(shard_frames), local["prompt_ids"].shape[1], local_frame,
                       *fixed], np.int64)
    all_meta = np.asarray(multihost_utils.process_allgather(meta)).reshape(nproc, -1)
    if (all_meta[:, 5:] != all_meta[:1, 5:]).any():
        raise ValueError(f"per-example array shapes (other than the prompt length) differ between processes: "
                         f"{all_meta[:, 5:].tolist()} for the trailing dims of {keys}")
    tp = int(all_meta[:, 3].max())
    pad = tp - local["prompt_ids"].shape[1]
    if pad:
        local["prompt_ids"] = np.pad(local["prompt_ids"], ((0, 0), (pad, 0)))
        local["prompt_valid"] = np.pad(local["prompt_valid"], ((0, 0), (pad, 0)))

    # 2. Per-example arrays: each process's rows.
    def per_example(x, spec_axes):
        return global_per_example(x, mesh, spec_axes)

    arrays = {k: per_example(local[k], ("batch",) + (None,) * (local[k].ndim - 1)) for k in keys}
    positions, _ = get_rope_index(local["prompt_ids"], local["prompt_valid"], [tuple(g) for g in grids],
                                  config.image_token_id, config.vision.spatial_merge_size)
    pos_spec, _ = sharding.spec_for((None, "batch", "length"), (3, global_b, tp), mesh)
    positions = jax.make_array_from_process_local_data(NamedSharding(mesh, pos_spec), positions.astype(np.int32),
                                                       (3, global_b, tp))

    # 3. Packed images, one slice per batch shard (see the docstring).
    pixel_patches = vis = feature_index = None
    if has_images:
        base = max(merge, -(-int(all_meta[:, 1].max()) // merge) * merge)
        fullest = int(all_meta[:, 0].max())
        np_shard = base * 2 ** max(0, math.ceil(math.log2(max(fullest, 1) / base)))
        frames_cap = int(all_meta[:, 2].max())
        starts = np.concatenate([[0], np.cumsum(sizes)])
        patch_dim = local["pixel_patches"].shape[1]
        image_mask = (local["prompt_ids"] == config.image_token_id) & local["prompt_valid"].astype(bool)
        index = np.zeros((b_local, tp), np.int32)
        blocks = []
        for j in my_shards:
            members = [i for i in range(b_local) if rows[i] // shard_size == j]
            packed = np.zeros((np_shard, patch_dim), np.float32)
            offset = 0
            for i in members:
                packed[offset:offset + sizes[i]] = local["pixel_patches"][starts[i]:starts[i + 1]]
                tokens = np.flatnonzero(image_mask[i])
                if len(tokens) * merge != sizes[i]:
                    raise ValueError(f"batch row {int(rows[i])}: {len(tokens)} image tokens in the prompt but "
                                     f"{int(sizes[i])} patches (grid {grids[i].tolist()}) = {sizes[i] // merge} "
                                     f"merged features")
                index[i, tokens] = j * (np_shard // merge) + offset // merge + np.arange(len(tokens))
                offset += int(sizes[i])
            block = vision_inputs([tuple(grids[i]) for i in members], config.vision, pad_to=np_shard)
            segments = np.where(block.segment_ids > 0, block.segment_ids + j * frames_cap, 0).astype(np.int32)
            blocks.append((packed, dataclasses.replace(block, segment_ids=segments)))
        np_global = num_shards * np_shard
        packed_sharding = NamedSharding(mesh, PartitionSpec(batch_spec[0] if batch_axes else None))
        expected_rows = np.concatenate([np.arange(j * np_shard, (j + 1) * np_shard) for j in my_shards])
        if not np.array_equal(process_rows(packed_sharding, (np_global,)), expected_rows):
            raise ValueError("the packed patch rows this process holds do not follow its batch shards")
        place = lambda parts: jax.make_array_from_process_local_data(  # noqa: E731
            packed_sharding, np.concatenate(parts), (np_global,) + parts[0].shape[1:])
        pixel_patches = place([p for p, _ in blocks])
        frames = {int(f) for f in all_meta[:, 4] if f != -1}
        frame_patches = frames.pop() if len(frames) == 1 else 0
        vis = VisionInputs(**{field: place([getattr(v, field) for _, v in blocks])
                              for field in ("segment_ids", "positions", "interp_index", "interp_weight")},
                           num_slices=num_shards,  # attention within each shard's slice only ...
                           # ... and within each frame when all frames have one size dividing the slices
                           frame_patches=frame_patches if frame_patches > 0 and np_shard % frame_patches == 0 else 0)
        feature_index = per_example(index, ("batch", None))

    prefix = PrefixInputs(input_ids=arrays["prompt_ids"], token_valid=arrays["prompt_valid"], positions=positions,
                          pixel_patches=pixel_patches, vision_inputs=vis, image_feature_index=feature_index)
    return VitalBatch(prefix=prefix, answer_ids=arrays["answer_ids"], answer_valid=arrays["answer_valid"],
                      latent_steps=arrays["latent_steps"], step_ids=arrays["step_ids"],
                      step_valid=arrays["step_valid"], roi_feature=arrays["roi_feature"],
                      example_valid=arrays["example_valid"], global_feature=arrays.get("global_feature"))


__all__ = [
    "DistributedPlan", "DistributedSetupError", "PrimaryFailedError", "any_process", "global_from_host_copy",
    "global_per_example", "global_vital_batch", "host_rows", "host_local_to_global", "is_primary",
    "maybe_initialize_distributed", "on_primary", "plan_distributed", "process_position", "process_rows",
]
