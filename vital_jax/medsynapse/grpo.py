"""Stage II of MedSynapse-V, Causal Counterfactual Refinement (§2.3, Eq. 3-5): GRPO on the backbone's LoRA adapters.

P_phi, the backbone's base weights and the encoder are frozen; only the LoRA adapters theta train. One step:

  rollout  (jitted)  M = P_phi(F), M' = P_phi(F ⊙ B̄) (Eq. 5's intervention: the most confident region zeroed);
                     each prompt is prefilled once ([Enc(X); Enc(q); m_1..m_N] through `memory.inject`), its cache
                     shared by its G completions (`group_cache`: held and read once per prompt), and G completions
                     decoded by the on-device while_loop (`generation.decode`), the policy relaid out for it once per
                     rollout (`rollout_relayout`, `cached.decode`).
  score    (jitted)  one teacher-forced scorer (`score_completions`) gives every log-prob: here log pi(o | M) and
                     log pi(o | M') stacked on the batch axis (after one shared prefill of the prompts), once per
                     rollout batch. The first row is the old policy's log-probs; their difference is r_causal.
  reward   (host)    r_acc from the decoded text (`reward.text_accuracy_fn`), R = 1.0 r_acc + 0.5 r_causal,
                     group-normalised advantages (`group_advantages`).
  update   (jitted)  `num_updates` AdamW steps on Eq. (3) (`policy_loss`), the current log-probs from the same
                     scorer inside the differentiated function.

Trajectory r = b * G + g is completion g of prompt b throughout. Shapes: B prompts, G = `num_generations`,
R = B * G, T = `max_new_tokens`, N memory vectors of width D.

Where the paper is silent, and what this module does (every choice is a `GRPOConfig` / `RewardConfig` field):
* KL penalty: none by default (`kl_beta=0`): Eq. (3) has no KL term. The authors' public skeleton adds one with
  beta = 0.02 (`kl_beta=0.02, kl_estimator="k1"` reproduces its log pi - log pi_ref per token). The default
  estimator for beta > 0 is DeepSeekMath's k3 (exp(d) - d - 1, d = log pi_ref - log pi: non-negative, unbiased).
  It sits inside the per-token mean. The reference policy is the base model, i.e. the same weights with LoRA
  off (`lora_b` zeroed, `without_lora`): no second copy of the backbone.
* Updates per rollout batch: 1 (`num_updates`). With one update the policy that is optimised is the one that
  sampled, so rho = 1 and Eq. (3) is a policy gradient with group-normalised advantages; the clip acts from the
  second update on. Each update uses the whole rollout batch (no mini-batches). A step is one rollout batch
  whatever `num_updates` (the paper's "200 steps with a rollout batch size of 32"): `TrainState.step` counts
  rollout batches, optax's own count (which a learning-rate schedule reads) counts the updates.
* Reward for open-ended answers: exact match of the normalised answer, as Eq. (4) writes it; token F1 is an
  option (`RewardConfig.open_ended_match="f1"`). See `reward.py`, which also offers the skeleton's
  length-normalised, clipped r_causal (`causal_reduction="mean_clipped"`).
* sigma_G: the unbiased group std (ddof 1; DeepSeekMath, TRL and the skeleton use torch's `std`), eps_0 = 1e-6
  (the skeleton's). A group whose rewards are all equal gets advantage exactly 0 (no division of rounding noise)
  and is counted in the metrics (`zero_variance_groups`); with G = 4 and a binary r_acc they are common.
* Eq. (3)'s 1/G mean is taken over all valid trajectories of the rollout batch (the same thing per group, since
  every group has G members); each trajectory's tokens are averaged first (1/|o_i|, EOS included, padding not).
* Sampling: temperature 1 and no top-p / top-k by default, so that trajectories are drawn from pi_theta itself and
  the ratio and advantages need no correction. The skeleton samples at temperature 0.7, top-p 0.95 (set them here
  to match). The scorer always scores the untempered policy. Completions that reach `max_new_tokens` without EOS
  (paper: 1,024) are kept and scored as they are (`truncated_fraction` reports them).
* LoRA dropout is off in Stage II (rollout, scoring and loss all run deterministically): with dropout the loss would
  score a different policy than the one that sampled, and rho would not be 1 at step 0.
* LoRA: rank 64 (paper) on the attention projections q, k, v, o ("applied to all attention layers"), alpha 128
  (the skeleton's; it also adapts the MLP projections: pass another `LoraConfig` to the backbone for that).
  AdamW lr 1e-5, no weight decay, global-norm clipping at 1.0 (the skeleton's; the paper gives none). 200 steps;
  the paper's "rollout batch size of 32" is read as 32 prompts (x G = 4 = 128 trajectories).
* The scorer applies the LM head `logprob_chunk` (128) completion positions at a time, each chunk rematerialised
  in the backward pass: the float32 logits of a whole rollout batch (128 x 1,024 x 151,936) would not fit.
* The log-ratio is clipped to +-`max_log_ratio` (20) before exp: it only guards against inf, and the old-policy
  log-probs come from the scorer, not from the sampler, so the two never drift apart by numerics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vital_jax import freeze, generation, sharding
from vital_jax.layers.kv_cache import KVCache
from vital_jax.layers.linear import LORA_A_INIT, LoraConfig
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse import reward as reward_lib
from vital_jax.medsynapse.encoder import counterfactual_keep_mask, intervene
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler
from vital_jax.medsynapse.stage1 import TrainState
from vital_jax.models.hf_mapping import flatten, unflatten
from vital_jax.models.qwen3_vl import cached
from vital_jax.models.qwen3_vl.cached import PrefixInputs
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from vital_jax.models.qwen3_vl.params import abstract_params

STAGE2_LORA = LoraConfig(rank=64, alpha=128.0, dropout=0.0, targets=("q", "k", "v", "o"))
LEARNING_RATE = 1e-5
TRAIN_STEPS = 200
ROLLOUT_PROMPTS = 32
KL_ESTIMATORS = ("k3", "k1")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Paper values: G = 4, eps = 0.2, 1,024 new tokens, R = 1.0 r_acc + 0.5 r_causal; the rest: module docstring."""

    num_generations: int = 4
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    clip_epsilon: float = 0.2
    advantage_epsilon: float = 1e-6
    std_ddof: int = 1
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    num_updates: int = 1
    max_log_ratio: float = 20.0
    counterfactual_top_k: int = 1  # regions removed for M' (Eq. 5: the highest-confidence one)
    logprob_chunk: int = 128  # completion positions per LM-head chunk in the scorer (0: all at once)
    # Decode the rollouts in the decoding layout (`cached.decode`'s relayout): one copy of the text weights per
    # rollout instead of one per token under `scan_layers`. None: unless the mesh splits the weights; False saves
    # the copy's memory.
    rollout_relayout: bool | None = None
    # Rollouts and the scorer keep each prompt's cache once for its G completions (`KVCache.share_prefix`;
    # attention reads it once per prompt). False: every completion gets its own copy of the prompt's cache
    # (`repeat_cache`), G times the memory and reads for the prompt part; the same numbers up to float32 rounding.
    shared_prompt_cache: bool = True
    # Where the memory sits: the prompt's last `prompt_tail` tokens follow it (`memory.inject`; 0: after the prompt).
    prompt_tail: int = 0
    reward: reward_lib.RewardConfig = reward_lib.RewardConfig()

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"GRPO needs num_generations >= 2 to normalise within a group, got "
                             f"{self.num_generations}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.num_updates < 1:
            raise ValueError(f"num_updates must be >= 1, got {self.num_updates}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def sampling(self) -> generation.SamplingConfig:
        return generation.SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                         top_k=self.top_k, top_p=self.top_p, eos_token_ids=self.eos_token_ids,
                                         pad_token_id=self.pad_token_id)


