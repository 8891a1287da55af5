"""Gradients through the latent recurrence, masked optimizer state, the visual projector (Eq. 5), LoRA merge."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.vital.vital_fixtures import build, make_batch
from vital_jax.models.hf_mapping import flatten
from vital_jax.vital import trainable
from vital_jax.vital.heads import VisualProjector

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("vital_grads"), k_max=3)


def _lora_b_grads(grads):
    return {p: g for p, g in flatten(grads).items() if p.startswith("backbone") and p.endswith("lora_b")}


@pytest.mark.parametrize("term", ["text", "visual"])
def test_each_latent_step_sends_gradient_to_lora_through_the_recurrence(tiny, term):
    """Supervising only step k (of K = 3) gives non-zero LoRA gradients in every decoder layer, for every k: the
    auxiliary losses reach the backbone through z_k."""
    model, params = tiny.model, tiny.params
    mask = trainable.trainable_mask(params)
    train, frozen = trainable.split(params, mask)
    batch, data = make_batch(model, seed=7, latent_steps=(3, 3))

    @jax.jit
    def grads_for_step(t, b, onehot_k):
        def loss(t):
            out = model.forward(trainable.merge(t, frozen), b)
            if term == "text":
                return out.text_loss
            projected = model.visual_projector.apply({"params": t["visual_projector"]}, out.z)
            per_step = jnp.mean(jnp.abs(projected - b.roi_feature[:, None]), axis=(0, 2))
            return jnp.sum(per_step * onehot_k)
        return jax.grad(loss)(t)

    n_layers = model.backbone_config.text.num_hidden_layers
    for k in range(3):
        onehot = jnp.zeros((3,)).at[k].set(1.0)
        # Only step k has reasoning tokens (text term); the visual term weights only step k.
        b = batch.replace(step_valid=batch.step_valid & (onehot > 0)[None, :, None])
        lora = _lora_b_grads(grads_for_step(train, b, onehot))
        layers = {next(s for s in p.split("/") if s.startswith("layers_")) for p, g in lora.items()
                  if float(jnp.max(jnp.abs(g))) > 0}
        assert layers == {f"layers_{i}" for i in range(n_layers)}, (k, layers)


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(tiny):
    model, params = tiny.model, tiny.params
    mask = trainable.trainable_mask(params)
    train, frozen = trainable.split(params, mask)
    flat_train = flatten(jax.tree.map(lambda x: x, train, is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
    real = [p for p, v in flat_train.items() if not isinstance(v, optax.MaskedNode)]
    assert real and all(trainable.is_trainable(p) for p in real)
    assert any(p.startswith("backbone/visual") for p in flatten(params))
    assert not any(p.startswith("backbone/visual") or p.endswith("kernel") and p.startswith("backbone")
                   for p in real)
    opt = trainable.make_optimizer(1e-3, decay_mask=trainable.weight_decay_mask(train))
    state = opt.init(train)
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(train))
    n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    assert n_state == 2 * n_train  # Adam's mu and nu, for trainable leaves only
    batch, _ = make_batch(model, seed=8, latent_steps=(2, 3))
    grads = jax.jit(jax.grad(lambda t: model.forward(trainable.merge(t, frozen), batch).loss))(train)
    assert jax.tree.structure(grads) == jax.tree.structure(train)


def test_a_few_optimisation_steps_reduce_every_loss_term(tiny):
    model, params = tiny.model, tiny.params
    train, frozen = trainable.split(params, trainable.trainable_mask(params))
    opt = trainable.make_optimizer(3e-3, weight_decay=0.0)
    state = opt.init(train)
    batch, _ = make_batch(model, seed=9, latent_steps=(2, 3))

    @jax.jit
    def step(t, s):
        def loss(t):
            out = model.forward(trainable.merge(t, frozen), batch)
            return out.loss, out
        (_, out), g = jax.value_and_grad(loss, has_aux=True)(t)
        updates, s = opt.update(g, s, t)
        return optax.apply_updates(t, updates), s, out

    _, _, first = step(train, state)
    for _ in range(12):
        train, state, out = step(train, state)
    for term in ("task_loss", "text_loss", "visual_loss"):
        assert float(getattr(out, term)) < 0.9 * float(getattr(first, term)), term


def test_visual_projector_is_eq5():
    """VP(z) = LN(W2(GELU(W1 LN(z)) + z)), computed by hand in numpy on the module's own parameters."""
    d, dv = 6, 4
    vp = VisualProjector(dv, dropout=0.1)
    z = np.random.RandomState(0).randn(3, d).astype(np.float32) * 5.0
    params = vp.init(jax.random.PRNGKey(1), jnp.asarray(z))["params"]
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape), params)
    p = jax.tree.map(np.asarray, params)

    def ln(x, scale, bias):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * scale + bias

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    h = ln(z, p["norm_in"]["scale"], p["norm_in"]["bias"]) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = (gelu(h) + z) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    expected = ln(h, p["norm_out"]["scale"], p["norm_out"]["bias"])
    out = vp.apply({"params": params}, jnp.asarray(z))
    assert out.shape == (3, dv) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Eval mode is deterministic; training mode applies dropout after the GELU.
    again = vp.apply({"params": params}, jnp.asarray(z))
    np.testing.assert_array_equal(out, again)
    train = vp.apply({"params": params}, jnp.asarray(z), False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(train, out)


def test_merged_lora_equals_the_adapted_backbone(tiny):
    model, params = tiny.model, tiny.params
    bp = jax.tree_util.tree_map_with_path(
        lambda path, x: (jax.random.normal(jax.random.PRNGKey(len(path)), x.shape) * 0.05
                         if path[-1].key == "lora_b" else x), params["backbone"])
    batch, _ = make_batch(model, seed=10, latent_steps=(1, 3))
    prefix = batch.prefix
    kwargs = dict(input_ids=prefix.input_ids, token_valid=prefix.token_valid, positions=prefix.positions,
                  pixel_patches=prefix.pixel_patches, vision_inputs=prefix.vision_inputs)
    adapted = model.backbone.apply({"params": bp}, **kwargs).logits
    merged = trainable.merge_lora(bp, model.config.lora)
    assert not any("lora" in p for p in flatten(merged))
    from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
    plain = Qwen3VLForConditionalGeneration(model.backbone_config).apply({"params": merged}, **kwargs).logits
    base = Qwen3VLForConditionalGeneration(model.backbone_config).apply(
        {"params": trainable.merge_lora(params["backbone"], model.config.lora)}, **kwargs).logits
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-3  # the adapters do change the model
    np.testing.assert_allclose(plain, adapted, atol=1e-4)


def test_remat_of_layers_and_latent_steps_gives_the_same_training_step(tiny):
    """Rematerialisation (decoder layers and latent steps; every `remat_policy`) changes memory, not numbers —
    with dropout on."""
    import concurrent.futures
    import dataclasses
    import functools

    from benchmarks.xla_flops import matmul_flops
    from vital_jax.vital import train_step as ts

    model, params = tiny.model, tiny.params

    def remat_model(policy):
        text = dataclasses.replace(model.backbone_config.text, remat=True, remat_policy=policy)
        return dataclasses.replace(
            model, config=dataclasses.replace(model.config, remat_latent_steps=True),
            backbone_config=dataclasses.replace(model.backbone_config, text=text),
            decoder_config=dataclasses.replace(model.decoder_config, remat=True, remat_policy=policy))

    opt = trainable.make_optimizer(1e-3)
    batch, _ = make_batch(model, seed=13, latent_steps=(2, 3))
    # Compiling the steps dominates this test and XLA compiles a program on one core: compile them on two threads,
    # one step's while the next lowers.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        steps = []
        for m in (model, remat_model("full"), remat_model("dots"), remat_model("projections")):
            state, frozen = ts.init_train_state(params, opt, jax.random.PRNGKey(5))
            lowered = jax.jit(functools.partial(ts.train_step, m, opt)).lower(state, frozen, batch)
            steps.append((pool.submit(lowered.compile), state, frozen))
        results, executed_flops = [], []
        for compiled, state, frozen in steps:
            state, metrics = compiled.result()(state, frozen, batch)
            results.append((metrics, state.params))
            executed_flops.append(matmul_flops(compiled.result().as_text()))
    # Full remat runs every layer's matmuls again in the backward pass; "dots" keeps their outputs instead;
    # "projections" keeps the projections' outputs and runs the adapters' rank-r products and attention again.
    plain, full, dots, projections = executed_flops
    assert full > plain and dots < full and dots < projections < full, executed_flops
    for remat_result in results[1:]:
        for name in ("loss", "task_loss", "text_loss", "visual_loss", "grad_norm"):
            np.testing.assert_allclose(results[0][0][name], remat_result[0][name], rtol=1e-5, err_msg=name)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), results[0][1],
                                             remat_result[1]))
        assert max(diffs) <= 1e-5


