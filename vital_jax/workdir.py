"""A run's workdir beyond its checkpoints: the config it was trained with, and the lock of the run using it.

train and pretrain record the resolved config (`workdir/config.json`) once training has started and refuse a
later run whose config differs in what is trained; `WorkdirLock` lets one run at a time use a workdir.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time

import jax
from absl import logging

from vital_jax.checkpoint import CheckpointError, check_atomicity
from vital_jax.jsonio import atomic_write, read_json, url_problem
from vital_jax.models.hf_config import ConfigError

CONFIG_FILE = "config.json"
LOCK_FILE = "RUNNING.lock"
SUMMARY_FILE = "train_summary.json"   # written by the train command when a run ends (finished or preempted)

# Fields that may differ between runs sharing a workdir (how long / how often / which kernel, not what is trained).
RESUMABLE_FIELDS = ("checkpoint", "logging", "mesh", "demo.finish", "model.attention_impl", "model.remat_policy",
                    "curriculum.compile_ahead", "medsynapse.rollout_relayout",
                    "pretrain.checkpoint")  # the study's pretraining section (a field added there bound a study)


# Fields added to the config after workdirs were written, with the value the older code behaved as. A saved
# config without the field resumes only if the field has that value now (anything else would train differently).
ADDED_FIELDS = {"model.scan_layers": False, "vital.latent_input": "feedback", "data.blind_images": False,
                "medsynapse.imt.memory_match": 0.0, "curriculum.max_steps": 0,
                "medsynapse.imt.init": "random", "medsynapse.memory_position": "assistant_turn",
                "vital.task_loss_reduction": "example", "optimizer.schedule_scope": "curriculum"}
# Per-process batch sizes (`train.check_mesh`'s batch fields): a run may resume on another number of processes
# with these scaled so that the global batch (processes x per-process batch) stays the one recorded in
# GLOBAL_BATCH_FILE (`check_global_batch`); a workdir without that record binds them like any other field.
PER_PROCESS_BATCH_FIELDS = ("data.batch_size", "medsynapse.ccr.rollout_prompts")
GLOBAL_BATCH_FILE = "global_batch.json"
# Added fields that runs may also switch between (RESUMABLE_FIELDS), with the value older code behaved as.
ADDED_RESUMABLE_FIELDS = {"model.attention_impl": "xla", "model.remat_policy": "full",
                          "medsynapse.rollout_relayout": False}


def local_workdir(workdir: str) -> str:
    """The absolute path of a run's workdir; a URL is refused (ConfigError, `jsonio.url_problem`): abspath would
    turn gs://bucket/run into a local ./gs:/bucket/run on every host, each writing its own."""
    if url_problem(workdir):
        raise ConfigError(f"workdir {url_problem(workdir)}")
    return os.path.abspath(workdir)


def fill_added_fields(config) -> None:
    """Give a recorded config (a ConfigDict read back from a workdir) every field added since it was written, with
    the value the older code behaved as (ADDED_FIELDS, ADDED_RESUMABLE_FIELDS). A field whose section the config
    does not have (a VITAL run's `medsynapse.*`) stays absent."""
    for dotted, value in {**ADDED_FIELDS, **ADDED_RESUMABLE_FIELDS}.items():
        *sections, name = dotted.split(".")
        node = config
        for section in sections:
            node = node[section] if node is not None and section in node else None
        if node is not None and name not in node:
            node[name] = value


