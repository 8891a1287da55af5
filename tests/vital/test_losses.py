"""Loss terms on hand-computable inputs: CE masking, per-example step means, Eq. (6) reductions, Eq. (8)."""

import jax.numpy as jnp
import numpy as np
import pytest

from vital_jax.vital import losses
from vital_jax.vital.config import VitalConfig


def test_token_cross_entropy_averages_valid_tokens_only():
    logits = jnp.log(jnp.asarray([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    targets = jnp.asarray([[0, 1, 1]])
    mask = jnp.asarray([[True, True, False]])
    loss, has = losses.token_cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(loss, [(-np.log(0.5) - np.log(0.1)) / 2], rtol=1e-6)
    assert bool(has[0])
    empty, has_none = losses.token_cross_entropy(logits, targets, jnp.zeros_like(mask))
    assert float(empty[0]) == 0.0 and not bool(has_none[0])


def test_visual_loss_reductions_and_valid_steps():
    projected = jnp.asarray([[[1.0, 2.0], [3.0, 5.0], [100.0, 100.0]]])  # (B=1, K=3, dv=2)
    target = jnp.asarray([[1.0, 1.0]])
    valid = losses.step_mask(jnp.asarray([2]), 3)
    mean, has = losses.visual_loss(projected, target, valid, "mean")
    total, _ = losses.visual_loss(projected, target, valid, "sum")
    # step 1: |0| + |1| ; step 2: |2| + |4|; step 3 is masked.
    np.testing.assert_allclose(mean, [((0 + 1) / 2 + (2 + 4) / 2) / 2])
    np.testing.assert_allclose(total, [(1 + 6) / 2])
    assert bool(has[0])


def test_interpolated_targets_follow_eq8():
    roi = jnp.asarray([[1.0, 0.0]])
    glob = jnp.asarray([[0.0, 1.0]])
    targets = np.asarray(losses.interpolated_targets(roi, glob, jnp.asarray([4]), 4))
    for k, alpha in enumerate([0.0, 1 / 3, 2 / 3, 1.0]):
        mixed = np.array([alpha, 1 - alpha])
        np.testing.assert_allclose(targets[0, k], mixed / np.linalg.norm(mixed), atol=1e-6)
    single = np.asarray(losses.interpolated_targets(roi, glob, jnp.asarray([1]), 4))
    np.testing.assert_allclose(single[0, 0], [1.0, 0.0], atol=1e-6)


def test_joint_loss_is_eq7_and_weighted_mean_skips_examples():
    assert float(losses.joint_loss(2.0, 3.0, 5.0, 1.0, 0.1)) == 2.0 + 3.0 + 0.5
    per = jnp.asarray([1.0, 10.0, 4.0])
    assert float(losses.weighted_mean(per, jnp.asarray([True, False, True]))) == 2.5
    assert float(losses.weighted_mean(per, jnp.zeros(3, bool))) == 0.0


def test_token_mean_weighs_each_example_by_its_tokens():
    # Example token means 1 (2 tokens), 10 (excluded), 4 (6 tokens): every counted token once.
    per, counts = jnp.asarray([1.0, 10.0, 4.0]), jnp.asarray([2, 3, 6])
    weight = jnp.asarray([True, False, True])
    assert float(losses.token_mean(per, counts, weight)) == (1.0 * 2 + 4.0 * 6) / 8
    assert float(losses.token_mean(per, counts, jnp.zeros(3, bool))) == 0.0
    with pytest.raises(ValueError, match="task_loss_reduction"):
        VitalConfig(task_loss_reduction="sum")


def test_adjacent_step_cosine_is_over_valid_pairs_and_undefined_without_one():
    from vital_jax.vital.train_step import latent_diagnostics

    z = jnp.asarray([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]]])
    # Example 0: K = 3 (pairs 1-2: 0, 2-3: 1/sqrt 2); example 1: K = 2 (pair 1-2: 1).
    valid = jnp.asarray([[True, True, True], [True, True, False]])
    out = latent_diagnostics(z, valid)
    np.testing.assert_allclose(float(out["adjacent_step_cosine"]), (0.0 + 2 ** -0.5 + 1.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(out["z_norm"]), (1 + 1 + 2 ** 0.5 + 1 + 1) / 5, rtol=1e-6)
    assert np.isnan(float(latent_diagnostics(z, valid.at[:, 1:].set(False))["adjacent_step_cosine"]))
    assert "adjacent_step_cosine" not in latent_diagnostics(z[:, :1], valid[:, :1])  # one slot: no pair at all


def test_out_of_vocabulary_token_ids_are_rejected_by_name():
    import pytest

    from vital_jax.vital.batch import check_token_ids

    batch = dict(prompt_ids=np.array([[1, 2], [3, 4]]), prompt_valid=np.ones((2, 2), bool),
                 answer_ids=np.array([[5, 0], [6, 7]]), answer_valid=np.array([[True, False], [True, True]]),
                 step_ids=np.zeros((2, 1, 2), np.int32), step_valid=np.ones((2, 1, 2), bool),
                 record_index=np.array([10, 11], np.int32))
    check_token_ids(batch, backbone_vocab=8, decoder_vocab=4)
    batch["answer_ids"][1, 1] = 8
    with pytest.raises(ValueError, match=r"answer_ids: token ids \[8\].*record_index \[11\]"):
        check_token_ids(batch, backbone_vocab=8, decoder_vocab=4)
    batch["answer_ids"][1, 1] = 7
    batch["answer_ids"][0, 1] = 99  # padding: not checked
    check_token_ids(batch, backbone_vocab=8, decoder_vocab=4)
    batch["step_ids"][0, 0, 0] = 4
    with pytest.raises(ValueError, match="step_ids.*vocabulary of 4"):
        check_token_ids(batch, backbone_vocab=8, decoder_vocab=4)