def test_scanned_layers_give_the_same_loss_and_gradients_as_the_loop_layout(tiny):
    """`scan_layers` (with remat) through prefix, latent scan, answer and decoder: a re-layout, not a new model.

    Deterministic (no dropout): the two layouts draw per-layer dropout masks differently.
    """
    import concurrent.futures
    import dataclasses

    from vital_jax.models.qwen3 import params as qwen3_params
    from vital_jax.models.qwen3_vl import params as vl_params

    model, params = tiny.model, tiny.params
    scan_model = dataclasses.replace(
        model, backbone_config=dataclasses.replace(
            model.backbone_config, text=dataclasses.replace(model.backbone_config.text, scan_layers=True,
                                                            remat=True)),
        decoder_config=dataclasses.replace(model.decoder_config, scan_layers=True, remat=True))

    def to_layout(tree, scan):
        return {**tree, "backbone": vl_params.to_layout(tree["backbone"], scan),
                "decoder": qwen3_params.to_layout(tree["decoder"], scan)}

    batch, _ = make_batch(model, seed=17, latent_steps=(3, 1))
    # Compiling dominates and XLA compiles one program per core: the two layouts compile on two threads.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = []
        for m, p in ((model, params), (scan_model, to_layout(params, True))):
            train, frozen = trainable.split(p, trainable.trainable_mask(p))
            loss = jax.jit(jax.value_and_grad(
                lambda t, f, m=m: m.forward(trainable.merge(t, f), batch, deterministic=True).loss))
            jobs.append((pool.submit(loss.lower(train, frozen).compile), train, frozen))
        results = []
        for compiled, train, frozen in jobs:
            value, grads = compiled.result()(train, frozen)
            results.append((float(value), to_layout(grads, False)))
    assert abs(results[0][0] - results[1][0]) <= 1e-5 * abs(results[0][0])
    assert jax.tree.structure(results[0][1]) == jax.tree.structure(results[1][1])
    rel = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))) / (float(jnp.max(jnp.abs(a))) + 1e-12), results[0][1],
        results[1][1]))
    assert len(rel) > 10 and max(rel) <= 1e-5


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """Both models loaded in bf16 storage with bf16 compute, as configs/vital_qwen3vl_8b.py loads the backbone."""
    return build(tmp_path_factory.mktemp("vital_bf16"), k_max=2, dtype="bfloat16", param_dtype="bfloat16")


