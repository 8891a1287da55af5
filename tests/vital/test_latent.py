"""The VITAL latent loop (Eq. 1-2): reference parity with transformers, train/inference parity, mixed-K batch
invariance, one compilation for every K."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conversion.torch_decoding import cache_keyword
from tests.models.test_decoding_layout import while_bodies_hold
from tests.vital.vital_fixtures import IMG, build, forward, make_batch, select
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.generation import SamplingConfig
from vital_jax.vital import latent
from vital_jax.vital.batch import from_numpy

pytestmark = pytest.mark.slow  # minutes in all; `pytest -m 'not slow'` leaves it out

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("vital"))


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_latent_states_and_answer_logits_match_a_stepwise_transformers_loop(tiny):
    """z_1..z_K and the answer logits equal transformers: prefill with its KV cache, feed last_hidden_state
    back as inputs_embeds with explicit (3, B, 1) positions, then teacher-forced answer tokens."""
    model, params, hf = tiny.model, tiny.params, tiny.hf_backbone
    k = 3
    batch, data = make_batch(model, seed=1, latent_steps=(k,), grids=((1, 4, 6),), answer_len=(4,))
    out = forward(model, params, batch)
    ids = data["prompt_ids"]
    length = ids.shape[1]
    answer = data["answer_ids"]
    with torch.no_grad():
        hf.model.rope_deltas = None
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(data["pixel_patches"]),
                 image_grid_thw=torch.tensor(data["image_grid_thw"], dtype=torch.long),
                 mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)), use_cache=True,
                 output_hidden_states=True)
        delta = int(hf.model.rope_deltas[0])
        keyword = cache_keyword(hf)
        past, z = getattr(ref, keyword), ref.hidden_states[-1][:, -1:]
        zs = [z]
        for step in range(k):
            pos = torch.full((3, 1, 1), length + step + delta)
            ref = hf(inputs_embeds=z, position_ids=pos, use_cache=True, output_hidden_states=True,
                     **{keyword: past})
            past, z = getattr(ref, keyword), ref.hidden_states[-1][:, -1:]
            zs.append(z)
        logits = [hf.lm_head(z)]
        for t in range(answer.shape[1] - 1):
            pos = torch.full((3, 1, 1), length + k + t + delta)
            ref = hf(input_ids=torch.tensor(answer[:, t:t + 1], dtype=torch.long), position_ids=pos,
                     use_cache=True, **{keyword: past})
            past = getattr(ref, keyword)
            logits.append(ref.logits)
    assert _diff(out.z0, zs[0][:, 0]) <= TOL
    assert _diff(out.z[:, :k], torch.cat(zs[1:], 1)) <= TOL
    valid = data["answer_valid"][0]
    assert _diff(np.asarray(out.answer_logits)[0][valid], torch.cat(logits, 1)[0].numpy()[valid]) <= TOL


def test_training_forward_and_inference_share_the_latent_path(tiny):
    """Train/inference parity: the inference path's z_k and first-token logits equal the training forward's, and
    teacher-forcing the generated answer reproduces the generated tokens and their logits."""
    model, params = tiny.model, tiny.params
    batch, data = make_batch(model, seed=2, latent_steps=(1, 3))
    sampling = SamplingConfig(max_new_tokens=5)
    tokens, lengths, z_inf = jax.jit(lambda bp, prefix, k: model.generate(bp, prefix, k, sampling))(
        params["backbone"], batch.prefix, batch.latent_steps)
    tokens = np.asarray(tokens)
    # The generated tokens as the answer: teacher forcing must predict exactly them.
    forced = batch.replace(answer_ids=jnp.asarray(tokens), answer_valid=jnp.ones(tokens.shape, bool))
    out = forward(model, params, forced)
    np.testing.assert_allclose(out.z, z_inf, atol=TOL)
    np.testing.assert_array_equal(np.argmax(np.asarray(out.answer_logits), -1), tokens)
    first = latent.lm_logits(model.backbone, params["backbone"], out.z[np.arange(2), batch.latent_steps - 1])
    assert _diff(first, out.answer_logits[:, 0]) <= TOL


def test_generation_prefills_a_stacked_cache_and_training_one_array_per_layer(tiny):
    """The cache's layout (`KVCache`): generation's token loop runs on the stacked layout, so generation prefills
    straight into it (stacking a per-layer cache before the loop would hold both for a moment); training programs
    (unrolled layers) take one array per layer."""
    model, params = tiny.model, tiny.params
    batch, _ = make_batch(model, seed=5, latent_steps=(1, 2))
    _, _, (generation_cache, _) = latent.answer_phases(model.backbone, params["backbone"], batch.prefix,
                                                       batch.latent_steps, 2, 3, until="prefill")
    assert not generation_cache.per_layer
    training_cache, _ = latent.encode_prefix(model.backbone, params["backbone"], batch.prefix, 40)
    assert training_cache.per_layer and len(training_cache.k) == model.backbone_config.text.num_hidden_layers


def test_a_scanned_backbone_generates_relaid_out_with_the_same_latents_and_tokens(tiny):
    """`generate_answer` relays a backbone held with scanned layers out once (the default; the training probe's
    case): neither the latent scan's steps nor the answer loop's tokens run a layer scan, and z and the tokens are
    those of the layout held (relayout=False, where both do)."""
    model, params = tiny.model, tiny.params
    scanned = dataclasses.replace(model, backbone_config=dataclasses.replace(
        model.backbone_config, text=dataclasses.replace(model.backbone_config.text, scan_layers=True)))
    backbone_params = qwen3_vl_params.to_layout(params["backbone"], True)
    batch, _ = make_batch(model, seed=4, latent_steps=(2, 3))
    sampling = SamplingConfig(max_new_tokens=4)

    def run(bp, relayout):
        return latent.generate_answer(scanned.backbone, bp, batch.prefix, batch.latent_steps, 3, sampling,
                                      relayout=relayout)

    for relayout, scans in ((None, False), (False, True)):
        jaxpr = jax.make_jaxpr(lambda bp: run(bp, relayout))(backbone_params)
        assert while_bodies_hold(jaxpr, "scan") == scans
        assert while_bodies_hold(jaxpr, "scan", loop="scan") == scans
    held = jax.jit(lambda bp: run(bp, False))(backbone_params)
    relaid = jax.jit(lambda bp: run(bp, None))(backbone_params)
    np.testing.assert_array_equal(np.asarray(relaid[0]), np.asarray(held[0]))
    np.testing.assert_array_equal(np.asarray(relaid[1]), np.asarray(held[1]))
    assert _diff(relaid[2], held[2]) <= TOL


def test_mixed_k_batch_equals_examples_run_alone(tiny):
    model, params = tiny.model, tiny.params
    grids = ((1, 4, 4), (1, 4, 6), (1, 6, 4), (1, 2, 4))
    batch, data = make_batch(model, seed=3, latent_steps=(1, 2, 3, 4), grids=grids, answer_len=(2, 4, 3, 5))
    forward = jax.jit(lambda p, b: model.forward(p, b))
    together = forward(params, batch)
    for row in range(4):
        alone = forward(params, from_numpy(select(data, [row]), model.backbone_config))
        k = int(data["latent_steps"][row])
        assert _diff(together.z[row, :k], alone.z[0, :k]) <= TOL
        for name in ("task_per_example", "text_per_example", "visual_per_example"):
            assert abs(float(getattr(together, name)[row]) - float(getattr(alone, name)[0])) <= TOL, name


def test_k_zero_is_the_plain_backbone_answer(tiny):
    model, params = tiny.model, tiny.params
    batch, data = make_batch(model, seed=4, latent_steps=(0, 2))
    out = forward(model, params, batch)
    plain = model.backbone.apply({"params": params["backbone"]}, input_ids=batch.prefix.input_ids,
                                 token_valid=batch.prefix.token_valid, positions=batch.prefix.positions,
                                 pixel_patches=batch.prefix.pixel_patches, vision_inputs=batch.prefix.vision_inputs)
    assert _diff(out.answer_logits[0, 0], plain.logits[0, -1]) <= TOL
    assert not out.valid_steps[0].any()
    # An example without latent steps adds nothing to L_text / L_visual.
    alone = forward(model, params, from_numpy(select(data, [1]), model.backbone_config))
    assert abs(float(out.text_loss) - float(alone.text_loss)) <= TOL
    assert abs(float(out.visual_loss) - float(alone.visual_loss)) <= TOL


def test_one_compilation_serves_every_k(tiny):
    model, params = tiny.model, tiny.params
    traces = []

    @jax.jit
    def loss(p, b):
        traces.append(1)
        return model.forward(p, b).loss

    for k in (1, 2, 3, 4):
        batch, _ = make_batch(model, seed=5, latent_steps=(k, max(1, k - 1)))
        assert np.isfinite(float(loss(params, batch)))
    assert len(traces) == 1


@pytest.fixture(scope="module")
def tiny_pause(tmp_path_factory):
    return build(tmp_path_factory.mktemp("vital_pause"), latent_input="pause")


def test_pause_control_feeds_learned_vectors_and_shares_the_inference_path(tiny_pause):
    """The pause control: slot k gets p_k (not z_{k-1}) as its input embedding, in training and inference alike;
    p_k are trainable and receive gradient; z_k is still the slot's output."""
    from vital_jax.vital import trainable

    model, params = tiny_pause.model, tiny_pause.params
    pause = params["pause_embeddings"]
    assert pause.shape == (model.config.k_max, model.backbone_config.text.hidden_size)
    batch, data = make_batch(model, seed=6, latent_steps=(2, 3))
    out = forward(model, params, batch)
    # Reference: the same cache fed p_1..p_K by hand.
    bp, backbone = params["backbone"], model.backbone
    cache_len = batch.prefix.input_ids.shape[1] + model.config.k_max + batch.answer_ids.shape[1]
    # (jitted: eager dispatch compiles each operation on its own, and that was most of this test's time)
    cache, _ = jax.jit(latent.encode_prefix, static_argnums=(0, 3))(backbone, bp, batch.prefix, cache_len)
    one_step = jax.jit(lambda bp, embeds, valid, cache: backbone.apply(
        {"params": bp}, inputs_embeds=embeds, token_valid=valid, kv_cache=cache, return_logits=False))
    for k in range(3):
        active = k < batch.latent_steps
        step = one_step(bp, jnp.broadcast_to(pause[k], (2, 1, pause.shape[1])), active[:, None], cache)
        cache = step.kv_cache
        for row in range(2):
            if bool(active[row]):
                assert _diff(out.z[row, k], step.hidden_states[row, 0]) <= TOL
    # Feeding z back instead gives other states: the switch is real.
    feedback = jax.jit(lambda bp, prefix, z0, steps: latent.latent_loop(
        backbone, bp, latent.encode_prefix(backbone, bp, prefix, cache_len)[0], z0, steps, model.config.k_max)[0])(
        bp, batch.prefix, out.z0, batch.latent_steps)
    assert _diff(feedback[:, 1], out.z[:, 1]) > 1e-3
    # Inference uses the same vectors; it refuses to run without them.
    sampling = SamplingConfig(max_new_tokens=4)
    tokens, _, z_inf = jax.jit(lambda bp, pre, k, p: model.generate(bp, pre, k, sampling, pause_embeddings=p))(
        bp, batch.prefix, batch.latent_steps, pause)
    np.testing.assert_allclose(out.z, z_inf, atol=TOL)
    with pytest.raises(ValueError, match="pause_embeddings"):
        model.generate(bp, batch.prefix, batch.latent_steps, sampling)
    # Trainable, with gradient.
    assert trainable.is_trainable("pause_embeddings")
    grads = jax.jit(jax.grad(lambda p: model.forward(dict(params, pause_embeddings=p), batch).loss))(pause)
    assert float(jnp.abs(grads[:3]).max()) > 0


