"""Evaluate a trained VITAL run on a medical VQA benchmark (Appendix B.4 metrics), at one K or a K sweep, or a
MedSynapse-V run with one or both of its memory branches.

    python -m vital_jax.evaluate --checkpoint=WORKDIR --benchmark=vqa_rad --data_dir=DIR --latent_steps=4 --out=DIR
    python -m vital_jax.evaluate --checkpoint=WORKDIR --benchmark=in_domain --data_dir=DATASET --k_sweep --out=DIR
    python -m vital_jax.evaluate --checkpoint=MEDSYNAPSE_WORKDIR --benchmark=vqa_rad --data_dir=DIR \
        --memory=autonomous,sampler --out=DIR

Benchmarks: vqa_rad, slake, pathvqa, pmc_vqa, in_domain, phantom_vqa, jsonl (see vital_jax.eval.benchmarks). Writes
`<benchmark>.predictions.jsonl`, `<benchmark>.metrics.json`, `<benchmark>.metrics.md` (per K with --k_sweep, plus
`k_sweep.json` / `k_sweep.png`: closed accuracy, open token F1 and single-example latency against K, the analogue
of the paper's Figure 4; `--figure_format=pdf` or `svg` for a vector figure). Every metrics JSON holds
`closed_accuracy` beside `closed_majority_baseline` and, with open questions, `open_token_f1` and
`accuracy_over_all` (every question, open ones by exact match: the scale of Table 1's VQA-RAD values).
Latency (`latency_ms`) is one example at a time, compilation excluded; `batched_ms_per_example` is throughput.
K is always explicit and logged; it is never inferred from the checkpoint.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from vital_jax import cli


DEFAULT_LATENCY_EXAMPLES = 64


RECORD_K = "record"


def record_latent_steps(examples, config) -> list[int]:
    """K per example for `latent_steps=["record"]`: the K its record was trained with (the length of its
    reasoning chain, `extra["latent_steps"]`), capped like training (`vital.latent_steps_cap`, else K_max).

    A diagnostic, not the paper's protocol (which answers every question with the same K): it tells a model that
    fails at a fixed K because short-chain questions never saw that K in training apart from one that fails anyway.
    """
    from vital_jax.vital.batch import trained_latent_steps

    k_max, cap = int(config.vital.k_max), int(config.vital.latent_steps_cap)  # config: the run's recorded one
    steps = []
    for e in examples:
        k = e.extra.get("latent_steps")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"example {e.id!r} has no record K (extra['latent_steps']={k!r}); latent_steps="
                             f"{RECORD_K!r} needs a benchmark built by vital_jax (in_domain, phantom_vqa)")
        steps.append(trained_latent_steps(k, k_max, cap))
    return steps


def _answer_all(predict, batches, total: int, batch_size: int, desc: str) -> tuple[list[str], list[float]]:
    """Answer every encoded batch. predict(encoded, n real examples, index of its first example) -> (answers, ms
    per example of the batch). Returns (predictions, the batched time per real example)."""
    from vital_jax.observability import ProgressReporter

    predictions, batched = [], []
    progress = ProgressReporter(total, desc=desc, every=max(1, total // 4), unit="question")
    for encoded, n in batches:
        answers, ms = predict(encoded, n, len(predictions))
        predictions += answers
        batched += [ms * batch_size / n] * n  # the batch's time over its real examples
        progress.update(len(predictions))
    progress.close()
    return predictions, batched


def _single_latency(predict_single, singles, batched: list[float], batch_size: int, n_timed: int) -> list[float]:
    """Single-example latency: the first `n_timed` examples one at a time (batch 1, compiled; the timer starts
    after the image and prompt are prepared on the host). The paper gives no protocol for its Figure 4."""
    if batch_size == 1:
        return batched[:n_timed]
    return [predict_single(encoded, n, i)[1] for i, (encoded, n) in enumerate(singles)]


def load_examples(benchmark: str, data_dir: str, split: str | None, limit: int | None, data_format: str = "auto"):
    """(split, examples) of `benchmark` in `data_dir`: `split` None is the benchmark's default split; an empty split
    is an error naming the directory."""
    from vital_jax.eval import load_benchmark
    from vital_jax.eval.benchmarks import default_split

    split = split or default_split(benchmark)
    examples = load_benchmark(benchmark, data_dir, split=split, limit=limit,
                              **({"format": data_format} if data_format != "auto" else {}))
    if not examples:
        raise ValueError(f"{benchmark} in {data_dir}: split {split!r} has no examples")
    return split, examples


def check_out_dir(out_dir: str, benchmark: str, checkpoint: str, split: str, result_dirs: dict[str, dict],
                  sweep: bool) -> None:
    """ValueError when `out_dir` holds another evaluation's results (another checkpoint, split or benchmark, or in
    one of `result_dirs` another setting: {dir: the report meta it will hold, {"latent_steps": K} or {"memory":
    branch}}) that this one would overwrite, or, for a K sweep, whose per-K files would sit beside this sweep's
    k_sweep.json and summary.md. A rerun of the same evaluation replaces its own files. An
    `out_dir` inside the checkpoint (a workdir's own eval folder) holds that workdir's results whatever path they
    record: a workdir copied or moved after an evaluation keeps its old path in them."""
    import glob

    from vital_jax.eval.report import METRICS_JSON_SUFFIX
    from vital_jax.jsonio import read_json

    checkpoint = os.path.abspath(checkpoint)
    own_folder = os.path.commonpath([os.path.abspath(out_dir), checkpoint]) == checkpoint
    ours = {os.path.join(d, benchmark + METRICS_JSON_SUFFIX): setting for d, setting in result_dirs.items()}
    swept = glob.glob(os.path.join(out_dir, "k*", "*" + METRICS_JSON_SUFFIX)) if sweep else []
    for path in sorted(set(ours) | set(swept)):
        if not os.path.isfile(path):
            continue
        found = read_json(path, ValueError)
        meta = found.get("meta", {}) if isinstance(found, dict) else {}
        name = os.path.basename(path)[:-len(METRICS_JSON_SUFFIX)]
        same_run = own_folder or meta.get("checkpoint") == checkpoint
        # (a report older than the field it lacks is taken to hold this setting)
        other = {k: meta[k] for k, v in ours.get(path, {}).items() if meta.get(k, v) != v}
        if (name, meta.get("split")) != (benchmark, split) or not same_run or other:
            held = "".join(f", {k} {v}" for k, v in other.items())
            raise ValueError(f"--out={out_dir} holds another evaluation's results ({path}: {name} of "
                             f"{meta.get('checkpoint')}, split {meta.get('split')}{held}); give a new --out or "
                             "move them")


def evaluate(checkpoint: str, benchmark: str, data_dir: str, out_dir: str, latent_steps: list[int],
             split: str | None = None, limit: int | None = None, batch_size: int = 4,
             max_new_tokens: int | None = None, run=None,
             latency_examples: int | None = DEFAULT_LATENCY_EXAMPLES, data_format: str = "auto",
             figure_format: str = "png", latency_breakdown: bool = False) -> list[dict]:
    """Evaluate at each K in `latent_steps`; returns the per-K summaries (and writes the report files).

    An entry "record" (`RECORD_K`) answers each question with its own record's K (`record_latent_steps`).

    `split` defaults to the benchmark's own (`benchmarks.default_split`: test, or PMC-VQA's test_clean).
    `max_new_tokens` defaults to the run's training answer budget (config data.max_answer_tokens), so answers are
    not cut shorter than the model was trained to give them. Predictions come from batches of `batch_size`, whose
    time per example is reported as `batched_ms_per_example` (throughput). Latency as the paper measures it is
    single-example: the first `latency_examples` examples (at least one; None: all) are run again one at a time,
    after compilation, and their times are `latency_ms`. `data_format` ("auto", "release" or "hf") chooses between
    a benchmark's original release files and a Hugging Face parquet copy in the same directory (vqa_rad, slake,
    pathvqa, pmc_vqa; `vital_jax.eval.benchmarks`); "auto" takes the release when both are there. A sweep's figure
    is k_sweep.<figure_format> (png, pdf or svg). `latency_breakdown`: also time each fixed K's phases on the
    latency examples (`Predictor.phase_latency`: prefill, latent steps, decode; two more programs per prompt width
    and K), reported as `latency_breakdown_ms` in k_sweep.json and drawn as the sweep figure's panel (b), Figure 4(b).
    """
    from vital_jax.eval import KSweepPoint, write_k_sweep, write_report, write_summary
    from vital_jax.eval import figures
    from vital_jax.eval import metrics as score_lib
    from vital_jax.eval.report import PER_EXAMPLE_K
    from vital_jax.inference import shared_predictor, warm_up_all
    from vital_jax.run import load_run, read_config

    figures.check_format(figure_format)
    # Every argument is checked against the run's recorded config and the benchmark files before the model loads.
    config = run.config if run is not None else read_config(checkpoint)
    k_max = int(config.vital.k_max)
    bad = [k for k in latent_steps if k != RECORD_K and not (isinstance(k, int) and 0 <= k <= k_max)]
    if bad:
        raise ValueError(f"latent_steps {bad} outside 0..K_max={k_max} of this run (or {RECORD_K!r})")
    if max_new_tokens is None:
        max_new_tokens = int(config.data.max_answer_tokens)
    split, examples = load_examples(benchmark, data_dir, split, limit, data_format)
    record_steps = record_latent_steps(examples, config) if RECORD_K in latent_steps else None
    k_dirs = {k: os.path.join(out_dir, f"k{k}") if len(latent_steps) > 1 else out_dir for k in latent_steps}
    check_out_dir(out_dir, benchmark, checkpoint, split,
                  {d: {"latent_steps": PER_EXAMPLE_K if k == RECORD_K else k} for k, d in k_dirs.items()},
                  sweep=len([k for k in latent_steps if k != RECORD_K]) > 1)
    if run is None:
        cli.status(f"loading the run in {checkpoint}...")
        run = load_run(checkpoint)
    n_timed = len(examples) if latency_examples is None else min(max(latency_examples, 1), len(examples))
    predictor = shared_predictor(run, batch_size, max_new_tokens)
    batches = [predictor.encode([e.image for e in examples[i:i + batch_size]],
                                [e.prompt for e in examples[i:i + batch_size]])
               for i in range(0, len(examples), batch_size)]
    # The compiled program depends on the number of latent slots only; "record" runs the run's K cap of slots.
    slots = {k: (max(record_steps) if k == RECORD_K else k) for k in latent_steps}
    cli.status(f"compiling generation for K in {sorted(set(slots.values()))} (one program per prompt length)...")
    programs = sorted(set(slots.values()))
    calls = predictor.warm_up_calls(batches, programs)
    single, singles = predictor, []
    if batch_size != 1 and n_timed:
        single = shared_predictor(run, 1, max_new_tokens)
        singles = [single.encode([e.image], [e.prompt]) for e in examples[:n_timed]]
        calls += single.warm_up_calls(singles, programs)
    warm_up_all(calls)
    summaries, sweep = [], []
    for k in latent_steps:
        logging.info("evaluating %s (%d examples) at K=%s, max_new_tokens=%d", benchmark, len(examples), k,
                     max_new_tokens)

        def steps_of(start, n, k=k):
            return None if k != RECORD_K else record_steps[start:start + n]

        def predict(encoded, n, start, predictor_=predictor, k=k):
            answers, _, ms = predictor_.run_encoded(encoded, n, slots[k], steps_of(start, n))
            return answers, ms

        predictions, batched = _answer_all(predict, batches, len(examples), batch_size, f"{benchmark} K={k}")
        latency = _single_latency(lambda enc, n, i, k=k: predict(enc, n, i, single, k), singles, batched,
                                  batch_size, n_timed)
        k_dir = k_dirs[k]
        meta = {"split": split, "checkpoint": os.path.abspath(checkpoint), "step": run.step, "phase": run.phase,
                "finished": run.finished, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "latency_examples": len(latency)}
        summary = write_report(k_dir, benchmark, examples, predictions,
                               latent_steps=record_steps if k == RECORD_K else k,
                               latency_ms=latency + [None] * (len(examples) - len(latency)), meta=meta,
                               batched_ms_per_example=batched, batch_size=batch_size)
        summaries.append(summary)
        if k != RECORD_K:  # the K sweep is over fixed K
            scored = score_lib.score(examples, predictions)
            phases = None
            if latency_breakdown:
                timed = singles if singles else batches[:n_timed]
                per_example = [single.phase_latency(enc, k) for enc, _ in timed[:len(latency)]]
                phases = {name: sum(p[name] for p in per_example) / len(per_example) for name in per_example[0]}
            sweep.append(KSweepPoint.from_scores(k, scored, latency, batched, batch_size, phases))
    if len(sweep) > 1:
        write_k_sweep(out_dir, sweep, figure_format=figure_format)
    if len(summaries) > 1:  # a K sweep, or one K beside each question's own (record) K
        write_summary(out_dir, summaries)
    return summaries



def evaluate_medsynapse(checkpoint: str, benchmark: str, data_dir: str, out_dir: str, memories: list[str],
                        split: str | None = None, limit: int | None = None, batch_size: int = 4,
                        max_new_tokens: int | None = None, trained=None,
                        latency_examples: int | None = DEFAULT_LATENCY_EXAMPLES,
                        data_format: str = "auto") -> list[dict]:
    """Evaluate a MedSynapse-V run (`config.method = "medsynapse"`) with each memory branch in `memories`:
    "autonomous" (the deployed model: backbone + LoRA + A_psi, no encoder) and/or "sampler" (the teacher branch,
    P_phi over E_ana's features; E_ana runs on each image). Same benchmarks, metrics, floors and report files as
    `evaluate`; with several branches each writes into out_dir/<memory>/. Returns the per-branch summaries."""
    from vital_jax.eval import write_report
    from vital_jax.medsynapse import predict as predict_lib
    from vital_jax.medsynapse import trainer

    config = trained.config if trained is not None else trainer.read_config(checkpoint)
    done = trained.stages_done if trained is not None else tuple(trainer.finished_stages(checkpoint, config))
    for memory in memories:
        predict_lib.check_memory(memory, done)
    if max_new_tokens is None:
        max_new_tokens = int(config.data.max_answer_tokens)
    split, examples = load_examples(benchmark, data_dir, split, limit, data_format)
    memory_dirs = {m: os.path.join(out_dir, m) if len(memories) > 1 else out_dir for m in memories}
    check_out_dir(out_dir, benchmark, checkpoint, split, {d: {"memory": m} for m, d in memory_dirs.items()},
                  sweep=False)
    if trained is None:
        cli.status(f"loading the MedSynapse-V run in {checkpoint}...")
        trained = trainer.load_trained(checkpoint)
    n_timed = len(examples) if latency_examples is None else min(max(latency_examples, 1), len(examples))
    summaries = []
    for memory in memories:
        def make(size, memory=memory):  # built once per run: a later split's evaluation reuses its programs
            return predict_lib.shared_predictor(trained, memory, size, max_new_tokens)

        predictor = make(batch_size)
        batches = [predictor.encode([e.image for e in examples[i:i + batch_size]],
                                    [e.prompt for e in examples[i:i + batch_size]])
                   for i in range(0, len(examples), batch_size)]
        cli.status(f"compiling generation with memory={memory} (one program per prompt length)...")
        predictor.warm_up(batches)
        single, singles = predictor, []
        if batch_size != 1 and n_timed:
            single = make(1)
            singles = [single.encode([e.image], [e.prompt]) for e in examples[:n_timed]]
            single.warm_up(singles)
        logging.info("evaluating %s (%d examples) with memory=%s, max_new_tokens=%d", benchmark, len(examples),
                     memory, max_new_tokens)
        predictions, batched = _answer_all(lambda enc, n, start: predictor.run_encoded(enc, n), batches,
                                           len(examples), batch_size, f"{benchmark} memory={memory}")
        latency = _single_latency(lambda enc, n, i: single.run_encoded(enc, n), singles, batched, batch_size,
                                  n_timed)
        meta = {"split": split, "checkpoint": os.path.abspath(checkpoint), "method": "medsynapse",
                "memory": memory, "memory_position": trainer.memory_position(trained.config),
                "stages": list(trained.stages_done), "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "latency_examples": len(latency)}
        summaries.append(write_report(memory_dirs[memory], benchmark,
                                      examples, predictions, latency_ms=latency + [None] * (len(examples) -
                                                                                            len(latency)),
                                      meta=meta, batched_ms_per_example=batched, batch_size=batch_size))
    return summaries


def main(argv):
    from vital_jax.eval.errors import BenchmarkError
    from vital_jax.eval.report import ACCURACY_MEANS, headline_text
    from vital_jax.models.hf_config import ConfigError
    from vital_jax.checkpoint import CheckpointError
    from vital_jax.run import read_config

    cli.no_positional(argv)
    cli.require(checkpoint=_CHECKPOINT.value, benchmark=_BENCHMARK.value, data_dir=_DATA_DIR.value, out=_OUT.value)
    cli.require_directories(out=_OUT.value)
    cli.quiet_libraries()
    cli.tune_host_memory()
    common = dict(split=_SPLIT.value, limit=_LIMIT.value, batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value,
                  latency_examples=None if _LATENCY_N.value < 0 else _LATENCY_N.value,
                  data_format=_DATA_FORMAT.value)
    try:
        config = read_config(_CHECKPOINT.value)  # the recorded config: no model loaded yet
        if config.get("method", "vital") == "medsynapse":
            if _LATENT_STEPS.value is not None or _K_SWEEP.value or _RECORD_K.value:
                cli.usage("a MedSynapse-V run has no latent steps: give --memory=autonomous and/or sampler "
                          "instead of --latent_steps / --k_sweep / --record_k")
            if not _MEMORY.value:
                cli.usage("give --memory=autonomous (the deployed model, no encoder), --memory=sampler (P_phi over "
                          "E_ana's features) or --memory=autonomous,sampler (explicitly; it is never inferred)")
            summaries = evaluate_medsynapse(_CHECKPOINT.value, _BENCHMARK.value, _DATA_DIR.value, _OUT.value,
                                            list(_MEMORY.value), **common)
        else:
            if _MEMORY.value:
                cli.usage("--memory is for MedSynapse-V runs; this is a VITAL run: give --latent_steps=K")
            if _BREAKDOWN.value and not _K_SWEEP.value:
                cli.usage("--latency_breakdown is the K sweep's Figure 4(b): give it with --k_sweep")
            if _LATENT_STEPS.value is None and not _K_SWEEP.value and not _RECORD_K.value:
                cli.usage("give --latent_steps=K (explicitly; it is never inferred), --k_sweep or --record_k")
            k_max = int(config.vital.k_max)
            ks = list(range(k_max + 1)) if _K_SWEEP.value else [_LATENT_STEPS.value]
            ks = [k for k in ks if k is not None] + ([RECORD_K] if _RECORD_K.value else [])
            summaries = evaluate(_CHECKPOINT.value, _BENCHMARK.value, _DATA_DIR.value, _OUT.value, ks,
                                 figure_format=_FIGURE_FORMAT.value, latency_breakdown=_BREAKDOWN.value, **common)
    except (ConfigError, CheckpointError, BenchmarkError, ValueError, FileNotFoundError) as e:
        cli.fail(e)
    for s in summaries:
        print(headline_text(s))
    print(f"({ACCURACY_MEANS})")
    print(f"reports written to {os.path.abspath(_OUT.value)}")
    return 0


def _define_flags():
    """Flags exist only when this module runs as a program (importing it defines none)."""
    global _CHECKPOINT, _BENCHMARK, _DATA_DIR, _SPLIT, _LATENT_STEPS, _K_SWEEP, _OUT, _LIMIT, _BATCH, _MAX_NEW
    global _LATENCY_N, _DATA_FORMAT, _RECORD_K, _FIGURE_FORMAT, _MEMORY, _BREAKDOWN
    from vital_jax.eval.figures import FORMATS

    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a training workdir (python -m vital_jax.train --workdir)")
    _BENCHMARK = flags.DEFINE_string("benchmark", None, "benchmark name (vqa_rad, slake, pathvqa, pmc_vqa, in_domain, "
                                     "phantom_vqa, jsonl)")
    _DATA_DIR = flags.DEFINE_string("data_dir", None, "the benchmark's data directory")
    _DATA_FORMAT = flags.DEFINE_enum("data_format", "auto", ["auto", "release", "hf"],
                                     "vqa_rad/slake/pathvqa/pmc_vqa: the original release files or a Hugging Face "
                                     "parquet/arrow copy (auto: the release when there is one)")
    _SPLIT = flags.DEFINE_string("split", None, "benchmark split (default: test; test_clean for pmc_vqa, whose "
                                 "2,000 questions Table 1 fits; --split=test reads PMC-VQA's full test.csv)")
    _LATENT_STEPS = flags.DEFINE_integer("latent_steps", None, "K, the number of latent steps (0 = plain VLM answer)")
    _K_SWEEP = flags.DEFINE_bool("k_sweep", False, "evaluate every K = 0..K_max and write k_sweep.json and "
                                 "its figure")
    _BREAKDOWN = flags.DEFINE_bool("latency_breakdown", False, "with --k_sweep: also time each K's prefill, latent "
                                   "steps and decoding on the latency examples (Figure 4b; two more compiled "
                                   "programs per prompt width and K)")
    _MEMORY = flags.DEFINE_list("memory", None, "MedSynapse-V runs: the memory branch(es) to answer with, "
                                "autonomous (backbone + LoRA + A_psi, no encoder) and/or sampler (P_phi over "
                                "E_ana's features)")
    _RECORD_K = flags.DEFINE_bool("record_k", False, "also answer each question with its own record's K (the K it "
                                  "was trained with; in_domain / phantom_vqa only): a diagnostic beside fixed K")
    _OUT = flags.DEFINE_string("out", None, "output directory")
    _LIMIT = flags.DEFINE_integer("limit", None, "evaluate only the first N examples", lower_bound=1)
    _BATCH = flags.DEFINE_integer("batch_size", 4, "examples per generation batch (batched_ms_per_example)",
                                  lower_bound=1)
    _MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "answer length limit (default: the run's training "
                                    "answer budget, config data.max_answer_tokens)", lower_bound=1)
    _LATENCY_N = flags.DEFINE_integer("latency_examples", DEFAULT_LATENCY_EXAMPLES,
                                      "examples timed one at a time (batch 1) for latency_ms; -1: all",
                                      lower_bound=-1)
    _FIGURE_FORMAT = flags.DEFINE_enum("figure_format", "png", list(FORMATS), "format of the K-sweep figure")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