def test_trainables_and_adam_moments_are_float32_and_every_adapter_entry_moves_at_lr_2e_5(tiny_bf16):
    """fp32 master weights (issue #18): over a bf16 base, one AdamW step at the recipe's 2e-5 moves every LoRA entry
    (in bf16, an update of 2e-5 rounds away for every |a| >= 2**-7), and everything the optimizer holds is fp32."""
    from vital_jax.vital import train_step as ts

    model, params = tiny_bf16.model, tiny_bf16.params
    frozen_kernels = [v for p, v in flatten(params).items() if p.startswith("backbone") and p.endswith("kernel")]
    assert frozen_kernels and all(v.dtype == jnp.bfloat16 for v in frozen_kernels)
    opt = trainable.make_optimizer(2e-5)
    step = jax.jit(functools.partial(ts.train_step, model, opt))
    batch, _ = make_batch(model, seed=21, latent_steps=(1, 2))

    def lora(tree, name):
        return {p: np.asarray(v) for p, v in flatten(tree).items() if p.endswith(name)}

    # Fresh adapters: lora_b = 0, so lora_a has no gradient yet; a half-trained state (lora_b != 0) trains both.
    half_trained = jax.tree_util.tree_map_with_path(
        lambda path, x: (0.02 * jax.random.normal(jax.random.PRNGKey(len(path)), x.shape)).astype(x.dtype)
        if path[-1].key == "lora_b" else x, params)
    for name, start in (("fresh", params), ("half-trained", half_trained)):
        state, frozen = ts.init_train_state(start, opt, jax.random.PRNGKey(5))
        for tree in (state.params, state.opt_state):
            dtypes = {x.dtype for x in jax.tree.leaves(tree) if np.ndim(x) > 0}
            assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)
        new_state, _ = step(state, frozen, batch)
        assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
        leaves = ("lora_b",) if name == "fresh" else ("lora_a", "lora_b")
        for leaf in leaves:
            before, after = lora(state.params, leaf), lora(new_state.params, leaf)
            assert len(before) == 7 * model.backbone_config.text.num_hidden_layers  # q k v o gate up down
            for path in before:
                stuck = before[path] == after[path]
                large = np.abs(before[path]) > 0.008
                assert not stuck.any(), (f"{name} {path}: {int(stuck.sum())} of {stuck.size} entries unchanged "
                                         f"({int((stuck & large).sum())} of them with |x| > 0.008)")


