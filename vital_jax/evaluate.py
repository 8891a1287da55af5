"""Evaluate a trained VITAL run on a medical VQA benchmark (Appendix B.4 metrics), at one K or a K sweep.

    python -m vital_jax.evaluate --checkpoint=WORKDIR --benchmark=vqa_rad --data_dir=DIR --latent_steps=4 --out=DIR
    python -m vital_jax.evaluate --checkpoint=WORKDIR --benchmark=in_domain --data_dir=DATASET --k_sweep --out=DIR

Benchmarks: vqa_rad, slake, pathvqa, pmc_vqa, in_domain, jsonl (see vital_jax.eval.benchmarks). Writes
`<benchmark>.predictions.jsonl`, `<benchmark>.metrics.json`, `<benchmark>.metrics.md` (per K with --k_sweep, plus
`k_sweep.json` / `k_sweep.png`: accuracy and per-sample latency against K, the analogue of the paper's Figure 4).
K is always explicit and logged; it is never inferred from the checkpoint.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging



def evaluate(checkpoint: str, benchmark: str, data_dir: str, out_dir: str, latent_steps: list[int],
             split: str = "test", limit: int | None = None, batch_size: int = 4, max_new_tokens: int = 32,
             run=None) -> list[dict]:
    """Evaluate at each K in `latent_steps`; returns the per-K summaries (and writes the report files)."""
    from vital_jax.eval import KSweepPoint, load_benchmark, write_k_sweep, write_report, write_summary
    from vital_jax.eval import metrics as score_lib
    from vital_jax.inference import Predictor, load_run
    from vital_jax.observability import ProgressReporter

    run = run or load_run(checkpoint)
    k_max = run.model.config.k_max
    bad = [k for k in latent_steps if not 0 <= k <= k_max]
    if bad:
        raise ValueError(f"latent_steps {bad} outside 0..K_max={k_max} of this run")
    examples = load_benchmark(benchmark, data_dir, split=split, limit=limit)
    if not examples:
        raise ValueError(f"{benchmark} in {data_dir}: split {split!r} has no examples")
    predictor = Predictor(run, batch_size=batch_size, max_new_tokens=max_new_tokens)
    batches = [predictor.encode([e.image for e in examples[i:i + batch_size]],
                                [e.prompt for e in examples[i:i + batch_size]])
               for i in range(0, len(examples), batch_size)]
    predictor.warm_up(batches, latent_steps)
    summaries, sweep = [], []
    for k in latent_steps:
        logging.info("evaluating %s (%d examples) at K=%d", benchmark, len(examples), k)
        predictions, latencies = [], []
        progress = ProgressReporter(len(examples), desc=f"{benchmark} K={k}", every=max(1, len(examples) // 10))
        for prefix, n in batches:
            answers, _, ms = predictor.run_encoded(prefix, n, k)
            predictions += answers
            latencies += [ms] * n
            progress.update(len(predictions))
        progress.close()
        k_dir = os.path.join(out_dir, f"k{k}") if len(latent_steps) > 1 else out_dir
        summary = write_report(k_dir, benchmark, examples, predictions, latent_steps=k, latency_ms=latencies,
                               meta={"split": split, "checkpoint": os.path.abspath(checkpoint), "step": run.step})
        summaries.append(summary)
        per_example = score_lib.score(examples, predictions)["per_example"]
        sweep.append(KSweepPoint.from_run(k, [e.correct for e in per_example], latencies))
    if len(latent_steps) > 1:
        write_k_sweep(out_dir, sweep)
        write_summary(out_dir, summaries)
    return summaries


def main(argv):
    del argv
    for name, flag in (("checkpoint", _CHECKPOINT), ("benchmark", _BENCHMARK), ("data_dir", _DATA_DIR),
                       ("out", _OUT)):
        if flag.value is None:
            raise app.UsageError(f"--{name} is required")
    if _LATENT_STEPS.value is None and not _K_SWEEP.value:
        raise app.UsageError("give --latent_steps=K (explicitly; it is never inferred) or --k_sweep")
    from vital_jax.inference import load_run

    run = load_run(_CHECKPOINT.value)
    ks = list(range(run.model.config.k_max + 1)) if _K_SWEEP.value else [_LATENT_STEPS.value]
    summaries = evaluate(_CHECKPOINT.value, _BENCHMARK.value, _DATA_DIR.value, _OUT.value, ks, _SPLIT.value,
                         _LIMIT.value, _BATCH.value, _MAX_NEW.value, run=run)
    for s in summaries:
        print(json.dumps({k: v for k, v in s.items() if not isinstance(v, (list, dict))}))
    print(f"reports written to {os.path.abspath(_OUT.value)}")
    return 0


def _define_flags():
    """Flags exist only when this module runs as a program (importing it defines none)."""
    global _CHECKPOINT, _BENCHMARK, _DATA_DIR, _SPLIT, _LATENT_STEPS, _K_SWEEP, _OUT, _LIMIT, _BATCH, _MAX_NEW
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a training workdir (python -m vital_jax.train --workdir)")
    _BENCHMARK = flags.DEFINE_string("benchmark", None, "benchmark name (vqa_rad, slake, pathvqa, pmc_vqa, in_domain, "
                                     "jsonl)")
    _DATA_DIR = flags.DEFINE_string("data_dir", None, "the benchmark's data directory")
    _SPLIT = flags.DEFINE_string("split", "test", "benchmark split")
    _LATENT_STEPS = flags.DEFINE_integer("latent_steps", None, "K, the number of latent steps (0 = plain VLM answer)")
    _K_SWEEP = flags.DEFINE_bool("k_sweep", False, "evaluate every K = 0..K_max and write k_sweep.json/png")
    _OUT = flags.DEFINE_string("out", None, "output directory")
    _LIMIT = flags.DEFINE_integer("limit", None, "evaluate only the first N examples")
    _BATCH = flags.DEFINE_integer("batch_size", 4, "examples per generation batch")
    _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "answer length limit")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