def test_fewer_latent_slots_compute_the_same_forward(tiny):
    """A curriculum phase runs only the slots its K needs (slice_latent_slots): every term equals the K_max program's,
    and an example that needs more slots than kept is an error naming it."""
    from vital_jax.vital.batch import latent_slots, slice_latent_slots

    model, params = tiny.model, tiny.params
    _, data = make_batch(model, seed=6, latent_steps=(1, 2))
    full = forward(model, params, from_numpy(data, model.backbone_config))
    assert latent_slots(model.config.k_max, 2) == 2 and latent_slots(4, 4, latent_steps_cap=0) == 0
    two = slice_latent_slots(data, 2)
    assert two["step_ids"].shape[1] == 2
    out = forward(model, params, from_numpy(two, model.backbone_config))
    assert out.z.shape[1] == 2
    for name in ("loss", "task_per_example", "text_per_example", "visual_per_example"):
        assert _diff(getattr(out, name), getattr(full, name)) <= TOL, name
    assert _diff(out.z, full.z[:, :2]) <= TOL
    with pytest.raises(ValueError, match=r"record_index \[1\].*latent_steps \[2\]"):
        slice_latent_slots(data, 1)
    # With the cap, K_b = min(K, cap) must fit: K = 0 runs no latent slot at all and answers like the K_max program.
    zero = slice_latent_slots(data, 0, latent_steps_cap=0)
    capped = build_capped(model, 0)
    assert _diff(forward(capped, params, from_numpy(zero, model.backbone_config)).answer_logits,
                 forward(capped, params, from_numpy(data, model.backbone_config)).answer_logits) <= TOL