@flax.struct.dataclass
class PromptBatch:
    """One rollout batch of B prompts.

    prefix: image + question (B, Tp), left-padded; feature_map: F = E_ana(X) (B, Hf, Wf, df);
    region_masks (B, R, Hf, Wf) bool, region_confidence (B, R), region_valid (B, R) bool: the candidate regions of
    Eq. (5) (`encoder.stack_region_masks`); example_valid (B,) bool (False rows are batch padding: no reward, no
    loss).
    """

    prefix: PrefixInputs
    feature_map: jax.Array
    region_masks: jax.Array
    region_confidence: jax.Array
    region_valid: jax.Array
    example_valid: jax.Array


@flax.struct.dataclass
class Rollout:
    """memory / counterfactual_memory: M and M' (B, N, D) float32; tokens (R, T) int32 (pad after EOS);
    valid (R, T) bool (the completion mask, EOS included); lengths (R,) int32."""

    memory: jax.Array
    counterfactual_memory: jax.Array
    tokens: jax.Array
    valid: jax.Array
    lengths: jax.Array


@flax.struct.dataclass
class Scores:
    """Per rollout batch: old_log_probs (R, T) = log pi_old(o_t | M), r_causal (R,), ref_log_probs (R, T) or
    None (only with a KL term)."""

    old_log_probs: jax.Array
    r_causal: jax.Array
    ref_log_probs: jax.Array | None