def test_the_schedule_spans_the_curriculum_or_restarts_each_phase():
    steps, peak = (40, 60, 100), 1e-3
    one = trainable.curriculum_schedule(peak, steps, 0.05, "curriculum")
    each = trainable.curriculum_schedule(peak, steps, 0.05, "phase")
    whole = trainable.warmup_cosine_schedule(peak, 200, 0.05)
    assert all(float(one(s)) == float(whole(s)) for s in (0, 10, 40, 150, 199))
    for start, n in ((0, 40), (40, 60), (100, 100)):  # each phase: warmup from 0 over 5 % of its own steps
        warmup = max(1, round(0.05 * n))
        assert float(each(start)) == 0.0 and float(each(start + warmup)) == pytest.approx(peak)
        assert float(each(start + n - 1)) < 0.01 * peak
    assert float(one(40)) > 0.9 * peak  # one schedule: phase 2 starts near the peak, no warmup
    with pytest.raises(ValueError, match="schedule scope 'epoch'"):
        trainable.curriculum_schedule(peak, steps, 0.05, "epoch")


def test_fresh_moments_restart_adam_and_keep_the_schedules_count():
    params = {"w": jnp.ones((3,)), "frozen": trainable.MASKED}
    schedule = trainable.warmup_cosine_schedule(1e-2, 100)
    optimizer = trainable.make_optimizer(schedule)
    state = optimizer.init(params)
    for _ in range(3):
        _, state = optimizer.update({"w": jnp.full((3,), 0.5), "frozen": trainable.MASKED}, state, params)
    fresh = trainable.fresh_moments(state)
    adam = [s for s in jax.tree.leaves(fresh, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1 and int(adam[0].count) == 0
    assert not np.any(np.asarray(adam[0].mu["w"])) and not np.any(np.asarray(adam[0].nu["w"]))
    counts = [s.count for s in jax.tree.leaves(fresh, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    assert [int(c) for c in counts] == [3]  # the learning rate goes on from the global step
    # The first update after the restart is Adam's first: lr * sign(g) (bias-corrected), whatever came before.
    updates, _ = optimizer.update({"w": jnp.full((3,), 0.5), "frozen": trainable.MASKED}, fresh, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -float(schedule(3)) * (1 + 0.01), rtol=1e-4)
