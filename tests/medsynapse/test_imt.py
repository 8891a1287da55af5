"""Stage III, Intrinsic Memory Transition (Eq. 6-8): the generalised JSD, A_psi on variable visual tokens, the loss
over an on-policy student trajectory, and a train step in which only A_psi moves."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.medsynapse.medsynapse_fixtures import IM_END, build_backbone, make_batch
from tests.models.test_decoding_layout import while_bodies_hold
from vital_jax import freeze
from vital_jax.generation import SamplingConfig
from vital_jax.medsynapse import autonomous as autonomous_lib
from vital_jax.medsynapse import imt
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse.autonomous import AutonomousConfig, AutonomousMemory
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig
from vital_jax.models.hf_mapping import flatten
from vital_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vital_jax.models.qwen3_vl import params as qwen3_vl_params


def _np_jsd(t_logits, s_logits, beta):
    """Eq. (8) straight from the definition, float64."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(np.float64(t_logits)), softmax(np.float64(s_logits))
    m = beta * p + (1 - beta) * q
    kl = lambda a, b: np.sum(a * (np.log(a) - np.log(b)), -1)  # noqa: E731
    return beta * kl(p, m) + (1 - beta) * kl(q, m), kl(p, q), kl(q, p)


def _logits(seed, shape, scale=2.0):
    return (scale * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


# ---- JSD_beta (Eq. 8) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_a_numpy_reference(beta):
    t, s = _logits(0, (3, 5, 37)), _logits(1, (3, 5, 37))
    ours = np.asarray(imt.generalized_jsd(jnp.asarray(t), jnp.asarray(s), beta))
    ref, _, _ = _np_jsd(t, s, beta)
    assert ours.shape == (3, 5) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # Not symmetric unless beta = 0.5: the argument order is the paper's (teacher, student).
    swapped = np.asarray(imt.generalized_jsd(jnp.asarray(s), jnp.asarray(t), beta))
    np.testing.assert_allclose(swapped, _np_jsd(s, t, beta)[0], rtol=1e-5, atol=1e-6)


def test_jsd_is_zero_iff_the_distributions_match():
    t = _logits(2, (4, 50))
    same = imt.generalized_jsd(jnp.asarray(t), jnp.asarray(t + 3.7), 0.5)  # a shift leaves softmax unchanged
    assert float(jnp.max(jnp.abs(same))) <= 1e-6
    moved = t.copy()
    moved[:, 7] += 0.5
    differs = imt.generalized_jsd(jnp.asarray(t), jnp.asarray(moved), 0.5)
    assert float(jnp.min(differs)) > 1e-6  # one logit moved by 0.5: small but clearly not zero
    np.testing.assert_allclose(differs, _np_jsd(t, moved, 0.5)[0], rtol=1e-2)
    assert float(jnp.min(imt.generalized_jsd(jnp.asarray(t), jnp.asarray(_logits(3, (4, 50))), 0.5))) > 0


def test_jsd_at_half_is_at_most_ln2_and_approaches_it_for_disjoint_supports():
    many = imt.generalized_jsd(jnp.asarray(_logits(4, (200, 30), 6.0)), jnp.asarray(_logits(5, (200, 30), 6.0)))
    assert float(jnp.max(many)) <= math.log(2) + 1e-6
    t, s = np.full((1, 10), -40.0, np.float32), np.full((1, 10), -40.0, np.float32)
    t[0, :5], s[0, 5:] = 40.0, 40.0  # (numerically) disjoint supports
    disjoint = float(imt.generalized_jsd(jnp.asarray(t), jnp.asarray(s), 0.5)[0])
    assert math.log(2) - 1e-4 <= disjoint <= math.log(2) + 1e-6
    # The general bound is the binary entropy of beta.
    beta = 0.2
    h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert float(imt.generalized_jsd(jnp.asarray(t), jnp.asarray(s), beta)[0]) == pytest.approx(h, abs=1e-4)


def test_jsd_limits_at_beta_zero_and_one_are_the_documented_ones():
    t, s = _logits(6, (3, 40)), _logits(7, (3, 40))
    _, kl_ts, kl_st = _np_jsd(t, s, 0.5)
    for beta in (0.0, 1.0):
        out = np.asarray(imt.generalized_jsd(jnp.asarray(t), jnp.asarray(s), beta))
        assert np.all(out == 0.0), beta  # Eq. (8) vanishes at both ends (and is not nan there)
    small = 1e-4
    forward = np.asarray(imt.generalized_jsd(jnp.asarray(t), jnp.asarray(s), small)) / small
    reverse = np.asarray(imt.generalized_jsd(jnp.asarray(t), jnp.asarray(s), 1 - small)) / small
    np.testing.assert_allclose(forward, kl_ts, rtol=5e-3)  # -> KL(pi+ || pi-)
    np.testing.assert_allclose(reverse, kl_st, rtol=5e-3)  # -> KL(pi- || pi+)
    assert not np.allclose(kl_ts, kl_st, rtol=2e-2)  # so the two limits are told apart
    with pytest.raises(ValueError, match="beta"):
        imt.generalized_jsd(jnp.asarray(t), jnp.asarray(s), 1.5)


# ---- A_psi (Eq. 6) ----------------------------------------------------------------------------------------------

def test_autonomous_memory_handles_a_variable_number_of_visual_tokens_padding_and_several_images():
    cfg = AutonomousConfig(hidden_size=24, num_queries=5, mlp_hidden=18)
    module = AutonomousMemory(cfg)
    rng = np.random.RandomState(0)
    tokens = rng.randn(3, 11, 24).astype(np.float32)
    valid = np.zeros((3, 11), bool)
    valid[0, 2:9] = True  # 7 tokens, padded on both sides
    valid[1, [0, 3, 4, 10]] = True  # 4 tokens, e.g. two images' tokens among text
    params = module.init(jax.random.PRNGKey(0), jnp.asarray(tokens), jnp.asarray(valid))["params"]
    out = np.asarray(module.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(valid)))
    assert out.shape == (3, 5, 24) and out.dtype == np.float32 and np.all(np.isfinite(out))
    # The same parameters serve any token count: each row alone, unpadded, gives the same memory ...
    for row in (0, 1):
        alone = tokens[row][valid[row]][None]
        one = module.apply({"params": params}, jnp.asarray(alone), jnp.ones(alone.shape[:2], bool))
        np.testing.assert_allclose(one[0], out[row], atol=1e-5)
        # ... and so does any order of the tokens (images) and any junk in the padding.
        perm = alone[:, rng.permutation(alone.shape[1])]
        np.testing.assert_allclose(module.apply({"params": params}, jnp.asarray(perm),
                                                jnp.ones(perm.shape[:2], bool))[0], out[row], atol=1e-5)
    junk = tokens.copy()
    junk[~valid] = 1e3 * rng.randn(int((~valid).sum()), 24)
    np.testing.assert_allclose(module.apply({"params": params}, jnp.asarray(junk), jnp.asarray(valid)), out,
                               atol=1e-5)
    # No visual token at all (row 2): the memory is the MLP of a zero pool, not nan.
    zero = jax.nn.gelu(params["fc1"]["bias"], approximate=False) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
    np.testing.assert_allclose(out[2], np.broadcast_to(zero, (5, 24)), atol=1e-6)
    # The N slots are different summaries, not copies of the mean.
    assert float(np.min(np.std(out[0], axis=0).mean())) > 1e-3
    with pytest.raises(ValueError, match="visual tokens"):
        module.apply({"params": params}, jnp.zeros((1, 3, 23)), jnp.ones((1, 3), bool))