# --------------------------------------------------------------------------------------------------------------
# Parameters: what trains, LoRA adapters, the reference policy
# --------------------------------------------------------------------------------------------------------------


def is_trainable(path: str) -> bool:
    """Stage II: the backbone's LoRA leaves train; P_phi and the backbone's base weights are frozen."""
    return path.split("/", 1)[0] == "backbone" and path.rsplit("/", 1)[-1].startswith("lora_")


def add_lora(rng: jax.Array, backbone_params: dict, config: Qwen3VLConfig, lora: LoraConfig = STAGE2_LORA) -> dict:
    """The backbone's params with LoRA adapters added where `lora` puts them: lora_a ~ U(+-1/sqrt(in)),
    lora_b = 0, so the adapted model starts as the base model. Adapters already present are kept."""
    have, want = flatten(backbone_params), flatten(abstract_params(config, lora))
    missing = sorted(p for p in want if p not in have)
    if any(not p.rsplit("/", 1)[-1].startswith("lora_") for p in missing):
        raise ValueError(f"backbone params lack non-LoRA leaves: {[p for p in missing if 'lora_' not in p][:5]}")
    out = dict(have)
    for i, path in enumerate(missing):
        spec = want[path]
        if path.endswith("lora_a"):
            out[path] = LORA_A_INIT(jax.random.fold_in(rng, i), spec.shape, spec.dtype)
        else:
            out[path] = jnp.zeros(spec.shape, spec.dtype)
    return unflatten(out)


def without_lora(backbone_params: dict) -> dict:
    """The reference policy pi_ref: the same weights with every `lora_b` zeroed (the adapters contribute 0)."""
    def zero(path, x):
        return jnp.zeros_like(x) if getattr(path[-1], "key", None) == "lora_b" else x

    return jax.tree_util.tree_map_with_path(zero, backbone_params)


