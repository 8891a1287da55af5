"""Branch a MedSynapse-V run at a finished stage: a new workdir that holds the run up to that stage, so that the
stages after it can train again with other settings while the original run stays as it is.

    python -m vital_jax.medsynapse.branch --workdir=RUN --stage=warmup --out=RUN_ccr200
    python -m vital_jax.train --config=CONFIG --workdir=RUN_ccr200 \\
        --config.medsynapse.stages='("warmup","ccr")' --config.medsynapse.ccr.steps=200

The branch gets the kept stages' checkpoint folders, the anatomical feature store, the recorded paths and training
records, the metrics rows the kept stages logged, and the recorded config with `medsynapse.stages` ending at
`--stage`. Recorded paths inside the run's workdir (a demo run's `demo/` folder: its data, tokenizer, backbone and
E_ana) are copied too, and the branch's paths.json names the copies, so the branch does not depend on the
original; paths outside it (a user's dataset and checkpoints) are recorded as they were. Its later stages are then
appended stages (`trainer.train`): their settings may differ from the original run's, what the kept stages trained
may not. Not copied: TensorBoard events (the branch's start with its new stages), evaluations, exports and the
summary. The copy is made beside `--out` and renamed into place, so an interrupted branch leaves no half-made
workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from absl import app, flags, logging

from vital_jax import cli
from vital_jax import workdir as workdir_lib
from vital_jax.checkpoint import CheckpointError
from vital_jax.data.records import LineError, iter_jsonl
from vital_jax.jsonio import atomic_write, read_json
from vital_jax.medsynapse import trainer

METRICS_FILE = "metrics.jsonl"


def branch(workdir: str, stage: str, out: str) -> dict:
    """Copy the MedSynapse-V run in `workdir`, up to and including its finished `stage`, into the new workdir `out`.
    Returns {"out", "stages": the kept stages, "steps": {stage: final step}, "metrics_rows": rows copied}."""
    workdir, out = os.path.abspath(workdir), os.path.abspath(out)
    config = trainer.read_config(workdir)
    if stage not in trainer.STAGES:
        raise ValueError(f"--stage={stage!r}: expected one of {trainer.STAGES}")
    finished = trainer.finished_stages(workdir, config)
    if stage not in finished:
        raise CheckpointError(f"{workdir}: stage {stage!r} has not finished (finished: {tuple(finished) or 'none'});"
                              " a branch starts after a finished stage")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty directory; branch into a new one")
    kept = [s for s in config.medsynapse.stages if trainer.STAGES.index(s) <= trainer.STAGES.index(stage)]
    partial = out.rstrip(os.sep) + ".partial"
    with workdir_lib.WorkdirLock(workdir):  # not while a run trains there
        paths, assets = _rebased_paths(workdir, out, dataclasses.asdict(trainer.trained_paths(workdir)))
        shutil.rmtree(partial, ignore_errors=True)  # what an interrupted branch left
        os.makedirs(partial)
        for name in (trainer.FEATURES_DIR, *(os.path.basename(trainer.stage_dir(workdir, s)) for s in kept),
                     *sorted(assets)):
            shutil.copytree(os.path.join(workdir, name), os.path.join(partial, name))
        atomic_write(os.path.join(partial, trainer.PATHS_FILE), lambda f: json.dump(paths, f, indent=2))
        for name in (workdir_lib.TRAIN_RECORDS_FILE, workdir_lib.GLOBAL_BATCH_FILE):
            if os.path.exists(os.path.join(workdir, name)):  # runs made before it was recorded have none; the
                shutil.copy2(os.path.join(workdir, name), os.path.join(partial, name))   # next stage records it
        recorded = read_json(os.path.join(workdir, workdir_lib.CONFIG_FILE), CheckpointError)
        recorded["medsynapse"]["stages"] = kept
        atomic_write(os.path.join(partial, workdir_lib.CONFIG_FILE),
                     lambda f: json.dump(recorded, f, indent=2, sort_keys=True))
        rows = _kept_metrics(os.path.join(workdir, METRICS_FILE), set(kept))
        atomic_write(os.path.join(partial, METRICS_FILE), lambda f: f.writelines(rows))
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.rename(partial, out)
    return {"out": out, "stages": tuple(kept), "steps": {s: finished[s] for s in kept}, "metrics_rows": len(rows)}


def _rebased_paths(workdir: str, out: str, recorded: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """`recorded` (paths.json's fields) with each path inside `workdir` moved to the same place under `out`, and the
    names of `workdir`'s top-level entries that hold them (copied whole: a demo's `demo/` holds all four paths)."""
    run_folders = {trainer.FEATURES_DIR, *(os.path.basename(trainer.stage_dir(workdir, s)) for s in trainer.STAGES)}
    paths, assets = {}, set()
    for field, path in recorded.items():
        relative = os.path.relpath(path, workdir)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):  # outside the workdir: kept as it is
            paths[field] = path
            continue
        name = relative.split(os.sep)[0]
        if relative == os.curdir or name in run_folders:
            raise ValueError(f"{os.path.join(workdir, trainer.PATHS_FILE)}: {field}={path} is the workdir or inside "
                             "one of the run's own folders; a branch copies the folders the run's paths name, and "
                             "cannot copy that one without the stages it leaves out")
        assets.add(name)
        paths[field] = os.path.join(out, relative)
    return paths, assets


def _kept_metrics(path: str, stages: set[str]) -> list[str]:
    """The lines of a run's metrics.jsonl logged by `stages` (a line that does not parse, e.g. one cut short by a
    kill, is left out with a warning naming it)."""
    if not os.path.exists(path):
        return []
    kept = []
    for number, row in iter_jsonl(path):
        if isinstance(row, LineError):
            logging.warning("%s:%d: %s; not copied", path, number, row)
        elif row.get("stage") in stages:
            kept.append(json.dumps(row) + "\n")
    return kept


def main(argv):
    cli.no_positional(argv)
    cli.require(workdir=_WORKDIR.value, stage=_STAGE.value, out=_OUT.value)
    try:
        result = branch(_WORKDIR.value, _STAGE.value, _OUT.value)
    except (CheckpointError, ValueError, FileExistsError, FileNotFoundError) as e:
        cli.fail(e)
    steps = ", ".join(f"{s} {n} steps" for s, n in result["steps"].items())
    print(f"branched {os.path.abspath(_WORKDIR.value)} after stage {_STAGE.value!r} into {result['out']} ({steps}; "
          f"{result['metrics_rows']} metrics rows); train its next stages with "
          f"--workdir={result['out']} --config.medsynapse.stages='(...)' and their settings")
    return 0


def _define_flags():
    """Flags exist only when this module runs as a program (importing it defines none)."""
    global _WORKDIR, _STAGE, _OUT
    _WORKDIR = flags.DEFINE_string("workdir", None, "a MedSynapse-V run")
    _STAGE = flags.DEFINE_enum("stage", None, list(trainer.STAGES), "the last stage the branch keeps (finished)")
    _OUT = flags.DEFINE_string("out", None, "the new workdir (must not exist, or be empty)")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
