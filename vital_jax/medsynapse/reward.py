"""The composite reward of Stage II (§2.3): R(o) = lambda_acc * r_acc(o) + lambda_causal * r_causal(o).

r_acc (Eq. 4) = 1[answer(o) = y*], computed on the host from decoded text with the project's one answer normaliser
(`vital_jax.eval.metrics.normalize_answer`), so a reward of 1 means what a correct answer means in evaluation.
answer(o) is the whole decoded completion (special tokens skipped): Stage II prompts ask for the answer itself.

r_causal (Eq. 5) = sum_t log pi(o_t | M) - log pi(o_t | M'), from the two teacher-forced log-prob rows the GRPO
scorer computes with the original memory M and the interventional M' stacked on the batch axis (`grpo.py`).

Where the paper is silent, and the choices made (each a config option):
* Open-ended answers (the SLAKE / PathVQA part of the RL set): Eq. (4) is an indicator, so exact match of the
  normalised answer is the default for every example. `open_ended_match="f1"` gives open-ended examples the
  token-level F1 of evaluation instead (a dense reward in [0, 1]; exact match is rare for free text).
  `closed_match="closed"` scores closed-ended examples as evaluation does instead of strict equality: against the
  ground truth and options the in-domain benchmarks pose the record with (`eval.benchmarks.closed_question`: "Yes,
  the liver is visible." is "yes" of yes / no), by `metrics.in_domain_correct` (a yes/no by the polarity it
  states, a choice by the only option it names).
* r_causal's reduction: "sum" (default, Eq. 5 as written) or "mean_clipped" (the authors' public skeleton: the sum
  divided by the completion length, then clipped to +-`causal_clip`, 5 there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from vital_jax.eval.metrics import in_domain_correct, normalize_answer, token_f1

CAUSAL_REDUCTIONS = ("sum", "mean_clipped")
CLOSED_MATCHES = ("exact", "closed")
OPEN_MATCHES = ("exact", "f1")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Paper defaults: lambda_acc 1.0, lambda_causal 0.5, plain sum in Eq. (5)."""

    lambda_acc: float = 1.0
    lambda_causal: float = 0.5
    causal_reduction: str = "sum"
    causal_clip: float = 5.0  # only for "mean_clipped"
    closed_match: str = "exact"
    open_ended_match: str = "exact"

    def __post_init__(self):
        if self.causal_reduction not in CAUSAL_REDUCTIONS:
            raise ValueError(f"causal_reduction must be one of {CAUSAL_REDUCTIONS}, got {self.causal_reduction!r}")
        if self.closed_match not in CLOSED_MATCHES:
            raise ValueError(f"closed_match must be one of {CLOSED_MATCHES}, got {self.closed_match!r}")
        if self.open_ended_match not in OPEN_MATCHES:
            raise ValueError(f"open_ended_match must be one of {OPEN_MATCHES}, got {self.open_ended_match!r}")


def causal_reward(log_probs_m: jnp.ndarray, log_probs_m_prime: jnp.ndarray, valid: jnp.ndarray,
                  reduction: str = "sum", clip: float = 5.0) -> jnp.ndarray:
    """r_causal of Eq. (5) per trajectory (R,) float32 from per-token log-probs (R, T) under M and M' and the
    completion mask (R, T). "sum": the paper; "mean_clipped": divided by the length, clipped to [-clip, clip]."""
    if reduction not in CAUSAL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {CAUSAL_REDUCTIONS}, got {reduction!r}")
    diff = jnp.where(valid, log_probs_m.astype(jnp.float32) - log_probs_m_prime.astype(jnp.float32), 0.0)
    total = diff.sum(axis=-1)
    if reduction == "sum":
        return total
    return jnp.clip(total / jnp.maximum(valid.sum(axis=-1), 1), -clip, clip)


def combine(r_acc: jnp.ndarray, r_causal: jnp.ndarray, config: RewardConfig) -> jnp.ndarray:
    """R = lambda_acc * r_acc + lambda_causal * r_causal, elementwise (R,) float32."""
    return (config.lambda_acc * jnp.asarray(r_acc, jnp.float32)
            + config.lambda_causal * jnp.asarray(r_causal, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Reference:
    """What one prompt's completions are scored against: y* (`answer`), whether the question is open-ended, and for a
    closed one scored as evaluation does (`closed_match="closed"`) the options and target that
    `metrics.in_domain_correct` takes (`answer` then being the option that is right)."""

    answer: str
    open_ended: bool = False
    options: tuple[str, ...] = ()
    target: str = ""


def accuracy_reward(prediction: str, answer: str, open_ended: bool = False, config: RewardConfig = RewardConfig(),
                    options: Sequence[str] = (), target: str = "") -> float:
    """r_acc of Eq. (4) for one decoded completion against the reference answer y* (options / target: `Reference`)."""
    if open_ended and config.open_ended_match == "f1":
        return float(token_f1(prediction, answer))
    if not open_ended and config.closed_match == "closed":
        return float(in_domain_correct(prediction, answer, options, target or None))
    return float(normalize_answer(prediction) == normalize_answer(answer))


def text_accuracy_fn(decode: Callable[[list[int]], str], references: Sequence[Reference], num_generations: int,
                     config: RewardConfig = RewardConfig()) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The host-side r_acc of one rollout batch: (tokens (B*G, T), lengths (B*G,)) -> r_acc (B*G,) float32.

    decode: token ids -> text (e.g. a tokenizer's decode with special tokens skipped). references: those of the B
    prompts; trajectory b * G + g answers prompt b. Tokens past each length (after EOS) are ignored.
    """
    references = list(references)

    def fn(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        if tokens.shape[0] != len(references) * num_generations:
            raise ValueError(f"{tokens.shape[0]} trajectories for {len(references)} prompts x G={num_generations}")
        out = np.zeros((tokens.shape[0],), np.float32)
        for r in range(tokens.shape[0]):
            ref = references[r // num_generations]
            text = decode([int(t) for t in tokens[r, :int(lengths[r])]])
            out[r] = accuracy_reward(text, ref.answer, ref.open_ended, config, ref.options, ref.target)
        return out

    return fn