def test_teacher_mean_init_starts_every_input_at_the_mean_memory_and_fc2_trains_first():
    cfg = AutonomousConfig(hidden_size=12, num_queries=3, mlp_hidden=10)
    module = AutonomousMemory(cfg)
    rng = np.random.RandomState(1)
    tokens = jnp.asarray(rng.randn(2, 5, 12).astype(np.float32))
    valid = jnp.asarray(np.array([[True] * 5, [False] * 5]))  # the second row has no visual token
    params = module.init(jax.random.PRNGKey(0), tokens, valid)["params"]
    assert np.array_equal(params["slot_bias"], np.zeros((3, 12)))  # random init: the MLP alone, as before
    mean = rng.randn(3, 12).astype(np.float32)
    started = autonomous_lib.teacher_mean_init(params, mean)
    out = np.asarray(module.apply({"params": started}, tokens, valid))
    np.testing.assert_array_equal(out, np.broadcast_to(mean, out.shape))  # every image, and no image at all
    for key in ("queries", "norm", "fc1"):  # the rest keeps its random init
        assert jax.tree.all(jax.tree.map(np.array_equal, started[key], params[key]))

    def loss(p):
        return jnp.sum(jnp.square(module.apply({"params": p}, tokens, valid) - 1.0))

    grads = jax.grad(loss)(started)
    assert float(jnp.abs(grads["fc2"]["kernel"]).max()) > 0 and float(jnp.abs(grads["slot_bias"]).max()) > 0
    with pytest.raises(ValueError, match="mean memory"):
        autonomous_lib.teacher_mean_init(params, mean[:2])