def make_optimizer(learning_rate=LEARNING_RATE, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """AdamW over the LoRA adapters with global-norm clipping. The learning rate lives in the optimizer state
    (`inject_hyperparams`), so runs that differ only in it share one compiled update."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate, b1=b1, b2=b2,
                                                             weight_decay=weight_decay))


def init_train_state(params: dict, optimizer: optax.GradientTransformation, rng: jax.Array
                     ) -> tuple[TrainState, dict]:
    """Split {"sampler": phi, "backbone": theta with LoRA} into (TrainState over the adapters, frozen tree)."""
    if set(params) != {"sampler", "backbone"}:
        raise ValueError(f"Stage II params are {{'sampler', 'backbone'}}, got {sorted(params)}")
    mask = freeze.mask_from_predicate(params, is_trainable)
    if not any(jax.tree.leaves(mask)):
        raise ValueError("the backbone has no LoRA adapters: build it with lora=STAGE2_LORA and call add_lora")
    train, frozen = freeze.split(params, mask)
    train = sharding.cast_floating(train, jnp.float32)
    return TrainState(jnp.zeros((), jnp.int32), train, optimizer.init(train), rng), frozen


# --------------------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------------------


def repeat_cache(kv_cache: KVCache, repeats: int) -> KVCache:
    """Each example's cache `repeats` times in a row: row b -> rows b * repeats .. b * repeats + repeats - 1."""
    def rows(a):  # the batch is axis -4 of stacked and per-layer keys / values alike
        return jnp.repeat(a, repeats, axis=-4)

    return kv_cache.replace(k=jax.tree.map(rows, kv_cache.k), v=jax.tree.map(rows, kv_cache.v),
                            valid=jnp.repeat(kv_cache.valid, repeats, axis=0),
                            lengths=jnp.repeat(kv_cache.lengths, repeats, axis=0),
                            position_offset=jnp.repeat(kv_cache.position_offset, repeats, axis=0))


def tile_cache(kv_cache: KVCache, copies: int) -> KVCache:
    """The whole batch's cache `copies` times: row b -> rows c * B + b."""
    def rows(a):  # the batch is axis -4 of stacked and per-layer keys / values alike
        return jnp.tile(a, (copies, 1, 1, 1))

    return kv_cache.replace(k=jax.tree.map(rows, kv_cache.k), v=jax.tree.map(rows, kv_cache.v),
                            valid=jnp.tile(kv_cache.valid, (copies, 1)),
                            lengths=jnp.tile(kv_cache.lengths, copies),
                            position_offset=jnp.tile(kv_cache.position_offset, copies))


def memories(sampler: DiagnosticMemorySampler, sampler_params, batch: PromptBatch, top_k: int = 1
             ) -> tuple[jax.Array, jax.Array]:
    """(M, M') (B, N, D): P_phi(F) and P_phi(F ⊙ B̄) with the `top_k` most confident valid regions zeroed (Eq. 5).
    An image without a valid region keeps every feature, so M' = M and its r_causal is 0."""
    keep = counterfactual_keep_mask(batch.region_masks, batch.region_confidence, batch.region_valid, top_k)
    features = jnp.concatenate([batch.feature_map, intervene(batch.feature_map, keep)], axis=0)
    both = sampler.apply({"params": sampler_params}, features, True)
    b = batch.feature_map.shape[0]
    return both[:b], both[b:]


def group_cache(prompt_cache: KVCache, group: int, new_slots: int, shared: bool) -> KVCache:
    """A cache for `group` continuations of each prompt in `prompt_cache` (whose slots are exactly the prompts'),
    with `new_slots` free slots per continuation: the prompt shared by its rows (`KVCache.share_prefix`) or, with
    shared=False, copied to each row (`repeat_cache`) followed by the free slots."""
    if shared:
        return KVCache.share_prefix(prompt_cache, group, new_slots)
    def with_free_slots(a):  # the slots are axis -3 of stacked and per-layer keys / values alike
        return jnp.pad(a, [(0, 0)] * (a.ndim - 3) + [(0, new_slots), (0, 0), (0, 0)])

    whole = prompt_cache.replace(k=jax.tree.map(with_free_slots, prompt_cache.k),
                                 v=jax.tree.map(with_free_slots, prompt_cache.v),
                                 valid=jnp.pad(prompt_cache.valid, ((0, 0), (0, new_slots))))
    return repeat_cache(whole, group)


def rollout(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler, config: GRPOConfig,
            params: dict, batch: PromptBatch, rng: jax.Array) -> Rollout:
    """G completions per prompt: prefill [prompt; M] once per prompt, one cache for its G completions
    (`group_cache`), decode on device.

    params: {"sampler", "backbone"} (merged). Returns a `Rollout` with R = B * G trajectories.
    """
    m, m_prime = memories(sampler, params["sampler"], batch, config.counterfactual_top_k)
    g, t = config.num_generations, config.max_new_tokens
    prompt_len = batch.prefix.input_ids.shape[1] + m.shape[1]
    prompt_cache, last_hidden = memory_lib.inject(backbone, params["backbone"], batch.prefix, m, prompt_len,
                                                  prompt_tail=config.prompt_tail, per_layer_cache=False)
    tokens, lengths = cached.decode(backbone, params["backbone"],
                                    group_cache(prompt_cache, g, t, config.shared_prompt_cache),
                                    jnp.repeat(last_hidden, g, axis=0), config.sampling, rng,
                                    relayout=config.rollout_relayout)
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    return Rollout(m, m_prime, tokens, valid, lengths)


# --------------------------------------------------------------------------------------------------------------
# The one teacher-forced scorer
# --------------------------------------------------------------------------------------------------------------


def score_completions(backbone: Qwen3VLForConditionalGeneration, backbone_params, prefix: PrefixInputs,
                      memory_cbnd: jax.Array, tokens: jax.Array, valid: jax.Array, logprob_chunk: int = 0,
                      shared_prompt_cache: bool = True, prompt_tail: int = 0) -> jax.Array:
    """log pi(o_t | X, q, M_c, o_<t) (C, R, T) float32 (0 at padding) for C memory variants at once.

    prefix (B, Tp); memory_cbnd (C, B, N, D): C memories per prompt (C = 2 for [M; M'] in r_causal, C = 1 for
    the ratio); tokens / valid (R, T) with R = B * G, trajectory b * G + g belonging to prompt b. The prompts are
    prefilled once, their cache tiled C times for the memory block, then shared by (or, with
    shared_prompt_cache=False, repeated for) the G completions (`group_cache`), which are teacher-forced in one
    parallel pass. Used for the old policy, the loss, r_causal and the reference.
    logprob_chunk: positions per LM-head chunk (0: all at once; see `_chunked_log_probs`). prompt_tail: the
    prompt's last tokens written after the memory (`memory.inject`; 0: none, and none without memory).
    """
    c, b, n, d = memory_cbnd.shape
    r, t = tokens.shape
    if r % b:
        raise ValueError(f"{r} trajectories do not divide into {b} prompts")
    head, tail_ids = memory_lib.split_prompt(prefix, prompt_tail if n else 0)
    kv_cache, last_hidden = cached.encode_prefix(backbone, backbone_params, head, prefix.input_ids.shape[1] + n)
    kv_cache, last_hidden = tile_cache(kv_cache, c), jnp.tile(last_hidden, (c, 1))
    kv_cache, last_hidden = memory_lib.write_memory(
        backbone, backbone_params, kv_cache, last_hidden, memory_cbnd.reshape(c * b, n, d),
        None if tail_ids is None else jnp.tile(tail_ids, (c, 1)))
    g = r // b
    ids, ids_valid = jnp.tile(tokens, (c, 1)), jnp.tile(valid, (c, 1))
    out = backbone.apply({"params": backbone_params}, input_ids=ids[:, :-1], token_valid=ids_valid[:, :-1],
                         kv_cache=group_cache(kv_cache, g, t - 1, shared_prompt_cache), return_logits=False)
    # hidden t predicts token t: the memory block's last state, then the teacher-forced completion's states.
    hidden = jnp.concatenate([jnp.repeat(last_hidden, g, axis=0)[:, None], out.hidden_states], axis=1)
    return _chunked_log_probs(backbone, backbone_params, hidden, ids, ids_valid, logprob_chunk).reshape(c, r, t)


def _chunked_log_probs(backbone, params, hidden_rtd, ids, valid, chunk: int) -> jax.Array:
    """log p(ids) (R, T) from post-norm states, the LM head applied `chunk` positions at a time (0: at once).

    At the paper's scale the float32 logits of a rollout batch (R x 1,024 x 151,936) do not fit; chunks are a
    `lax.map` with each chunk rematerialised in the backward pass, so only one chunk's logits live at a time.
    """
    r, t, d = hidden_rtd.shape
    if not chunk or t <= chunk:
        return cached.token_log_probs(cached.lm_logits(backbone, params, hidden_rtd), ids, valid)
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((r, n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(args):
        h, i, v = args
        return cached.token_log_probs(cached.lm_logits(backbone, params, h), i, v)

    log_probs = jax.lax.map(one, (split(hidden_rtd), split(ids), split(valid)))  # (n, R, chunk)
    return jnp.moveaxis(log_probs, 0, 1).reshape(r, n * chunk)[:, :t]


def score_rollout(backbone: Qwen3VLForConditionalGeneration, config: GRPOConfig, params: dict, batch: PromptBatch,
                  rollout_: Rollout) -> Scores:
    """Once per rollout batch, with the policy that sampled (theta_old): log pi(o | M) and log pi(o | M') in one
    stacked scorer call; the first is the old policy's log-probs, their masked sum of differences r_causal (Eq. 5).
    With lambda_causal = 0 only M is scored (r_causal = 0); with kl_beta > 0 the reference (LoRA off) is scored."""
    theta = params["backbone"]
    if config.reward.lambda_causal:
        stacked = jnp.stack([rollout_.memory, rollout_.counterfactual_memory])
        log_probs = score_completions(backbone, theta, batch.prefix, stacked, rollout_.tokens, rollout_.valid,
                                      config.logprob_chunk, config.shared_prompt_cache,
                                      prompt_tail=config.prompt_tail)
        r_causal = reward_lib.causal_reward(log_probs[0], log_probs[1], rollout_.valid,
                                            config.reward.causal_reduction, config.reward.causal_clip)
    else:
        log_probs = score_completions(backbone, theta, batch.prefix, rollout_.memory[None], rollout_.tokens,
                                      rollout_.valid, config.logprob_chunk, config.shared_prompt_cache,
                                      prompt_tail=config.prompt_tail)
        r_causal = jnp.zeros(rollout_.tokens.shape[:1], jnp.float32)
    ref = None
    if config.kl_beta:
        ref = score_completions(backbone, without_lora(theta), batch.prefix, rollout_.memory[None],
                                rollout_.tokens, rollout_.valid, config.logprob_chunk,
                                config.shared_prompt_cache, prompt_tail=config.prompt_tail)[0]
    return Scores(log_probs[0], r_causal, ref)


# --------------------------------------------------------------------------------------------------------------
# GRPO math (Eq. 3)
# --------------------------------------------------------------------------------------------------------------


def group_advantages(rewards: jax.Array, num_generations: int, epsilon: float = 1e-6, ddof: int = 1
                     ) -> tuple[jax.Array, jax.Array]:
    """A_i = (R_i - mu_G) / (sigma_G + eps) per group of G consecutive trajectories.

    rewards (B * G,) -> (advantages (B * G,) float32, zero_variance (B,) bool). A group whose rewards are all equal
    gets advantage exactly 0.
    """
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, num_generations)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=ddof, keepdims=True)
    zero_variance = r.max(axis=1) == r.min(axis=1)
    advantages = jnp.where(zero_variance[:, None], 0.0, (r - mean) / (std + epsilon))
    return advantages.reshape(-1), zero_variance


def policy_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, valid: jax.Array,
                trajectory_valid: jax.Array | None = None, clip_epsilon: float = 0.2, kl_beta: float = 0.0,
                ref_log_probs: jax.Array | None = None, kl_estimator: str = "k3", max_log_ratio: float = 20.0):
    """-J_CCR of Eq. (3) (+ beta * KL when kl_beta > 0), float32. Returns (loss, aux).

    log_probs, old_log_probs (R, T): log pi_theta and log pi_old of the sampled tokens; advantages (R,);
    valid (R, T) completion mask; trajectory_valid (R,) bool (default all). Per token
    -min(rho A, clip(rho, 1 - eps, 1 + eps) A) [+ beta KL_t], averaged over each trajectory's valid tokens, then
    over valid trajectories with at least one token. aux: ratio_mean, ratio_max_dev (max |rho - 1|),
    clip_fraction (valid tokens where the clipped term is the active one), kl (mean per-token KL or 0),
    policy_loss (the loss without the KL term).
    """
    r = log_probs.shape[0]
    trajectory_valid = jnp.ones((r,), bool) if trajectory_valid is None else trajectory_valid
    log_ratio = jnp.clip(log_probs.astype(jnp.float32) - old_log_probs.astype(jnp.float32),
                         -max_log_ratio, max_log_ratio)
    ratio = jnp.exp(log_ratio)
    adv = advantages.astype(jnp.float32)[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * adv)
    counted_traj = trajectory_valid & valid.any(axis=1)
    mask = valid & counted_traj[:, None]
    n_traj = jnp.maximum(counted_traj.sum(), 1)

    def trajectory_mean(x_rt):
        per_traj = jnp.where(mask, x_rt, 0.0).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)
        return jnp.where(counted_traj, per_traj, 0.0).sum() / n_traj

    pg = trajectory_mean(-surrogate)
    kl = jnp.zeros((), jnp.float32)
    loss = pg
    if kl_beta:
        if ref_log_probs is None:
            raise ValueError("kl_beta > 0 needs ref_log_probs")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        d = ref_log_probs.astype(jnp.float32) - log_probs.astype(jnp.float32)
        kl_t = jnp.exp(d) - d - 1.0 if kl_estimator == "k3" else -d
        kl = trajectory_mean(kl_t)
        loss = pg + kl_beta * kl
    n_tok = jnp.maximum(mask.sum(), 1)
    clipped = ((adv > 0) & (ratio > 1.0 + clip_epsilon)) | ((adv < 0) & (ratio < 1.0 - clip_epsilon))
    aux = {"policy_loss": pg, "kl": kl,
           "ratio_mean": jnp.where(mask, ratio, 0.0).sum() / n_tok,
           "ratio_max_dev": jnp.max(jnp.where(mask, jnp.abs(ratio - 1.0), 0.0)),
           "clip_fraction": (clipped & mask).sum() / n_tok}
    return loss, aux