def check_workdir_config(workdir: str, config_json: dict, record: bool = True, extendable: tuple[str, ...] = (),
                         new_sections: tuple[str, ...] = (), appendable: tuple[str, ...] = ()) -> None:
    """Refuse a workdir whose recorded config differs from `config_json` (beyond RESUMABLE_FIELDS).

    extendable: further fields that may differ (the study's rows and seeds: a study grows by runs it has not done).
    appendable: list fields that may grow at their end (MedSynapse-V's stages: a finished Stage I run goes on with
    CCR); `record_appended_fields` records the longer list once the run trains.
    new_sections: sections that may be added when the recorded config has none (a newer study's rows' settings);
    once recorded, they must match like any other field.

    record=True also records `config_json` when none is (the study). The training commands pass record=False and
    call `record_workdir_config` once training has started, so a run that fails before its first step leaves
    nothing that refuses the corrected command. For them, a recorded config with no checkpoint beside it (a start
    that failed under an older version, or a run stopped before its first checkpoint) binds nothing: it is
    replaced, with a warning naming the fields that differ."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        previous = read_json(path, CheckpointError)
        diffs = _diff(previous, config_json)
        diffs = [d for d in diffs if not any(d == f or d.startswith(f + ".") for f in RESUMABLE_FIELDS + extendable)]
        if os.path.exists(os.path.join(workdir, GLOBAL_BATCH_FILE)):  # checked there (`check_global_batch`)
            diffs = [d for d in diffs if d not in PER_PROCESS_BATCH_FIELDS]
        diffs = [d for d in diffs if not any((d == f or d.startswith(f + ".")) and _lookup(previous, f) is _MISSING
                                             for f in new_sections)]
        diffs = [d for d in diffs if not (d in ADDED_FIELDS and _lookup(previous, d) is _MISSING
                                          and _lookup(config_json, d) == ADDED_FIELDS[d])]
        diffs = [d for d in diffs if not (d in appendable and _appended(_lookup(previous, d), _lookup(config_json, d)))]
        if diffs and not record and not has_checkpoints(workdir):
            logging.warning("%s: recorded by a run that saved no checkpoint; replacing it (fields differ: %s)",
                            path, ", ".join(diffs))
            os.remove(path)
            return
        if diffs:
            grow = [f"{d} may only grow at its end (recorded {_lookup(previous, d)})" for d in diffs if d in appendable]
            raise CheckpointError(f"{workdir} was written by a different config (fields differ: {', '.join(diffs)}"
                                  f"{'; ' + '; '.join(grow) if grow else ''}); use a new --workdir or restore the "
                                  "original config")
        return
    if record:
        record_workdir_config(workdir, config_json)


def record_workdir_config(workdir: str, config_json: dict) -> None:
    """Write `config_json` to workdir/config.json unless a config is recorded already."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        return
    atomic_write(path, lambda f: json.dump(config_json, f, indent=2, sort_keys=True))


def record_appended_fields(workdir: str, config_json: dict, fields: tuple[str, ...],
                           with_fields: tuple[str, ...] = ()) -> None:
    """Record in workdir/config.json the `fields` (lists) that `config_json` extends at their end
    (`check_workdir_config(appendable=)`, which accepted them) and, when one grew, `with_fields` (the settings of
    what the longer list adds); the rest of the recorded config is kept."""
    path = os.path.join(workdir, CONFIG_FILE)
    recorded = read_json(path, CheckpointError)
    grown = [f for f in fields if _appended(_lookup(recorded, f), _lookup(config_json, f))]
    if not grown:
        return
    for dotted in grown + [f for f in with_fields if _lookup(config_json, f) is not _MISSING]:
        *sections, name = dotted.split(".")
        node = recorded
        for section in sections:
            node = node[section]
        node[name] = _lookup(config_json, dotted)
    atomic_write(path, lambda f: json.dump(recorded, f, indent=2, sort_keys=True))


def _appended(before, after) -> bool:
    """`after` is the list `before` with more items at its end."""
    return (isinstance(before, list) and isinstance(after, list) and len(after) > len(before)
            and after[:len(before)] == before)


TRAIN_RECORDS_FILE = "train_records.json"