# ---- Stage III on the tiny backbone -----------------------------------------------------------------------------

SAMPLING = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_token_ids=(IM_END,))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = build_backbone(tmp_path_factory.mktemp("imt_backbone"))
    d = tiny.config.text.hidden_size
    # Memories at unit scale (lecun output) / 0.5 RMS, so both visibly move the answer distribution.
    sampler = DiagnosticMemorySampler(SamplerConfig(hidden_size=d, num_queries=4, num_heads=4, output_rms=None))
    autonomous = AutonomousMemory(AutonomousConfig(hidden_size=d, num_queries=4, mlp_hidden=40, output_rms=0.5))
    data = make_batch(tiny.config, seed=3)
    features = jnp.asarray(np.random.RandomState(8).randn(2, 3, 4, 16).astype(np.float32))
    batch = imt.IMTBatch(prefix=data["prefix"], feature_map=features, example_valid=jnp.ones((2,), bool))
    params = {"backbone": tiny.params,
              "sampler": sampler.init(jax.random.PRNGKey(0), features)["params"],
              "autonomous": autonomous.init(jax.random.PRNGKey(1), jnp.zeros((1, 2, d)),
                                            jnp.ones((1, 2), bool))["params"]}
    return tiny, sampler, autonomous, batch, params


def test_visual_tokens_are_the_backbones_merged_image_features_at_the_image_slots(setup):
    tiny, _, _, batch, _ = setup
    prefix, tokens, valid = jax.jit(lambda p, pre: autonomous_lib.visual_tokens(tiny.model, p, pre))(
        tiny.params, batch.prefix)
    embeds, _ = tiny.model.apply({"params": tiny.params}, batch.prefix.pixel_patches, batch.prefix.vision_inputs,
                                 method=tiny.model.encode_images)
    counts = [4 * 4 // 4, 4 * 6 // 4]  # the fixture's grids (1, 4, 4) and (1, 4, 6)
    assert np.asarray(valid).sum(axis=1).tolist() == counts
    np.testing.assert_allclose(np.asarray(tokens)[np.asarray(valid)], np.asarray(embeds)[:sum(counts)], atol=1e-6)
    assert np.all(np.asarray(tokens)[~np.asarray(valid)] == 0)
    assert prefix.pixel_patches is None and prefix.image_features is not None


def test_loss_is_the_jsd_of_both_branches_on_the_students_own_trajectory(setup):
    """imt_loss (shared prompt cache) == JSD between memory.answer_logits with M_pri and with M_auto over the
    trajectory, per-trajectory mean over valid examples; the rollout is memory.generate with M_auto."""
    tiny, sampler, autonomous, batch, params = setup
    rng = jax.random.PRNGKey(3)
    tokens, lengths = jax.jit(lambda p, pre, r: imt.rollout(tiny.model, autonomous, p, pre, SAMPLING, r))(
        params, batch.prefix, rng)
    _, m_auto = autonomous_lib.autonomous_memory(tiny.model, autonomous, params, batch.prefix)
    ref_tokens, ref_lengths = jax.jit(lambda p, pre, m, r: memory_lib.generate(tiny.model, p, pre, m, SAMPLING, r))(
        tiny.params, batch.prefix, m_auto, rng)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(lengths, ref_lengths)

    half = batch.replace(example_valid=jnp.asarray([True, False]))
    loss, aux = jax.jit(lambda p, b, t, n: imt.imt_loss(tiny.model, sampler, autonomous, p, b, t, n))(
        params, half, tokens, lengths)
    valid = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    m_pri = sampler.apply({"params": params["sampler"]}, batch.feature_map)
    logits = jax.jit(lambda p, pre, m, a, v: memory_lib.answer_logits(tiny.model, p, pre, m, a, v))
    teacher = np.asarray(logits(tiny.params, batch.prefix, m_pri, tokens, jnp.asarray(valid)))
    student = np.asarray(logits(tiny.params, batch.prefix, m_auto, tokens, jnp.asarray(valid)))
    jsd = _np_jsd(teacher, student, imt.BETA)[0]
    per_example = np.where(valid, jsd, 0).sum(1) / valid.sum(1)
    np.testing.assert_allclose(aux["jsd_per_example"], per_example, rtol=1e-4, atol=1e-7)
    assert float(loss) == pytest.approx(per_example[0], rel=1e-4)
    assert per_example.min() > 1e-4  # the two memories really condition the answer differently


def test_user_turn_branches_follow_the_memory_paths_with_the_prompt_tail(setup):
    """With the memory inside the user turn (prompt_tail > 0) the shared-cache rollout is memory.generate and the
    loss the JSD of memory.answer_logits, both with the same prompt_tail."""
    tiny, sampler, autonomous, batch, params = setup
    rng, tail = jax.random.PRNGKey(3), 2
    tokens, lengths = jax.jit(lambda p, pre, r: imt.rollout(tiny.model, autonomous, p, pre, SAMPLING, r,
                                                            prompt_tail=tail))(params, batch.prefix, rng)
    _, m_auto = autonomous_lib.autonomous_memory(tiny.model, autonomous, params, batch.prefix)
    ref_tokens, ref_lengths = jax.jit(lambda p, pre, m, r: memory_lib.generate(
        tiny.model, p, pre, m, SAMPLING, r, prompt_tail=tail))(tiny.params, batch.prefix, m_auto, rng)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(lengths, ref_lengths)
    loss, aux = jax.jit(lambda p, b, t, n: imt.imt_loss(tiny.model, sampler, autonomous, p, b, t, n,
                                                        prompt_tail=tail))(params, batch, tokens, lengths)
    valid = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    m_pri = sampler.apply({"params": params["sampler"]}, batch.feature_map)
    logits = jax.jit(lambda m: memory_lib.answer_logits(tiny.model, tiny.params, batch.prefix, m, tokens,
                                                        jnp.asarray(valid), prompt_tail=tail))
    jsd = _np_jsd(np.asarray(logits(m_pri)), np.asarray(logits(m_auto)), imt.BETA)[0]
    np.testing.assert_allclose(aux["jsd_per_example"], np.where(valid, jsd, 0).sum(1) / valid.sum(1), rtol=1e-4,
                               atol=1e-7)


def test_gradients_reach_psi_only(setup):
    """d loss / d phi is exactly zero although the loss depends on phi (the teacher is a fixed target); every A_psi
    weight gets a gradient."""
    tiny, sampler, autonomous, batch, params = setup
    tokens, lengths = imt.rollout(tiny.model, autonomous, params, batch.prefix, SAMPLING, jax.random.PRNGKey(4))

    @jax.jit
    def grads(p):
        return jax.value_and_grad(lambda q: imt.imt_loss(tiny.model, sampler, autonomous, q, batch, tokens,
                                                         lengths)[0])(p)

    loss, g = grads(params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g["sampler"]))
    for path, x in flatten(g["autonomous"]).items():
        assert float(jnp.max(jnp.abs(x))) > 0, path
    moved = jax.tree.map(lambda x: x * 1.5, params["sampler"])
    loss_moved, _ = grads({**params, "sampler": moved})
    assert abs(float(loss_moved) - float(loss)) > 1e-6