# --------------------------------------------------------------------------------------------------------------
# Update and the full step
# --------------------------------------------------------------------------------------------------------------


def policy_gradient(backbone: Qwen3VLForConditionalGeneration, config: GRPOConfig, train_params: dict,
                    frozen: dict, batch: PromptBatch, rollout_: Rollout, old_log_probs: jax.Array,
                    advantages: jax.Array, ref_log_probs: jax.Array | None = None):
    """((loss, aux), grads) of Eq. (3) with respect to the trainable tree (the LoRA adapters). The current
    log-probs come from `score_completions` inside the differentiated function."""
    trajectory_valid = jnp.repeat(batch.example_valid, config.num_generations)

    def loss_fn(train):
        theta = freeze.merge(train, frozen)["backbone"]
        log_probs = score_completions(backbone, theta, batch.prefix, rollout_.memory[None], rollout_.tokens,
                                      rollout_.valid, config.logprob_chunk, config.shared_prompt_cache,
                                      prompt_tail=config.prompt_tail)[0]
        return policy_loss(log_probs, old_log_probs, advantages, rollout_.valid, trajectory_valid,
                           config.clip_epsilon, config.kl_beta, ref_log_probs, config.kl_estimator,
                           config.max_log_ratio)

    return jax.value_and_grad(loss_fn, has_aux=True)(train_params)


