"""Model-agnostic evaluation (App. B.4): benchmark loaders, metrics, report writers and matplotlib figures.

A model runner needs three calls:

    examples = load_benchmark("vqa_rad", data_dir, split="test", limit=None)   # BenchmarkExample list
    predictions = [...]                                                        # one string per example.prompt
    metrics = write_report(out_dir, "vqa_rad", examples, predictions, latent_steps=4, latency_ms=[...])
"""

from vital_jax.eval.benchmarks import (BENCHMARKS, BenchmarkError, BenchmarkExample, load_benchmark,
                                       lettered_prompt)
from vital_jax.eval.metrics import (ExampleScore, closed_correct, headline, in_domain_correct, normalize_answer,
                                    parse_choice_letter, score, score_example, token_f1, token_prf)
from vital_jax.eval.report import (KSweepPoint, write_k_sweep, write_metrics_json, write_metrics_markdown,
                                   write_predictions, write_report, write_summary)

__all__ = [
    "BENCHMARKS", "BenchmarkError", "BenchmarkExample", "ExampleScore", "KSweepPoint", "closed_correct",
    "headline", "in_domain_correct", "lettered_prompt", "load_benchmark", "normalize_answer",
    "parse_choice_letter", "score", "score_example", "token_f1", "token_prf", "write_k_sweep",
    "write_metrics_json", "write_metrics_markdown", "write_predictions", "write_report", "write_summary",
]