def _train(setup, learning_rate, steps, sampling):
    tiny, sampler, autonomous, batch, params = setup
    optimizer = imt.make_optimizer(learning_rate, weight_decay=0.0)
    state, frozen = imt.init_train_state(params, optimizer, jax.random.PRNGKey(2))
    step = imt.make_train_step(tiny.model, sampler, autonomous, optimizer, sampling)
    history = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        history.append(metrics)
    return state, frozen, history


def test_train_steps_move_only_psi_and_lower_the_divergence(setup):
    tiny, sampler, autonomous, batch, params = setup
    greedy = SamplingConfig(max_new_tokens=5, eos_token_ids=(IM_END,))  # a fixed trajectory per psi: less noise
    state, frozen, history = _train(setup, 3e-2, 6, greedy)
    merged = freeze.merge(state.params, frozen)
    for top in ("backbone", "sampler"):
        assert all(freeze.is_masked(x) for x in jax.tree.leaves(state.params[top], is_leaf=freeze.is_masked))
        for before, after in zip(jax.tree.leaves(params[top]), jax.tree.leaves(merged[top])):
            assert np.array_equal(np.asarray(before), np.asarray(after)), top
    for before, after in zip(jax.tree.leaves(params["autonomous"]), jax.tree.leaves(merged["autonomous"])):
        assert float(jnp.max(jnp.abs(before - after))) > 0
    # AdamW moments for psi only (two per weight).
    psi_size = sum(x.size for x in jax.tree.leaves(params["autonomous"]))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * psi_size
    losses = [float(m["loss"]) for m in history]
    assert all(np.isfinite(losses)) and float(history[0]["grad_norm"]) > 0
    assert losses[-1] < 0.7 * losses[0], losses
    first = history[0]
    assert first["trajectory"].shape == (2, greedy.max_new_tokens)
    assert 1 <= float(first["trajectory_length"]) <= greedy.max_new_tokens
    assert float(history[-1]["memory_gap_rms"]) >= 0