def update(backbone: Qwen3VLForConditionalGeneration, config: GRPOConfig, optimizer: optax.GradientTransformation,
           state: TrainState, frozen: dict, batch: PromptBatch, rollout_: Rollout, old_log_probs: jax.Array,
           advantages: jax.Array, ref_log_probs: jax.Array | None = None,
           ends_rollout: bool | jax.Array = True) -> tuple[TrainState, dict]:
    """One AdamW step on Eq. (3). Returns (new state, metrics: loss, grad_norm and `policy_loss`'s aux).

    ends_rollout: whether this is the last update on its rollout batch, which advances `state.step` (it counts
    rollout batches, see the module docstring). An argument of the program, not a constant: the first and last
    updates of a rollout batch share one compiled update."""
    (loss, aux), grads = policy_gradient(backbone, config, state.params, frozen, batch, rollout_, old_log_probs,
                                         advantages, ref_log_probs)
    params, opt_state = freeze.apply_update(optimizer, grads, state.opt_state, state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    step = state.step + jnp.asarray(ends_rollout, state.step.dtype)
    return state.replace(step=step, params=params, opt_state=opt_state), metrics


class GRPOFunctions(NamedTuple):
    """The jitted pieces of a step, built once by `make_grpo_step` (modules, config and optimizer are fixed)."""

    config: GRPOConfig
    rollout: Callable  # (train, frozen, batch, rng) -> Rollout
    score: Callable  # (train, frozen, batch, rollout) -> Scores
    # (state, frozen, batch, rollout, old_log_probs, advantages, ref_log_probs, ends_rollout) -> (state, metrics)
    update: Callable
    advantages: Callable  # (r_acc, scores, rollout, example_valid) -> (advantages (B G,), metrics of the rollout)


def _merged(fn):
    def wrapped(train, frozen, *args):
        return fn(freeze.merge(train, frozen), *args)

    return wrapped


def grpo_functions(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler,
                   config: GRPOConfig, optimizer: optax.GradientTransformation) -> GRPOFunctions:
    """jit `rollout`, `score_rollout` and `update` over their array arguments. The trainable tree is an argument
    of every program (never a compile-time constant), merged with the frozen tree inside."""
    return GRPOFunctions(
        config=config,
        rollout=jax.jit(_merged(functools.partial(rollout, backbone, sampler, config))),
        score=jax.jit(_merged(functools.partial(score_rollout, backbone, config))),
        update=jax.jit(functools.partial(update, backbone, config, optimizer)),
        advantages=jax.jit(functools.partial(advantages_and_metrics, config)),
    )


def _masked_stats(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = jnp.maximum(mask.sum(), 1)
    mean = jnp.where(mask, x, 0.0).sum() / n
    return mean, jnp.sqrt(jnp.where(mask, jnp.square(x - mean), 0.0).sum() / n)


def host_accuracy(accuracy_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], rollout_: Rollout,
                  example_valid: jax.Array, g: int) -> jax.Array:
    """r_acc (B G,) of a rollout, computed on the host by `accuracy_fn` over this process's trajectories.

    In one process that is every trajectory. With several processes each holds only its own prompts' rows
    (the batch is sharded over them: `distributed.global_vital_batch`), so each decodes and scores the
    trajectories of its own prompts (the rows its pipeline batch, and so `accuracy_fn`'s reference answers, are
    about) and the scores are assembled into one global array with the batch's sharding."""
    from vital_jax import distributed

    if rollout_.tokens.is_fully_addressable:
        r_acc = np.asarray(accuracy_fn(np.asarray(rollout_.tokens), np.asarray(rollout_.lengths)), np.float32)
        if r_acc.shape != rollout_.lengths.shape:
            raise ValueError(f"accuracy_fn returned shape {r_acc.shape}, expected {rollout_.lengths.shape}")
        return jnp.asarray(r_acc)
    batch_sharding = example_valid.sharding
    prompts = distributed.process_rows(batch_sharding, example_valid.shape)
    rows = (prompts[:, None] * g + np.arange(g)[None]).reshape(-1)
    local = np.asarray(accuracy_fn(distributed.host_rows(rollout_.tokens, rows),
                                   distributed.host_rows(rollout_.lengths, rows)), np.float32)
    if local.shape != rows.shape:
        raise ValueError(f"accuracy_fn returned shape {local.shape}, expected {rows.shape} (this process's "
                         f"{len(prompts)} prompts x {g} completions)")
    sharding_ = jax.sharding.NamedSharding(batch_sharding.mesh, batch_sharding.spec)
    if not np.array_equal(distributed.process_rows(sharding_, rollout_.lengths.shape), rows):
        raise ValueError("the trajectories of this process's prompts are not the rows it holds of a (B G,) array "
                         "sharded like the batch")
    return jax.make_array_from_process_local_data(sharding_, local, rollout_.lengths.shape)


def advantages_and_metrics(cfg: GRPOConfig, r_acc: jax.Array, scores: Scores, rollout_: Rollout,
                           example_valid: jax.Array) -> tuple[jax.Array, dict]:
    """Rewards (Eq. 4-5) -> group-normalised advantages (B G,) (0 for padding prompts' trajectories) and the
    rollout's metrics (replicated scalars). One jitted program: on a multi-process mesh a chain of eager ops on
    the sharded rewards would be a chain of small collective programs, and processes that dispatch those in
    different interleavings over their devices deadlock (seen with 2 processes x 2 CPU devices under load)."""
    g = cfg.num_generations
    rewards = reward_lib.combine(r_acc, scores.r_causal, cfg.reward)
    advantages, zero_variance = group_advantages(rewards, g, cfg.advantage_epsilon, cfg.std_ddof)
    trajectory_valid = jnp.repeat(example_valid, g)
    advantages = jnp.where(trajectory_valid, advantages, 0.0)
    reward_mean, reward_std = _masked_stats(rewards, trajectory_valid)
    r_causal_mean, r_causal_std = _masked_stats(scores.r_causal, trajectory_valid)
    adv_mean, adv_std = _masked_stats(advantages, trajectory_valid)
    eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
    truncated = (rollout_.lengths == cfg.max_new_tokens) & ~jnp.isin(rollout_.tokens[:, -1], eos)
    return advantages, {
        "reward_mean": reward_mean, "reward_std": reward_std,
        "r_acc": _masked_stats(r_acc, trajectory_valid)[0],
        "r_causal": r_causal_mean, "r_causal_std": r_causal_std,
        "advantage_mean": adv_mean, "advantage_std": adv_std,
        "advantage_min": jnp.min(jnp.where(trajectory_valid, advantages, jnp.inf)),
        "advantage_max": jnp.max(jnp.where(trajectory_valid, advantages, -jnp.inf)),
        "zero_variance_groups": (zero_variance & example_valid).sum(),
        "completion_length": _masked_stats(rollout_.lengths.astype(jnp.float32), trajectory_valid)[0],
        "truncated_fraction": _masked_stats(truncated.astype(jnp.float32), trajectory_valid)[0],
    }


def grpo_step(fns: GRPOFunctions, state: TrainState, frozen: dict, batch: PromptBatch,
              accuracy_fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[TrainState, dict]:
    """One Stage II step: rollout -> scores (old policy, r_causal) -> r_acc on the host -> rewards and group
    advantages -> `num_updates` updates. accuracy_fn: (tokens (R, T), lengths (R,)) numpy -> r_acc (R,)
    (`reward.text_accuracy_fn` for decoded answers). Returns (new state, metrics as Python floats); the state's
    step is one more (one rollout batch), its optimizer's count `num_updates` more."""
    cfg = fns.config
    g = cfg.num_generations
    rollout_ = fns.rollout(state.params, frozen, batch, jax.random.fold_in(state.rng, state.step))
    scores = fns.score(state.params, frozen, batch, rollout_)
    r_acc = host_accuracy(accuracy_fn, rollout_, batch.example_valid, g)
    advantages, metrics = fns.advantages(r_acc, scores, rollout_, batch.example_valid)
    update_metrics = []
    for i in range(cfg.num_updates):
        state, m = fns.update(state, frozen, batch, rollout_, scores.old_log_probs, advantages, scores.ref_log_probs,
                              i == cfg.num_updates - 1)
        update_metrics.append(m)
    # Every metric is a replicated scalar: averaged on the host, so no further device program runs (with several
    # processes each eager op would be one more collective program, see `advantages_and_metrics`).
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    update_metrics = jax.device_get(update_metrics)
    for key in update_metrics[0]:
        metrics[key] = float(np.mean([m[key] for m in update_metrics]))
    return state, metrics


def make_grpo_step(backbone: Qwen3VLForConditionalGeneration, sampler: DiagnosticMemorySampler,
                   config: GRPOConfig, optimizer: optax.GradientTransformation):
    """`grpo_step` with its jitted functions built once: (state, frozen, batch, accuracy_fn) -> (state, metrics)."""
    return functools.partial(grpo_step, grpo_functions(backbone, sampler, config, optimizer))

