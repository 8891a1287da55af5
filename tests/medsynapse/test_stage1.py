"""Stage I warmup (Eq. 2): only P_phi trains; the loss is the answer NLL given the injected memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.medsynapse.medsynapse_fixtures import build_backbone, make_batch
from vital_jax import freeze
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse import stage1
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tiny = build_backbone(tmp_path_factory.mktemp("stage1_backbone"))
    sampler = DiagnosticMemorySampler(SamplerConfig(hidden_size=tiny.config.text.hidden_size, num_queries=4,
                                                    num_heads=4))
    data = make_batch(tiny.config, seed=2)
    features = jnp.asarray(np.random.RandomState(5).randn(2, 3, 4, 16).astype(np.float32))
    batch = stage1.WarmupBatch(prefix=data["prefix"], feature_map=features,
                               answer_ids=jnp.asarray(data["answer_ids"]),
                               answer_valid=jnp.asarray(data["answer_valid"]), example_valid=jnp.ones((2,), bool))
    params = {"sampler": sampler.init(jax.random.PRNGKey(0), features)["params"], "backbone": tiny.params}
    return tiny, sampler, batch, params


def _run(setup, learning_rate, steps):
    tiny, sampler, batch, params = setup
    optimizer = stage1.make_optimizer(learning_rate, weight_decay=0.0)
    state, frozen = stage1.init_train_state(params, optimizer, jax.random.PRNGKey(1))
    step = stage1.make_train_step(tiny.model, sampler, optimizer)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return state, frozen, losses


def test_one_step_updates_the_sampler_and_leaves_the_backbone_bitwise_unchanged(setup):
    _, _, _, params = setup
    state, frozen, _ = _run(setup, stage1.LEARNING_RATE, 1)
    merged = freeze.merge(state.params, frozen)
    for before, after in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(merged["backbone"])):
        assert np.array_equal(np.asarray(before), np.asarray(after))
    assert all(freeze.is_masked(x) for x in jax.tree.leaves(state.params["backbone"], is_leaf=freeze.is_masked))
    sampler_before, sampler_after = params["sampler"], merged["sampler"]
    for path in (("probes",), ("output_proj", "kernel"), ("layers_0", "cross_attn", "q_proj", "kernel"),
                 ("layers_1", "fc2", "kernel")):
        a, b = sampler_before, sampler_after
        for key in path:
            a, b = a[key], b[key]
        assert float(jnp.max(jnp.abs(a - b))) > 0, path
    # AdamW moments exist for phi only (two per sampler weight), none for the backbone.
    sampler_size = sum(x.size for x in jax.tree.leaves(params["sampler"]))
    moment_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moment_size == 2 * sampler_size


def test_loss_decreases_over_a_few_steps_and_stays_put_at_lr_zero(setup):
    _, _, still = _run(setup, 0.0, 4)
    _, _, trained = _run(setup, 1e-3, 4)
    assert trained[0] == pytest.approx(still[0], abs=1e-6)
    assert max(still) - min(still) <= 1e-6
    assert all(b < a for a, b in zip(trained, trained[1:])), trained
    assert trained[-1] < trained[0] - 0.05, trained


def test_warmup_loss_is_the_answer_nll_under_either_reduction(setup):
    tiny, sampler, batch, params = setup
    half = batch.replace(example_valid=jnp.asarray([True, False]))

    @jax.jit
    def losses(p, b):
        return (stage1.warmup_loss(tiny.model, sampler, p, b, "sum"),
                stage1.warmup_loss(tiny.model, sampler, p, b, "token_mean"))

    (loss_sum, aux), (loss_mean, _) = losses(params, half)
    memory = sampler.apply({"params": params["sampler"]}, batch.feature_map)
    log_probs = memory_lib.answer_log_probs(tiny.model, params["backbone"], batch.prefix, memory, batch.answer_ids,
                                            batch.answer_valid)
    nll0 = -float(log_probs[0].sum())
    assert float(aux["nll_per_example"][0]) == pytest.approx(nll0, rel=1e-5)
    assert float(aux["nll_per_example"][1]) == 0.0
    assert float(loss_sum) == pytest.approx(nll0, rel=1e-5)
    assert float(loss_mean) == pytest.approx(nll0 / int(batch.answer_valid[0].sum()), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        stage1.warmup_loss(tiny.model, sampler, params, batch, "mean")