def train_records_fingerprint(data_dir: str, split: str) -> dict:
    """{"records", "sha256"} of the records of `split` (id, latent steps, ROI row, in file order): what a run's
    data order and schedule are made from (`check_train_records`; VITAL's and MedSynapse-V's training)."""
    from vital_jax.data.records import RECORDS_FILE, read_records

    rows = [(r.id, r.latent_steps, r.roi_index) for r in read_records(os.path.join(data_dir, RECORDS_FILE))
            if r.split == split]
    return {"records": len(rows), "sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()}


def check_train_records(workdir: str, fingerprint: dict, record: bool) -> None:
    """The training records a run started with (`fingerprint`: {"records", "sha256"} of the split it trains on)
    are the ones it resumes with: the data order and the learning-rate schedule are functions of them, and a
    checkpoint's iterator position only means something in the same list. Records them (record=True, at the first
    step) or raises CheckpointError naming the change. Runs from before this record existed are not checked, and a
    record with no checkpoint beside it (a run stopped before its first save, e.g. by a record's non-finite loss)
    binds nothing: there is no data position to continue, so it is replaced, with a warning."""
    path = os.path.join(workdir, TRAIN_RECORDS_FILE)
    if record:
        if not os.path.exists(path):
            atomic_write(path, lambda f: json.dump(fingerprint, f, indent=2))
        return
    if not os.path.exists(path):
        return
    recorded = read_json(path, CheckpointError)
    if recorded != fingerprint and not has_checkpoints(workdir):
        logging.warning("%s: recorded by a run that saved no checkpoint; the training records changed since, so "
                        "it is replaced", path)
        os.remove(path)
        return
    if recorded != fingerprint:
        raise CheckpointError(
            f"{workdir}: the training records changed since this run started ({TRAIN_RECORDS_FILE}: "
            f"{recorded.get('records') if isinstance(recorded, dict) else '?'} records, now "
            f"{fingerprint['records']}, or the same number with other contents); resuming would continue its "
            "data order and schedule on other data. Restore the dataset, or train in a new --workdir")


def check_global_batch(workdir: str, batches: dict[str, int], processes: int, record: bool) -> None:
    """The global batch of each of `batches` ({PER_PROCESS_BATCH_FIELDS field: its per-process size} of this
    command) times `processes` is the one the run started with: a loader position and every phase's number of
    steps count steps of that batch. Another number of processes is fine when the per-process sizes are scaled to
    keep it (a pod slice resumed on half the hosts with twice the batch each). record=True (at the first step)
    records the fields not recorded yet (a stage added later brings its own); otherwise raises CheckpointError
    naming both where a recorded field's global batch differs. A record with no checkpoint beside it binds
    nothing (replaced, with a warning); a run from before the record existed resumes only with its recorded
    per-process batch (`check_workdir_config`)."""
    path = os.path.join(workdir, GLOBAL_BATCH_FILE)
    now = {field: size * processes for field, size in batches.items()}
    recorded = {}
    if os.path.exists(path):
        recorded = read_json(path, CheckpointError).get("global_batch")
        if not isinstance(recorded, dict):
            raise CheckpointError(f"{path}: no global_batch mapping (a field -> its global batch)")
    if record:
        if not now.keys() <= recorded.keys():
            merged = {**now, **recorded}
            atomic_write(path, lambda f: json.dump({"global_batch": merged}, f, indent=2, sort_keys=True))
        return
    changed = sorted(field for field in now.keys() & recorded.keys() if now[field] != recorded[field])
    if changed and not has_checkpoints(workdir):
        logging.warning("%s: recorded by a run that saved no checkpoint; replacing it (global batch of %s changed)",
                        path, ", ".join(changed))
        os.remove(path)
        return
    if changed:
        raise CheckpointError(
            f"{workdir}: this run started with a global batch (processes x per-process batch) of "
            + ", ".join(f"{field} = {recorded[field]}" for field in changed) + "; this command gives "
            + ", ".join(f"{processes} x {batches[field]} = {now[field]}" for field in changed)
            + ": its steps would cover other records and each phase would have another number of steps. Keep the "
            f"global batch (on P processes set the per-process batch to the global one / P; {GLOBAL_BATCH_FILE}), "
            "or train in a new --workdir")


def has_checkpoints(workdir: str) -> bool:
    """Whether any `workdir/<dir>/<step>` checkpoint exists (train's phase_<n>/, pretrain's <stage>_ckpt/)."""
    if not os.path.isdir(workdir):
        return False
    for entry in os.scandir(workdir):
        if entry.is_dir() and any(sub.name.isdigit() and sub.is_dir() for sub in os.scandir(entry.path)):
            return True
    return False


class WorkdirInUseError(CheckpointError):
    """Another run holds the workdir's lock."""


class WorkdirLock:
    """One run at a time in a workdir: `workdir/RUNNING.lock` records the host, pid and start of the run holding it.

    A second run refuses to start with a WorkdirInUseError naming the holder, instead of both crashing at their
    first save. A lock left by a run that was killed is stale and taken over with a warning: on the same host
    when its pid no longer runs (or runs a process started later, a reused pid). A lock from another host cannot
    be checked, so the error says which file to delete once that run is over. Only process 0 of a multi-process
    run takes the lock. `flag`: the command-line setting that names the directory, for the error's advice."""

    def __init__(self, workdir: str, flag: str = "--workdir"):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.flag = flag
        self._held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        # Without jax.distributed this is the only process; asking jax would start its backends (on a GPU, reserving
        # most of its memory) for a command that may never use them (a dataset build asking a teacher for hours).
        if jax.distributed.is_initialized() and jax.process_index() != 0:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = _this_process()
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.path)
                if holder is None:  # just created by another run and not yet written, or left empty by a crash
                    if _age_seconds(self.path) < _UNWRITTEN_LOCK_SECONDS:
                        time.sleep(0.1)
                        continue
                elif not _lock_is_stale(holder):
                    raise WorkdirInUseError(_in_use_message(os.path.dirname(self.path), self.path, holder,
                                                            self.flag)) from None
                if self._take_over(holder):
                    logging.warning("%s: taking over the lock of a run that no longer runs (%s)", self.path,
                                    "its lock file was left empty or unreadable" if holder is None
                                    else _describe(holder))
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())  # a lock left empty by a power loss would keep every run waiting 10 s
            self._held = True
            return
        raise WorkdirInUseError(f"{self.path}: could not take the workdir's lock (another run keeps taking it)")

    def _take_over(self, stale: dict | None) -> bool:
        """Remove the lock file if it still holds `stale` (what this process found and judged stale; None: an empty
        or unreadable file older than `_UNWRITTEN_LOCK_SECONDS`). Two runs that found the same stale lock would
        otherwise both remove "it", the second removing the lock the first had just taken, and both would train in
        one workdir: the check and the removal happen under an exclusive flock on a file beside the lock (stale
        locks are only taken over on their own host, where flock serialises processes)."""
        with open(self.path + _TAKEOVER_SUFFIX, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes
            current = _read_lock(self.path)
            if not os.path.exists(self.path) or current != stale:
                return False  # gone, or another run's lock by now: the caller tries again
            if stale is None and _age_seconds(self.path) < _UNWRITTEN_LOCK_SECONDS:
                return False
            os.remove(self.path)
            return True

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if not self._held:
            return
        self._held = False
        holder = _read_lock(self.path)
        if holder is not None and holder == _this_process(holder.get("since")):
            os.remove(self.path)


# A lock file that is still empty (or unreadable) this long after it was created was left by a run killed between
# creating and writing it; younger, it may be a starting run's.
_UNWRITTEN_LOCK_SECONDS = 10
_TAKEOVER_SUFFIX = ".takeover"


def _this_process(since: str | None = None) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "since": since or time.strftime("%Y-%m-%d %H:%M:%S")}


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (Linux /proc), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None