def build_capped(model, cap):
    import dataclasses

    return dataclasses.replace(model, config=dataclasses.replace(model.config, latent_steps_cap=cap))


def test_task_loss_is_the_token_mean_over_the_batchs_answer_tokens_or_the_example_mean(tiny):
    """L_task, "the standard next-token cross-entropy loss computed only over answer tokens" (§3.5): by default the
    mean over every valid answer token of the batch (computed here from the answer logits, as transformers' causal-LM
    loss does); `task_loss_reduction="example"` averages each answer's token mean over the examples. Answers of 2
    and 6 tokens, so the two differ; padding examples count in neither."""
    model, params = tiny.model, tiny.params
    batch, data = make_batch(model, seed=5, latent_steps=(1, 3, 2), grids=((1, 4, 4), (1, 4, 6), (1, 4, 4)),
                             answer_len=(2, 6, 4))
    batch = batch.replace(example_valid=jnp.asarray([True, True, False]))
    assert model.config.task_loss_reduction == "token"
    out = forward(model, params, batch)
    logp = torch.log_softmax(torch.from_numpy(np.array(out.answer_logits, np.float32)), dim=-1)
    labels = torch.from_numpy(np.where(data["answer_valid"], data["answer_ids"], -100)[:2].astype(np.int64))
    reference = torch.nn.functional.nll_loss(logp[:2].reshape(-1, logp.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    assert abs(float(out.task_loss) - float(reference)) <= 1e-5
    per_example = [float(torch.nn.functional.nll_loss(logp[i], labels[i], ignore_index=-100)) for i in range(2)]
    example = dataclasses.replace(model, config=dataclasses.replace(model.config, task_loss_reduction="example"))
    by_example = forward(example, params, batch)
    assert abs(float(by_example.task_loss) - np.mean(per_example)) <= 1e-5
    assert abs(float(by_example.task_loss) - float(out.task_loss)) > 1e-3
    assert _diff(by_example.task_per_example, out.task_per_example) == 0.0


def test_a_term_with_zero_weight_is_not_computed(tiny):
    """lambda_text = 0 (lambda_visual = 0): the decoder (projector) does not run, the term is 0 and unlogged; the task
    loss and its gradients are those of the full model."""
    import dataclasses

    import optax

    from vital_jax.vital.train_step import init_train_state, train_step

    model, params = tiny.model, tiny.params
    batch, _ = make_batch(model, seed=7, latent_steps=(1, 3))
    task_only = dataclasses.replace(model, config=dataclasses.replace(model.config, lambda_text=0.0,
                                                                     lambda_visual=0.0))
    out, full = forward(task_only, params, batch), forward(model, params, batch)
    assert float(out.text_loss) == 0.0 and float(out.visual_loss) == 0.0 and float(full.text_loss) > 0
    assert _diff(out.loss, full.task_loss) <= TOL
    # Nothing of the decoder is in the program: its parameters may be anything, even NaN.
    poisoned = {**params, "decoder": jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params["decoder"]),
                "visual_projector": jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params["visual_projector"])}
    assert np.isfinite(float(forward(task_only, poisoned, batch).loss))
    optimizer = optax.sgd(0.0)
    state, frozen = init_train_state(params, optimizer, jax.random.PRNGKey(0))
    _, metrics = jax.jit(lambda s, f, b: train_step(task_only, optimizer, s, f, b))(state, frozen, batch)
    assert "text_loss" not in metrics and "visual_loss" not in metrics and "task_loss" in metrics
