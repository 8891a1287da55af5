"""Stage III of MedSynapse-V, Intrinsic Memory Transition (§2.4, Eq. 6-8): only A_psi trains.

For each example one on-policy trajectory y^ ~ pi^- = pi_theta(. | X, q, M_auto) is sampled from the student
branch; both branches then score it teacher forced, and the loss is the generalised Jensen-Shannon divergence
(Eq. 8) between their full-vocabulary next-token distributions at every position of y^, averaged over the
trajectory (Eq. 7):

    L_IMT(psi) = mean over examples of  1/|y^| sum_n JSD_beta(pi^+(. | y^_<n) || pi^-(. | y^_<n))
    pi^+: memory M_pri = P_phi(E_ana(X))  (teacher, privileged)     pi^-: M_auto = A_psi(Enc_VLM(X))  (student)

Both branches share the backbone theta (Stage II's, LoRA merged or not). The teacher is a fixed target: its
memory and its logits are under stop_gradient. The trajectory is data: sampling is not differentiated (as in
on-policy distillation generally). The trainable tree holds psi alone (`freeze.split`), so theta and phi get no
gradient computation and no optimizer state. E_ana is not an input: the batch carries F = E_ana(X), as in Stage I.

One step is one compiled program that shares all the work the branches have in common: the vision tower runs once
(its merged tokens feed A_psi and the prefill), the prompt is prefilled once into a cache of Tp + N + T slots, and
the three branches continue from that cache: rollout (M_auto block, then sampled decoding), teacher scoring (M_pri
block, y^ teacher forced) and student scoring (M_auto block, y^ teacher forced, differentiated). Each branch is
`memory.inject`'s path (prefill, then the memory block through `cached.append_embeddings`); the tests hold them
equal to `memory.answer_logits` and `memory.generate`.

Paper settings: beta = 0.5, lr 1e-4, 3 epochs, one trajectory per example per gradient step, Stage II's data.
Where the paper is silent (all the caller's choice): the rollout samples at temperature 1 (y^ ~ pi^- itself, not
greedy) up to Stage II's 1,024 tokens (`rollout_sampling`); a trajectory ends at its first EOS, which counts, and
later positions do not; the per-trajectory mean of Eq. (7) is averaged over the batch's valid examples; AdamW as
in Stage I (global-norm clip 1.0, weight decay 0.01 on kernels and A_psi's queries).

Memory matching (`memory_match` w > 0, off by default; not in the paper): the loss adds w times the relative
squared error of the student's memory against the teacher's, ||M_auto - M_pri||^2 / ||M_pri||^2 per example (over
its N x D block), averaged over valid examples. Eq. (7) compares the two branches only through the answer
distributions they induce; on PhantomVQA that left A_psi's memories nearly orthogonal to P_phi's at a matching
JSD (README, "Where the deployed model goes wrong"), and this term asks for the teacher's memory itself.

Memory: both branches' logits are (B, T, V) float32 at every position (the full vocabulary is the point of Eq. 7):
at 8B with T = 1,024 that is 0.6 GB per example and branch, so shard the batch or lower max_new_tokens.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vital_jax import freeze, generation, sharding
from vital_jax.layers.kv_cache import KVCache
from vital_jax.medsynapse import autonomous as autonomous_lib
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse.autonomous import AutonomousMemory
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler
from vital_jax.medsynapse.stage1 import TrainState
from vital_jax.models.qwen3_vl import cached
from vital_jax.models.qwen3_vl.cached import PrefixInputs
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration

BETA = 0.5
LEARNING_RATE = 1e-4
EPOCHS = 3
MAX_NEW_TOKENS = 1024  # the paper's max generation length (Stage II), reused for Stage III's rollouts
# How A_psi starts (the paper is silent): "random", or "teacher_mean" (`autonomous.teacher_mean_init`).
INITS = ("random", "teacher_mean")


def rollout_sampling(eos_token_ids: tuple[int, ...], max_new_tokens: int = MAX_NEW_TOKENS,
                     temperature: float = 1.0) -> generation.SamplingConfig:
    """On-policy sampling of y^ ~ pi^-: temperature 1, no top-k / top-p filtering (they would change pi^-)."""
    return generation.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                     eos_token_ids=tuple(eos_token_ids))


def generalized_jsd(teacher_logits: jax.Array, student_logits: jax.Array, beta: float = BETA) -> jax.Array:
    """Eq. (8), the generalised Jensen-Shannon divergence, over the last (vocabulary) axis, in nats.

    JSD_beta(pi^+ || pi^-) = beta KL(pi^+ || m) + (1 - beta) KL(pi^- || m),  m = beta pi^+ + (1 - beta) pi^-,
    with pi^+ = softmax(teacher_logits), pi^- = softmax(student_logits). (..., V), (..., V) -> (...) float32.
    Logits must be finite. Computed from log-softmaxes with log m = logaddexp(log beta + log pi^+,
    log(1 - beta) + log pi^-), so no probability is divided by.

    Properties (tested): >= 0; zero iff pi^+ = pi^-; <= h(beta) = -beta ln beta - (1 - beta) ln(1 - beta), which
    is ln 2 at beta = 0.5 and is approached by distributions with disjoint supports. Limits: Eq. (8) vanishes at
    beta = 0 and at beta = 1 (m collapses onto the branch whose term keeps weight 1); it is returned as exactly
    zero there. Divided by its weight it interpolates the two KL directions: JSD_beta / beta -> KL(pi^+ || pi^-)
    as beta -> 0 and JSD_beta / (1 - beta) -> KL(pi^- || pi^+) as beta -> 1. (The GKD/TRL convention that
    redefines beta = 0 and 1 as those KLs is not used: beta here is exactly the paper's.)
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher {teacher_logits.shape} and student {student_logits.shape} logits differ")
    if beta in (0.0, 1.0):
        return jnp.zeros(teacher_logits.shape[:-1], jnp.float32)
    logp_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_m = jnp.logaddexp(math.log(beta) + logp_t, math.log1p(-beta) + logp_s)
    kl_t = jnp.sum(jnp.exp(logp_t) * (logp_t - log_m), axis=-1)
    kl_s = jnp.sum(jnp.exp(logp_s) * (logp_s - log_m), axis=-1)
    return beta * kl_t + (1.0 - beta) * kl_s


@flax.struct.dataclass
class IMTBatch:
    """prefix: image + question (B, Tp), left-padded; feature_map: E_ana(X) (B, H_f, W_f, d_f), the teacher's
    input; example_valid (B,) bool. No reference answer: the trajectory is the student's own."""

    prefix: PrefixInputs
    feature_map: jax.Array
    example_valid: jax.Array


@flax.struct.dataclass
class PromptState:
    """What every branch shares: the prefix carrying its image features, the student's input (visual tokens
    (B, Tp, D) + valid (B, Tp)), and the prompt cache (Tp + N + T slots) with its last post-norm state (B, D).
    tail_ids (B, S) or None: the prompt's last tokens, not yet in the cache, that each branch writes after its
    memory (`memory.split_prompt`)."""

    prefix: PrefixInputs
    visual_tokens: jax.Array
    visual_valid: jax.Array
    kv_cache: KVCache
    last_hidden: jax.Array
    tail_ids: jax.Array | None = None


def encode_prompt(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                  num_memory: int, max_new_tokens: int, prompt_tail: int = 0) -> PromptState:
    """Run the vision tower once and prefill the prompt into a cache with room for N memory slots and T tokens
    (with prompt_tail > 0 only its head: `memory.inject`)."""
    prefix, tokens, valid = autonomous_lib.visual_tokens(backbone, backbone_params, prefix)
    cache_len = prefix.input_ids.shape[1] + num_memory + max_new_tokens
    head, tail_ids = memory_lib.split_prompt(prefix, prompt_tail if num_memory else 0)
    kv_cache, last_hidden = cached.encode_prefix(backbone, backbone_params, head, cache_len)
    return PromptState(prefix, tokens, valid, kv_cache, last_hidden, tail_ids)


def _with_memory(backbone, backbone_params, prompt: PromptState, memory: jax.Array) -> tuple[KVCache, jax.Array]:
    """`memory.inject` continued from the shared prompt cache: the memory block (and the prompt's tail), then the
    state of its last slot."""
    return memory_lib.write_memory(backbone, backbone_params, prompt.kv_cache, prompt.last_hidden, memory,
                                   prompt.tail_ids)


def _score(backbone, backbone_params, prompt: PromptState, memory, tokens, valid) -> jax.Array:
    kv_cache, last_hidden = _with_memory(backbone, backbone_params, prompt, memory)
    return cached.teacher_forced_logits(backbone, backbone_params, kv_cache, last_hidden, tokens, valid)


def student_memory(autonomous: AutonomousMemory, autonomous_params, prompt: PromptState) -> jax.Array:
    """M_auto = A_psi(Enc_VLM(X)) (B, N, D) float32."""
    return autonomous.apply({"params": autonomous_params}, prompt.visual_tokens, prompt.visual_valid)


def teacher_memory(sampler: DiagnosticMemorySampler, sampler_params, feature_map: jax.Array) -> jax.Array:
    """M_pri = P_phi(E_ana(X)) (B, N, D) float32, a fixed target (stop_gradient)."""
    return jax.lax.stop_gradient(sampler.apply({"params": sampler_params}, feature_map))


def sample_trajectory(backbone: Qwen3VLForConditionalGeneration, autonomous: AutonomousMemory, params: dict,
                      prompt: PromptState, sampling: generation.SamplingConfig,
                      rng=None, relayout: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """y^ ~ pi^-(. | X, q, M_auto) from the shared prompt cache. Returns (tokens (B, T) int32, lengths (B,) int32),
    T = sampling.max_new_tokens; `lengths` counts the tokens up to and including the first EOS. relayout: the
    decode loop's layout (`cached.decode`; None: relaid out unless the mesh splits the weights)."""
    bp = jax.lax.stop_gradient(params["backbone"])
    memory = jax.lax.stop_gradient(student_memory(autonomous, params["autonomous"], prompt))
    kv_cache, last_hidden = _with_memory(backbone, bp, prompt, memory)
    return cached.decode(backbone, bp, kv_cache, last_hidden, sampling, rng, relayout=relayout)


def rollout(backbone: Qwen3VLForConditionalGeneration, autonomous: AutonomousMemory, params: dict,
            prefix: PrefixInputs, sampling: generation.SamplingConfig, rng=None,
            prompt_tail: int = 0) -> tuple[jax.Array, jax.Array]:
    """The student's on-policy trajectory for a batch of prompts: (tokens (B, T) int32, lengths (B,) int32)."""
    prompt = encode_prompt(backbone, params["backbone"], prefix, autonomous.config.num_queries,
                           sampling.max_new_tokens, prompt_tail)
    return sample_trajectory(backbone, autonomous, params, prompt, sampling, rng)


def trajectory_valid(tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """(B, T) bool: the first `lengths[b]` positions of each trajectory."""
    return jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]


def teacher_logits(backbone: Qwen3VLForConditionalGeneration, params: dict, prompt: PromptState,
                   m_pri: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """pi^+ at every position of y^ given M_pri (`teacher_memory`), teacher forced: (B, T, V) float32 under
    stop_gradient."""
    return jax.lax.stop_gradient(_score(backbone, params["backbone"], prompt, m_pri, tokens, valid))


def memory_match_error(memory: jax.Array, target: jax.Array) -> jax.Array:
    """||M_auto - M_pri||^2 / ||M_pri||^2 per example over its (N, D) block: (B, N, D) x 2 -> (B,) float32."""
    memory, target = memory.astype(jnp.float32), jax.lax.stop_gradient(target).astype(jnp.float32)
    return jnp.sum(jnp.square(memory - target), axis=(1, 2)) / jnp.maximum(jnp.sum(jnp.square(target), axis=(1, 2)),
                                                                           1e-12)


def student_loss(backbone: Qwen3VLForConditionalGeneration, autonomous: AutonomousMemory, params: dict,
                 prompt: PromptState, teacher: jax.Array, tokens: jax.Array, valid: jax.Array,
                 example_valid: jax.Array, beta: float = BETA, target_memory: jax.Array | None = None,
                 memory_match: float = 0.0):
    """Eq. (7) given the teacher's logits (B, T, V): the student branch scores y^ with M_auto and is compared
    position by position, plus `memory_match` x the memory-matching error against `target_memory` (M_pri, needed
    when memory_match > 0). Returns (loss, aux) with aux = {"jsd_per_example" (B,), "memory" (B, N, D)} and, with
    a target, "memory_match_per_example" (B,)."""
    if memory_match < 0:
        raise ValueError(f"memory_match must be >= 0, got {memory_match}")
    if memory_match > 0 and target_memory is None:
        raise ValueError("memory_match > 0 needs target_memory (M_pri)")
    memory = student_memory(autonomous, params["autonomous"], prompt)
    student = _score(backbone, params["backbone"], prompt, memory, tokens, valid)
    jsd_bt = jnp.where(valid, generalized_jsd(teacher, student, beta), 0.0)
    per_example = jsd_bt.sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1)
    loss = valid_mean(per_example, example_valid)
    aux = {"jsd_per_example": per_example, "memory": memory}
    if target_memory is not None:
        match = memory_match_error(memory, target_memory)
        aux["memory_match_per_example"] = match
        if memory_match > 0:
            loss = loss + memory_match * valid_mean(match, example_valid)
    return loss, aux


def valid_mean(per_example: jax.Array, example_valid: jax.Array) -> jax.Array:
    """Mean of (B,) values over the valid examples (0 when there are none)."""
    return jnp.where(example_valid, per_example, 0.0).sum() / jnp.maximum(example_valid.sum(), 1)


def imt_loss(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler,
             autonomous: AutonomousMemory, params: dict, batch: IMTBatch, tokens: jax.Array, lengths: jax.Array,
             beta: float = BETA, memory_match: float = 0.0, prompt_tail: int = 0):
    """Eq. (7) in float32 for a given trajectory y^ (tokens (B, T), lengths (B,)), from params {"backbone",
    "sampler", "autonomous"} (+ memory_match x the memory-matching error). Returns (loss, aux) as `student_loss`.
    Differentiable in params["autonomous"] only: the gradient with respect to "sampler" is exactly zero (the
    teacher is stop_gradient)."""
    prompt = encode_prompt(backbone, params["backbone"], batch.prefix, autonomous.config.num_queries,
                           tokens.shape[1], prompt_tail)
    valid = trajectory_valid(tokens, lengths)
    m_pri = teacher_memory(sampler, params["sampler"], batch.feature_map)
    teacher = teacher_logits(backbone, params, prompt, m_pri, tokens, valid)
    return student_loss(backbone, autonomous, params, prompt, teacher, tokens, valid, batch.example_valid, beta,
                        m_pri, memory_match)


def is_trainable(path: str) -> bool:
    """Stage III: A_psi's leaves train; the backbone (with its LoRA) and P_phi are frozen."""
    return path.split("/", 1)[0] == "autonomous"


def _decays(path, x) -> bool:
    return (not freeze.is_masked(x)) and getattr(path[-1], "key", None) in ("kernel", "queries")


def make_optimizer(learning_rate=LEARNING_RATE, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """AdamW with global-norm clipping over psi; weight decay on the kernels and the queries."""
    decay_mask = functools.partial(jax.tree_util.tree_map_with_path, _decays, is_leaf=freeze.is_masked)
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )


def init_train_state(params: dict, optimizer: optax.GradientTransformation, rng: jax.Array) -> tuple[TrainState, dict]:
    """Split {"backbone", "sampler", "autonomous"} into (TrainState over psi in float32, frozen tree)."""
    if set(params) != {"backbone", "sampler", "autonomous"}:
        raise ValueError(f"Stage III params are {{'backbone', 'sampler', 'autonomous'}}, got {sorted(params)}")
    train, frozen = freeze.split(params, freeze.mask_from_predicate(params, is_trainable))
    train = sharding.cast_floating(train, jnp.float32)
    return TrainState(jnp.zeros((), jnp.int32), train, optimizer.init(train), rng), frozen


def train_step(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler,
               autonomous: AutonomousMemory, optimizer: optax.GradientTransformation,
               sampling: generation.SamplingConfig, state: TrainState, frozen: dict, batch: IMTBatch,
               beta: float = BETA, memory_match: float = 0.0, relayout: bool | None = None,
               prompt_tail: int = 0) -> tuple[TrainState, dict]:
    """One on-policy IMT step: sample y^ ~ pi^- with the current psi, score it in both branches, one AdamW step
    on psi. Returns (new state, metrics: loss (mean JSD + memory_match x memory_match_error), jsd,
    memory_match_error (mean relative squared error of M_auto against M_pri, logged whatever its weight),
    grad_norm, trajectory_length, student_memory_rms, teacher_memory_rms, memory_gap_rms (RMS of M_auto - M_pri),
    tokens, trajectory (B, T) int32, lengths (B,))."""
    step_rng = jax.random.fold_in(state.rng, state.step)
    params = freeze.merge(state.params, frozen)
    prompt = encode_prompt(backbone, params["backbone"], batch.prefix, autonomous.config.num_queries,
                           sampling.max_new_tokens, prompt_tail)
    tokens, lengths = sample_trajectory(backbone, autonomous, params, prompt, sampling, step_rng, relayout)
    valid = trajectory_valid(tokens, lengths)
    m_pri = teacher_memory(sampler, params["sampler"], batch.feature_map)
    teacher = teacher_logits(backbone, params, prompt, m_pri, tokens, valid)

    def loss_fn(train_params):
        return student_loss(backbone, autonomous, freeze.merge(train_params, frozen), prompt, teacher, tokens,
                            valid, batch.example_valid, beta, m_pri, memory_match)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_params, opt_state = freeze.apply_update(optimizer, grads, state.opt_state, state.params)
    counted = batch.example_valid
    n_valid = jnp.maximum(counted.sum(), 1)
    metrics = {"loss": loss, "jsd": valid_mean(aux["jsd_per_example"], counted),
               "memory_match_error": valid_mean(aux["memory_match_per_example"], counted),
               "grad_norm": optax.tree.norm(grads),
               "trajectory_length": jnp.where(counted, lengths, 0).sum() / n_valid,
               "tokens": jnp.where(counted, lengths, 0).sum(),
               "student_memory_rms": jnp.sqrt(jnp.mean(jnp.square(aux["memory"]))),
               "teacher_memory_rms": jnp.sqrt(jnp.mean(jnp.square(m_pri))),
               "memory_gap_rms": jnp.sqrt(jnp.mean(jnp.square(aux["memory"] - m_pri))),
               "trajectory": tokens, "lengths": lengths}
    return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state), metrics


def make_train_step(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler,
                    autonomous: AutonomousMemory, optimizer: optax.GradientTransformation,
                    sampling: generation.SamplingConfig, beta: float = BETA, memory_match: float = 0.0,
                    relayout: bool | None = None, prompt_tail: int = 0):
    """`train_step` jitted over (state, frozen, batch); modules, optimizer, sampling, beta, memory_match, the
    rollout's `relayout` (`sample_trajectory`) and the memory's place (`prompt_tail`) are fixed."""
    return jax.jit(functools.partial(train_step, backbone, sampler, autonomous, optimizer, sampling, beta=beta,
                                     memory_match=memory_match, relayout=relayout, prompt_tail=prompt_tail))