def _age_seconds(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def _lock_is_stale(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return False  # cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # running, as another user
    start = _process_start(int(holder["pid"]))
    return start is not None and holder.get("process_start") is not None and start != holder["process_start"]


def _describe(holder: dict) -> str:
    return f"pid {holder['pid']} on host {holder['host']}, since {holder.get('since', '?')}"


def _in_use_message(workdir: str, path: str, holder: dict, flag: str) -> str:
    if holder["host"] == socket.gethostname():
        return (f"{workdir} is in use by another run ({_describe(holder)}, still running); wait for it to finish, "
                f"stop it, or use another {flag}")
    return (f"{workdir} is in use by another run ({_describe(holder)}); wait for it to finish or use another "
            f"{flag}. If that run is no longer running, delete {path}")


_MISSING = object()


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def check_run_fields(config, more_at_least_one: dict | None = None) -> None:
    """The data, checkpoint and logging fields every trainer reads (VITAL's `train.validate_config`, MedSynapse-V's
    `medsynapse.trainer.validate_config`): a ConfigError naming the field. more_at_least_one: the trainer's own
    {field: value} that must be >= 1 too."""
    d = config.data
    at_least_one = {"data.batch_size": d.batch_size, "data.max_answer_tokens": d.max_answer_tokens,
                    "data.max_step_tokens": d.max_step_tokens, "data.min_pixels": d.min_pixels,
                    "checkpoint.keep": config.checkpoint.keep,
                    "checkpoint.save_every_steps": config.checkpoint.save_every_steps,
                    "logging.every_steps": config.logging.every_steps, **(more_at_least_one or {})}
    bad = [f"{field}={value}" for field, value in at_least_one.items() if value < 1]
    if bad:
        raise ConfigError(f"config: {', '.join(bad)}: must be >= 1")
    check_atomicity(config.checkpoint)
    if not d.prompt_buckets or min(d.prompt_buckets) < 1:
        raise ConfigError(f"config.data.prompt_buckets {tuple(d.prompt_buckets)} must be one or more positive lengths")
    if d.max_pixels < d.min_pixels:
        raise ConfigError(f"config.data.max_pixels={d.max_pixels} is below data.min_pixels={d.min_pixels}")
    if d.num_workers < 0:
        raise ConfigError(f"config.data.num_workers={d.num_workers} must be >= 0")
