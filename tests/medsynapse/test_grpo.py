"""Stage II (CCR, Eq. 3-5): GRPO math against hand-computed values, the rewards, the jitted rollout against a
step-by-step greedy reference, r_causal against two direct forwards, step 0 (rho = 1, non-zero LoRA gradients)
and a tiny learnable task on which GRPO raises the reward compared with the same run at lr = 0."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.medsynapse.medsynapse_fixtures import build_backbone, make_batch
from tests.models.test_decoding_layout import while_bodies_hold
from vital_jax import freeze
from vital_jax.layers.kv_cache import KVCache
from vital_jax.layers.linear import LoraConfig
from vital_jax.medsynapse import grpo
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse import reward as reward_lib
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig
from vital_jax.models.hf_mapping import flatten, unflatten
from vital_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vital_jax.models.qwen3_vl import params as qwen3_vl_params

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q", "k", "v", "o"))
FEATURES = (3, 4, 16)  # Hf, Wf, df


# ------------------------------------------------------------------------------------------ GRPO math, no model

@pytest.mark.parametrize("rewards, g, ddof, expected, zero", [
    # mean 0.25, unbiased std 0.5
    ([1, 0, 0, 0], 4, 1, [1.5, -0.5, -0.5, -0.5], [False]),
    # all equal: exactly 0, even where the float mean is not exactly the value (0.1 * 3 / 3)
    ([2, 2, 2, 2, 0.1, 0.1, 0.1, 0.1], 4, 1, [0] * 8, [True, True]),
    # two groups of two: mean 2, unbiased std sqrt(2); population std 1
    ([1, 3, 5, 5], 2, 1, [-1 / np.sqrt(2), 1 / np.sqrt(2), 0, 0], [False, True]),
    ([1, 3], 2, 0, [-1, 1], [False]),
])
def test_group_advantages_match_hand_computed_values(rewards, g, ddof, expected, zero):
    adv, zero_var = grpo.group_advantages(jnp.asarray(rewards, jnp.float32), g, epsilon=1e-6, ddof=ddof)
    scale = np.asarray(expected, np.float64)
    # (R - mu) / (sigma + eps): the eps shifts the hand values by a relative 1e-6 / sigma
    np.testing.assert_allclose(adv, scale, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[np.repeat(zero, g)] == 0.0)
    assert zero_var.tolist() == zero


def _table():
    """Four trajectories: ratios chosen to hit both clip sides; padding and invalid rows must not count."""
    ratio = np.array([[1.5, 0.5, 1.0, 3.0],    # A = +2: clipped above (1.2 A), unclipped below (0.5 A), 1.0 A, pad
                      [1.5, 0.5, 9.0, 9.0],    # A = -1: unclipped above (1.5 A), clipped below (0.8 A), pads
                      [2.0, 2.0, 2.0, 2.0],    # no valid token: not counted
                      [1.1, 1.1, 1.1, 1.1]])   # trajectory_valid False: not counted
    valid = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    old = np.log(np.full((4, 4), 0.2))
    new = old + np.log(ratio)
    adv = np.array([2.0, -1.0, 0.5, 3.0])
    traj = np.array([True, True, True, False])
    return (jnp.asarray(new, jnp.float32), jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
            jnp.asarray(valid), jnp.asarray(traj))


def test_clipped_objective_with_padding_matches_hand_computed_values():
    new, old, adv, valid, traj = _table()
    loss, aux = grpo.policy_loss(new, old, adv, valid, traj, clip_epsilon=0.2)
    # row 0: mean(1.2*2, 0.5*2, 1.0*2) = 1.8; row 1: mean(1.5*-1, 0.8*-1) = -1.15; J = (1.8 - 1.15) / 2
    assert float(loss) == pytest.approx(-0.325, abs=1e-6)
    assert float(aux["policy_loss"]) == pytest.approx(-0.325, abs=1e-6)
    assert float(aux["clip_fraction"]) == pytest.approx(2 / 5, abs=1e-6)  # row 0 token 0, row 1 token 1
    assert float(aux["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert float(aux["ratio_max_dev"]) == pytest.approx(0.5, abs=1e-6)
    assert float(aux["kl"]) == 0.0
    # d loss / d log pi: zero where the clipped term is active or the token does not count; else
    # -(1/2 trajectories) (1/|o_i|) A rho.
    grad = np.asarray(jax.grad(lambda lp: grpo.policy_loss(lp, old, adv, valid, traj)[0])(new))
    expected = np.zeros((4, 4))
    expected[0, 1], expected[0, 2] = -0.5 / 3 * 2 * 0.5, -0.5 / 3 * 2 * 1.0
    expected[1, 0] = -0.5 / 2 * -1 * 1.5
    np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("estimator, per_token", [("k3", 0.5 + np.log(2) - 1), ("k1", np.log(2))])
def test_kl_term_matches_hand_computed_values(estimator, per_token):
    # pi = 0.5, pi_ref = 0.25 on every valid token; ratio 1, A = 0, so the loss is beta * KL exactly.
    lp = jnp.log(jnp.full((2, 3), 0.5))
    ref = jnp.log(jnp.full((2, 3), 0.25))
    valid = jnp.asarray([[1, 1, 0], [1, 0, 0]], bool)
    loss, aux = grpo.policy_loss(lp, lp, jnp.zeros(2), valid, kl_beta=0.1, ref_log_probs=ref, kl_estimator=estimator)
    assert float(aux["kl"]) == pytest.approx(per_token, rel=1e-5)
    assert float(loss) == pytest.approx(0.1 * per_token, rel=1e-5)
    with pytest.raises(ValueError, match="ref_log_probs"):
        grpo.policy_loss(lp, lp, jnp.zeros(2), valid, kl_beta=0.1)


def test_causal_reward_is_the_masked_sum_or_the_skeletons_clipped_mean():
    lp_m = jnp.asarray([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    lp_mp = jnp.asarray([[-2.0, -4.0, -100.0], [-20.0, -20.0, 0.0]])
    valid = jnp.asarray([[1, 1, 0], [1, 1, 0]], bool)
    np.testing.assert_allclose(reward_lib.causal_reward(lp_m, lp_mp, valid), [3.0, 39.0])
    np.testing.assert_allclose(reward_lib.causal_reward(lp_m, lp_mp, valid, "mean_clipped", 5.0), [1.5, 5.0])
    config = reward_lib.RewardConfig()
    np.testing.assert_allclose(reward_lib.combine(jnp.asarray([1.0, 0.0]), jnp.asarray([3.0, -2.0]), config),
                               [2.5, -1.0])
    with pytest.raises(ValueError, match="causal_reduction"):
        reward_lib.RewardConfig(causal_reduction="mean")


def test_accuracy_reward_uses_the_evaluation_normaliser_and_the_open_ended_option():
    assert reward_lib.accuracy_reward("The Liver.", "liver") == 1.0
    assert reward_lib.accuracy_reward("Twenty-one", "21") == 1.0
    assert reward_lib.accuracy_reward("left kidney", "right kidney") == 0.0
    assert reward_lib.accuracy_reward("Yes, it is.", "yes") == 0.0  # Eq. (4): exact match by default
    closed = reward_lib.RewardConfig(closed_match="closed")  # as evaluation scores it: against the options posed
    assert reward_lib.accuracy_reward("Yes, it is.", "yes", config=closed, options=("yes", "no")) == 1
    assert reward_lib.accuracy_reward("No.", "yes", config=closed, options=("yes", "no")) == 0
    assert reward_lib.accuracy_reward("The kidney is on the left.", "left", config=closed, options=("left", "right"),
                                      target="kidney") == 1
    assert reward_lib.accuracy_reward("Left or right.", "left", config=closed, options=("left", "right")) == 0
    f1 = reward_lib.RewardConfig(open_ended_match="f1")
    assert reward_lib.accuracy_reward("Lung mass, left.", "left lung mass", True, f1) == pytest.approx(1.0)
    assert reward_lib.accuracy_reward("left lung", "left lung mass", True, f1) == pytest.approx(0.8)
    assert reward_lib.accuracy_reward("left lung", "left lung mass", True) == 0.0
    words = {1: "the", 2: "Liver", 3: "spleen", 9: "<eos>"}
    fn = reward_lib.text_accuracy_fn(lambda ids: " ".join(words[i] for i in ids),
                                     [reward_lib.Reference("liver"), reward_lib.Reference("spleen")], 2)
    tokens = np.array([[1, 2, 9], [3, 9, 0], [3, 9, 0], [3, 2, 3]])
    np.testing.assert_array_equal(fn(tokens, np.array([2, 1, 1, 2])), [1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="trajectories"):
        fn(tokens[:3], np.array([2, 1, 1]))


def test_config_rejects_what_grpo_cannot_do():
    with pytest.raises(ValueError, match="num_generations"):
        grpo.GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo.GRPOConfig(kl_estimator="k2")


# ------------------------------------------------------------------------------------------ with a tiny backbone

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = build_backbone(tmp_path_factory.mktemp("grpo_backbone"))
    model = Qwen3VLForConditionalGeneration(tiny.config, LORA)
    d = tiny.config.text.hidden_size
    # A memory well above the embedding scale, so that M and M' visibly differ in the answer distribution.
    sampler = DiagnosticMemorySampler(SamplerConfig(hidden_size=d, num_queries=3, num_heads=4, output_rms=0.5))
    data = make_batch(tiny.config, seed=3)
    rng = np.random.RandomState(4)
    features = jnp.asarray(rng.randn(2, *FEATURES).astype(np.float32))
    regions = np.zeros((2, 2, 3, 4), bool)
    regions[:, 0, :2, :2], regions[:, 1, :, 3] = True, True
    batch = grpo.PromptBatch(prefix=data["prefix"], feature_map=features, region_masks=jnp.asarray(regions),
                             region_confidence=jnp.asarray([[0.9, 0.1], [0.2, 0.7]]),
                             region_valid=jnp.ones((2, 2), bool), example_valid=jnp.ones((2,), bool))
    backbone = grpo.add_lora(jax.random.PRNGKey(1), tiny.params, tiny.config, LORA)
    params = {"sampler": sampler.init(jax.random.PRNGKey(0), features)["params"], "backbone": backbone}
    # Trained-looking adapters (lora_b != 0), so that the paths below run a real LoRA.
    flat = flatten(backbone)
    perturbed = {p: (0.05 * jax.random.normal(jax.random.PRNGKey(i), x.shape) if p.endswith("lora_b") else x)
                 for i, (p, x) in enumerate(sorted(flat.items()))}
    adapted = {"sampler": params["sampler"], "backbone": unflatten(perturbed)}
    return dict(tiny=tiny, model=model, sampler=sampler, batch=batch, params=params, adapted=adapted)


@pytest.mark.parametrize("relayout, scans", [(None, False), (True, False), (False, True)])
def test_a_scanned_policy_rolls_out_relaid_out_unless_told_not_to(setup, relayout, scans):
    """`GRPOConfig.rollout_relayout`: the decode loop of a policy held with scanned layers runs no layer scan
    (relaid out once per rollout) unless False."""
    tiny, sampler, batch, params = setup["tiny"], setup["sampler"], setup["batch"], setup["adapted"]
    config = dataclasses.replace(tiny.config, text=dataclasses.replace(tiny.config.text, scan_layers=True))
    model = Qwen3VLForConditionalGeneration(config, LORA)
    scanned = {**params, "backbone": qwen3_vl_params.to_layout(params["backbone"], True)}
    cfg = grpo.GRPOConfig(num_generations=2, max_new_tokens=3, rollout_relayout=relayout)
    jaxpr = jax.make_jaxpr(lambda p: grpo.rollout(model, sampler, cfg, p, batch, jax.random.PRNGKey(0)))(scanned)
    assert while_bodies_hold(jaxpr, "scan") == scans


def _row_tokens(rollout_, g, b_count, k):
    """Trajectories of completion k of every prompt: (B, T)."""
    idx = np.arange(b_count) * g + k
    return rollout_.tokens[idx], rollout_.valid[idx]


def test_jitted_rollout_at_temperature_zero_matches_a_step_by_step_greedy_reference(setup):
    model, sampler, batch, params = setup["model"], setup["sampler"], setup["batch"], setup["adapted"]
    t = 6
    m, _ = grpo.memories(sampler, params["sampler"], batch)
    forced = jax.jit(lambda p, ids, v: memory_lib.answer_logits(model, p, batch.prefix, m, ids, v))
    # Reference: re-run [prompt; M; generated so far] teacher forced every step, take the argmax.
    ref = np.zeros((2, t), np.int32)
    for s in range(t):
        logits = forced(params["backbone"], jnp.asarray(ref), jnp.asarray(np.arange(t)[None] <= s).repeat(2, 0))
        ref[:, s] = np.argmax(np.asarray(logits[:, s]), -1)
    eos = int(ref[0, 2])
    config = grpo.GRPOConfig(num_generations=3, max_new_tokens=t, temperature=0.0, eos_token_ids=(eos,),
                             pad_token_id=0)
    run = jax.jit(lambda p, b, r: grpo.rollout(model, sampler, config, p, b, r))
    out = run(params, batch, jax.random.PRNGKey(0))
    for b in range(2):
        stop = next((i + 1 for i in range(t) if ref[b, i] == eos), t)
        for k in range(3):
            r = b * 3 + k
            assert int(out.lengths[r]) == stop
            assert out.tokens[r, :stop].tolist() == ref[b, :stop].tolist()
            assert np.all(np.asarray(out.tokens[r, stop:]) == 0)
            assert out.valid[r].tolist() == [i < stop for i in range(t)]
    assert int(out.lengths[0]) <= 3  # row 0 stops at the EOS it was given
    np.testing.assert_allclose(out.memory, m, atol=1e-5)


def test_a_shared_prompt_cache_gives_the_rollouts_scores_and_gradients_of_a_copy_per_completion(setup):
    """`GRPOConfig.shared_prompt_cache`: G completions read their prompt's cache (prompt + memory) from one copy;
    with False each completion gets its own. Sampled rollouts, r_causal, the old log-probs and Eq. (3)'s
    gradients agree (float32 summation order aside)."""
    model, sampler, batch, params = setup["model"], setup["sampler"], setup["batch"], setup["adapted"]
    train, frozen = freeze.split(params, freeze.mask_from_predicate(params, grpo.is_trainable))
    results = []
    for shared in (True, False):
        config = grpo.GRPOConfig(num_generations=3, max_new_tokens=5, shared_prompt_cache=shared)
        fns = grpo.grpo_functions(model, sampler, config, grpo.make_optimizer())
        rollout_ = fns.rollout(train, frozen, batch, jax.random.PRNGKey(9))
        scores = fns.score(train, frozen, batch, rollout_)
        adv = jnp.asarray(np.random.RandomState(0).randn(6).astype(np.float32))
        (loss, _), grads = jax.jit(lambda tr, f, r, o, a: grpo.policy_gradient(
            model, config, tr, f, batch, r, o, a))(train, frozen, rollout_, scores.old_log_probs, adv)
        results.append((rollout_, scores, loss, grads))
    (r1, s1, l1, g1), (r2, s2, l2, g2) = results
    assert r1.tokens.tolist() == r2.tokens.tolist() and r1.lengths.tolist() == r2.lengths.tolist()
    np.testing.assert_allclose(s1.old_log_probs, s2.old_log_probs, atol=1e-5)
    np.testing.assert_allclose(s1.r_causal, s2.r_causal, atol=1e-5)
    assert float(l1) == pytest.approx(float(l2), abs=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The shared cache holds each prompt once: (L, B, Tp + N, K, H) beside (L, B * G, T, K, H) of new slots.
    prompt = KVCache.init(2, 2, 7, 2, 4)
    shared, copied = grpo.group_cache(prompt, 3, 5, True), grpo.group_cache(prompt, 3, 5, False)
    assert shared.prefix_k.shape == (2, 2, 7, 2, 4) and shared.k.shape == (2, 6, 5, 2, 4)
    assert copied.prefix_k is None and copied.k.shape == (2, 6, 12, 2, 4)
    # A cache laid out per layer (unrolled layers) is grouped the same way and keeps its layout.
    rng = np.random.RandomState(3)
    filled = prompt.replace(k=jnp.asarray(rng.randn(*prompt.k.shape).astype(np.float32)),
                            v=jnp.asarray(rng.randn(*prompt.v.shape).astype(np.float32)),
                            valid=jnp.asarray(rng.rand(2, 7) > 0.3), lengths=jnp.asarray([7, 5]))
    per_layer = filled.replace(k=tuple(filled.k), v=tuple(filled.v))
    for make in (lambda c: grpo.group_cache(c, 3, 5, False), lambda c: grpo.tile_cache(c, 2),
                 lambda c: grpo.group_cache(c, 3, 5, True)):
        want, got = make(filled), make(per_layer)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got.stacked())):
            np.testing.assert_array_equal(a, b)
    assert grpo.group_cache(per_layer, 3, 5, False).per_layer and grpo.tile_cache(per_layer, 2).per_layer


def test_r_causal_and_old_log_probs_match_two_direct_forwards(setup):
    model, sampler, params = setup["model"], setup["sampler"], setup["adapted"]
    batch = setup["batch"].replace(region_valid=jnp.asarray([[True, True], [False, False]]))  # row 1: no region
    g = 2
    config = grpo.GRPOConfig(num_generations=g, max_new_tokens=5, eos_token_ids=(187,))
    fns = grpo.grpo_functions(model, sampler, config, grpo.make_optimizer())
    train, frozen = freeze.split(params, freeze.mask_from_predicate(params, grpo.is_trainable))
    rollout_ = fns.rollout(train, frozen, batch, jax.random.PRNGKey(3))
    scores = fns.score(train, frozen, batch, rollout_)
    assert scores.ref_log_probs is None
    m, m_prime = grpo.memories(sampler, params["sampler"], batch)
    assert float(jnp.max(jnp.abs(m[0] - m_prime[0]))) > 1e-3
    np.testing.assert_array_equal(m[1], m_prime[1])
    # The direct computation: memory.answer_log_probs (its own prefill per call), once with M, once with M'.
    direct_log_probs = jax.jit(lambda mem, ids, valid: memory_lib.answer_log_probs(
        model, params["backbone"], batch.prefix, mem, ids, valid))
    for k in range(g):
        ids, valid = _row_tokens(rollout_, g, 2, k)
        lp_m, lp_mp = direct_log_probs(m, ids, valid), direct_log_probs(m_prime, ids, valid)
        direct = np.asarray((lp_m - lp_mp).sum(-1))
        idx = np.arange(2) * g + k
        np.testing.assert_allclose(scores.old_log_probs[idx], lp_m, atol=2e-5)
        np.testing.assert_allclose(scores.r_causal[idx], direct, atol=1e-4)
        assert abs(float(direct[0])) > 1e-3  # the intervention changes the answer's likelihood
    np.testing.assert_allclose(scores.r_causal[g:], 0.0, atol=1e-6)  # M' = M without a region
    # The LM head in chunks of 2 positions (5 -> 3 chunks, one padded) gives the same log-probs and gradients.
    def scored(theta, chunk):
        return grpo.score_completions(model, theta, batch.prefix, jnp.stack([m, m_prime]), rollout_.tokens,
                                      rollout_.valid, chunk)

    def value_and_grad(chunk):
        return jax.jit(jax.value_and_grad(lambda th: scored(th, chunk).sum()))(params["backbone"])

    (whole, whole_grad), (chunked, chunked_grad) = value_and_grad(0), value_and_grad(2)
    assert float(chunked) == pytest.approx(float(whole), abs=1e-4)
    for a, b in zip(jax.tree.leaves(whole_grad), jax.tree.leaves(chunked_grad)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # The skeleton's variant: the same sum divided by the length, clipped.
    mean_cfg = dataclasses.replace(config, reward=reward_lib.RewardConfig(causal_reduction="mean_clipped",
                                                                          causal_clip=1e-3))
    scores2 = jax.jit(lambda p, b, r: grpo.score_rollout(model, mean_cfg, p, b, r))(params, batch, rollout_)
    expected = np.clip(np.asarray(scores.r_causal) / np.asarray(rollout_.lengths), -1e-3, 1e-3)
    np.testing.assert_allclose(scores2.r_causal, expected, atol=1e-7)


def test_user_turn_memory_scores_match_direct_forwards(setup):
    """With the memory inside the user turn (config.prompt_tail > 0), the scorer's log pi(o | M) and r_causal equal
    memory.answer_log_probs with the same prompt_tail, and differ from the "assistant_turn" placement."""
    model, sampler, params, batch = setup["model"], setup["sampler"], setup["adapted"], setup["batch"]
    g, tail = 2, 2
    config = grpo.GRPOConfig(num_generations=g, max_new_tokens=5, eos_token_ids=(187,), prompt_tail=tail)
    fns = grpo.grpo_functions(model, sampler, config, grpo.make_optimizer())
    train, frozen = freeze.split(params, freeze.mask_from_predicate(params, grpo.is_trainable))
    rollout_ = fns.rollout(train, frozen, batch, jax.random.PRNGKey(3))
    scores = fns.score(train, frozen, batch, rollout_)
    m, m_prime = grpo.memories(sampler, params["sampler"], batch)
    direct_log_probs = jax.jit(lambda mem, ids, valid, t: memory_lib.answer_log_probs(
        model, params["backbone"], batch.prefix, mem, ids, valid, prompt_tail=t), static_argnums=3)
    for k in range(g):
        ids, valid = _row_tokens(rollout_, g, 2, k)
        lp_m, lp_mp = direct_log_probs(m, ids, valid, tail), direct_log_probs(m_prime, ids, valid, tail)
        idx = np.arange(2) * g + k
        np.testing.assert_allclose(scores.old_log_probs[idx], lp_m, atol=2e-5)
        np.testing.assert_allclose(scores.r_causal[idx], np.asarray((lp_m - lp_mp).sum(-1)), atol=1e-4)
        assert float(jnp.max(jnp.abs(direct_log_probs(m, ids, valid, 0) - lp_m))) > 1e-3


def test_step_zero_ratio_is_one_and_the_lora_gradients_are_not_zero(setup):
    model, sampler, batch, params = setup["model"], setup["sampler"], setup["batch"], setup["params"]
    config = grpo.GRPOConfig(num_generations=4, max_new_tokens=4, kl_beta=0.02)
    optimizer = grpo.make_optimizer(1e-3)
    fns = grpo.grpo_functions(model, sampler, config, optimizer)
    state, frozen = grpo.init_train_state(params, optimizer, jax.random.PRNGKey(5))
    rollout_ = fns.rollout(state.params, frozen, batch, jax.random.PRNGKey(6))
    scores = fns.score(state.params, frozen, batch, rollout_)
    # LoRA starts at B = 0: the reference (LoRA off) is the policy itself (up to float32 round-off: the
    # reference is scored in a batch of another shape than the stacked [M; M'] call).
    np.testing.assert_allclose(scores.ref_log_probs, scores.old_log_probs, atol=1e-5)
    r_acc = (np.asarray(rollout_.tokens[:, 0]) % 2).astype(np.float32)
    rewards = reward_lib.combine(jnp.asarray(r_acc), scores.r_causal, config.reward)
    adv, _ = grpo.group_advantages(rewards, 4)
    assert float(jnp.max(jnp.abs(adv))) > 0.1
    (loss, aux), grads = jax.jit(lambda s, f: grpo.policy_gradient(model, config, s, f, batch, rollout_,
                                                                   scores.old_log_probs, adv,
                                                                   scores.ref_log_probs))(state.params, frozen)
    assert float(aux["ratio_max_dev"]) <= 1e-5, aux  # exp(log pi - log pi_old) at theta = theta_old, to round-off
    assert float(aux["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert float(aux["clip_fraction"]) == 0.0
    assert float(aux["kl"]) == pytest.approx(0.0, abs=1e-6)
    flat = flatten(jax.tree.map(lambda x: x, grads, is_leaf=freeze.is_masked))
    lora_b = {p: float(jnp.linalg.norm(v)) for p, v in flat.items() if p.endswith("lora_b")}
    assert len(lora_b) == 4 * 2  # q, k, v, o in each of the two layers
    # B = 0 at step 0: the gradient reaches every B (A's gradient is weighted by B, so it is 0 until B moves).
    assert all(v > 0 for v in lora_b.values()), lora_b
    assert not any(freeze.is_masked(v) for p, v in flat.items() if "lora_" in p)
    assert all(freeze.is_masked(v) for p, v in flat.items() if "lora_" not in p)  # base and P_phi: no gradient
    # The update moves the adapters, and the next rollout batch is scored with the new adapters (they are
    # program arguments, not constants captured at the first compile).
    new_state, metrics = fns.update(state, frozen, batch, rollout_, scores.old_log_probs, adv, scores.ref_log_probs)
    assert float(metrics["grad_norm"]) > 0
    rescored = fns.score(new_state.params, frozen, batch, rollout_)
    assert float(jnp.max(jnp.abs(rescored.old_log_probs - scores.old_log_probs))) > 1e-6
    merged = freeze.merge(new_state.params, frozen)
    for path, before in flatten(params).items():
        after = flatten(merged)[path]
        assert np.array_equal(before, after) == (not path.endswith("lora_b")), path


def test_grpo_raises_a_learnable_reward_compared_with_the_same_run_at_lr_zero(setup):
    """Toy task: the reward is 1 when the first generated token is a given token per prompt (its second most
    likely first token under the initial model; sampling among the top 4). Only r_acc counts (lambda_causal = 0).
    The random model's LM head is scaled up x10: at its init scale (std 0.02 after the final RMSNorm) no hidden
    state can move a logit by much, which a trained model's head can."""
    model, sampler, batch = setup["model"], setup["sampler"], setup["batch"]
    params = {"sampler": setup["params"]["sampler"], "backbone": dict(setup["params"]["backbone"])}
    params["backbone"]["lm_head"] = {"kernel": 10.0 * setup["params"]["backbone"]["lm_head"]["kernel"]}
    g, steps = 8, 20
    config = grpo.GRPOConfig(num_generations=g, max_new_tokens=2, top_k=4,
                             reward=reward_lib.RewardConfig(lambda_causal=0.0))
    m, _ = grpo.memories(sampler, params["sampler"], batch)
    first = memory_lib.answer_logits(model, params["backbone"], batch.prefix, m, jnp.zeros((2, 1), jnp.int32),
                                     jnp.ones((2, 1), bool))[:, 0]
    targets = np.argsort(-np.asarray(first), axis=-1)[:, 1]

    def accuracy(tokens, lengths):
        return (tokens[:, 0] == np.repeat(targets, g)).astype(np.float32)

    def target_log_prob(p):
        ids = jnp.asarray(targets[:, None], jnp.int32)
        return np.asarray(memory_lib.answer_log_probs(model, p["backbone"], batch.prefix, m, ids,
                                                      jnp.ones((2, 1), bool))[:, 0])

    def run(lr):
        optimizer = grpo.make_optimizer(lr)
        step = grpo.make_grpo_step(model, sampler, config, optimizer)
        state, frozen = grpo.init_train_state(params, optimizer, jax.random.PRNGKey(7))
        history = []
        for _ in range(steps):
            state, metrics = step(state, frozen, batch, accuracy)
            history.append(metrics)
        return history, target_log_prob(freeze.merge(state.params, frozen))

    still, still_lp = run(0.0)
    trained, trained_lp = run(2e-2)
    for key in ("reward_mean", "reward_std", "r_acc", "r_causal", "advantage_mean", "advantage_std",
                "zero_variance_groups", "clip_fraction", "ratio_mean", "loss", "grad_norm", "completion_length"):
        assert np.isfinite(trained[0][key]), key
    assert trained[0]["reward_mean"] == still[0]["reward_mean"]  # same rollout before any update
    assert all(h["r_causal"] == 0.0 and h["ratio_mean"] == pytest.approx(1.0, abs=1e-6) for h in trained)
    np.testing.assert_allclose(still_lp, target_log_prob(params), atol=1e-6)  # lr = 0 leaves the policy alone
    late = slice(3 * steps // 4, steps)
    trained_late = np.mean([h["reward_mean"] for h in trained[late]])
    still_late = np.mean([h["reward_mean"] for h in still[late]])
    assert trained_late > still_late + 0.3, ([h["reward_mean"] for h in trained], [h["reward_mean"] for h in still])
    assert np.all(trained_lp > still_lp + 1.0), (trained_lp, still_lp)