def test_memory_match_adds_the_relative_error_of_the_students_memory_and_training_closes_it(setup):
    """memory_match = w: the loss is Eq. (7) + w ||M_auto - M_pri||^2 / ||M_pri||^2 (numpy reference, mean over
    valid examples); its gradient still reaches psi only; training with it lowers that error, which the default
    (w = 0) leaves alone."""
    tiny, sampler, autonomous, batch, params = setup
    tokens, lengths = imt.rollout(tiny.model, autonomous, params, batch.prefix, SAMPLING, jax.random.PRNGKey(5))
    half = batch.replace(example_valid=jnp.asarray([False, True]))
    loss = jax.jit(lambda p, w: imt.imt_loss(tiny.model, sampler, autonomous, p, half, tokens, lengths,
                                             memory_match=w)[0], static_argnums=1)
    _, m_auto = autonomous_lib.autonomous_memory(tiny.model, autonomous, params, batch.prefix)
    m_pri = np.asarray(sampler.apply({"params": params["sampler"]}, batch.feature_map), np.float64)
    m_auto = np.asarray(m_auto, np.float64)
    error = ((m_auto - m_pri) ** 2).sum(axis=(1, 2)) / (m_pri ** 2).sum(axis=(1, 2))
    assert float(loss(params, 2.0)) - float(loss(params, 0.0)) == pytest.approx(2.0 * error[1], rel=1e-4)
    g = jax.jit(jax.grad(lambda p: imt.imt_loss(tiny.model, sampler, autonomous, p, batch, tokens, lengths,
                                                memory_match=2.0)[0]))(params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g["sampler"]))
    with pytest.raises(ValueError, match="memory_match must be >= 0"):
        imt.imt_loss(tiny.model, sampler, autonomous, params, batch, tokens, lengths, memory_match=-1.0)

    greedy = SamplingConfig(max_new_tokens=3, eos_token_ids=(IM_END,))
    optimizer = imt.make_optimizer(3e-2, weight_decay=0.0)
    errors = {}
    for w in (0.0, 5.0):
        state, frozen = imt.init_train_state(params, optimizer, jax.random.PRNGKey(2))
        step = imt.make_train_step(tiny.model, sampler, autonomous, optimizer, greedy, memory_match=w)
        history = []
        for _ in range(6):
            state, metrics = step(state, frozen, batch)
            history.append(float(metrics["memory_match_error"]))
        errors[w] = history
        assert float(metrics["loss"]) == pytest.approx(float(metrics["jsd"]) + w * history[-1], rel=1e-4, abs=1e-6)
    assert errors[0.0][0] == pytest.approx(errors[5.0][0], rel=1e-5)  # the same start
    assert errors[5.0][-1] < 0.5 * errors[5.0][0], errors
    assert errors[5.0][-1] < errors[0.0][-1], errors


@pytest.mark.parametrize("relayout, scans", [(None, False), (False, True)])
def test_the_student_rollout_of_a_scanned_backbone_is_relaid_out_unless_told_not_to(setup, relayout, scans):
    """`make_train_step(relayout=...)` (the trainer passes `medsynapse.rollout_relayout`): with scanned text layers
    the step's decode loop runs no layer scan unless relayout is False."""
    tiny, sampler, autonomous, batch, params = setup
    config = dataclasses.replace(tiny.config, text=dataclasses.replace(tiny.config.text, scan_layers=True))
    scanned = {**params, "backbone": qwen3_vl_params.to_layout(params["backbone"], True)}
    optimizer = imt.make_optimizer(1e-3, weight_decay=0.0)
    state, frozen = imt.init_train_state(scanned, optimizer, jax.random.PRNGKey(2))
    step = imt.make_train_step(Qwen3VLForConditionalGeneration(config), sampler, autonomous, optimizer,
                               imt.rollout_sampling((IM_END,), 3), relayout=relayout)
    assert while_bodies_hold(jax.make_jaxpr(step)(state, frozen, batch), "scan") == scans


def test_init_train_state_wants_the_three_stage_iii_trees(setup):
    _, _, _, _, params = setup
    with pytest.raises(ValueError, match="Stage III params"):
        imt.init_train_state({"backbone": params["backbone"], "autonomous": params["autonomous"]},
                             imt.make_optimizer(), jax.random.PRNGKey(0))
