"""Interpretability outputs: shapes, the heatmap's patch grid, retrieval, Eq. (9), decoding latents."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.test_decoding_layout import while_bodies_hold
from tests.vital.vital_fixtures import forward, ROI_DIM, build, make_batch
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.vital import interpret


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("vital_interpret"), k_max=3)


def test_decode_latents_matches_feeding_pj_in_then_tokens(tiny):
    model, params = tiny.model, tiny.params
    batch, _ = make_batch(model, seed=11, latent_steps=(2, 3))
    out = forward(model, params, batch)
    tokens, lengths = jax.jit(lambda p, z: interpret.decode_latents(model, p, z, max_new_tokens=4))(params, out.z)
    assert tokens.shape == (2, 3, 4) and lengths.shape == (2, 3)
    # Teacher-forcing the decoded tokens after pj_in(z_k) must reproduce them greedily.
    h0 = model.pj_in.apply({"params": params["pj_in"]}, out.z[1, 2])[None, None]
    emb = model.decoder.apply({"params": params["decoder"]}, tokens[1, 2][None], method=model.decoder.embed)
    logits = model.decoder.apply({"params": params["decoder"]},
                                 inputs_embeds=jnp.concatenate([h0, emb], axis=1)).logits
    np.testing.assert_array_equal(np.argmax(logits[0, :-1], -1), tokens[1, 2])


def test_decode_latents_of_a_scanned_decoder_unrolls_it_once(tiny):
    """A decoder trained with scanned layers (the 8B recipe) decodes the same tokens, and no layer scan runs inside
    the token loop: `qwen3.params.decoding_layout` unrolled it before the loop (relayout=False keeps the scan)."""
    model, params = tiny.model, tiny.params
    batch, _ = make_batch(model, seed=12, latent_steps=(3, 1))
    z = forward(model, params, batch).z
    scanned = dataclasses.replace(model, decoder_config=dataclasses.replace(model.decoder_config, scan_layers=True))
    scanned_params = {**params, "decoder": qwen3_params.to_layout(params["decoder"], True)}
    assert "layers" in scanned_params["decoder"]["model"]

    def run(m, p):
        return interpret.decode_latents(m, p, z, max_new_tokens=5)

    want = jax.jit(lambda p: run(model, p))(params)
    got = jax.jit(lambda p: run(scanned, p))(scanned_params)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not while_bodies_hold(jax.make_jaxpr(lambda p: run(scanned, p))(scanned_params), "scan")
    held = jax.make_jaxpr(lambda p: interpret.decode_latents(scanned, p, z, 5, relayout=False))(scanned_params)
    assert while_bodies_hold(held, "scan")


def test_heatmap_is_computed_on_the_patch_grid_in_raster_order():
    rng = np.random.RandomState(0)
    g, dv = 4, ROI_DIM
    patches = rng.randn(1, g * g, dv).astype(np.float32)
    # VP output equal to the patch at row 2, col 1 -> the heatmap peaks there with cosine 1.
    projected = patches[:, None, 2 * g + 1] * 3.0
    maps = interpret.patch_heatmaps(jnp.asarray(projected), jnp.asarray(patches))
    assert maps.shape == (1, 1, g, g)
    assert np.unravel_index(np.argmax(maps[0, 0]), (g, g)) == (2, 1)
    np.testing.assert_allclose(maps[0, 0, 2, 1], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        interpret.patch_heatmaps(jnp.asarray(projected), jnp.asarray(patches[:, :15]))


def test_retrieval_finds_the_matching_bank_entry():
    bank = np.random.RandomState(1).randn(10, 8).astype(np.float32)
    scores, idx = interpret.retrieve_neighbours(jnp.asarray(bank[[7, 3]] * 2.0), jnp.asarray(bank), top_n=3)
    assert idx.shape == (2, 3) and list(np.asarray(idx[:, 0])) == [7, 3]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)


def test_step_similarity_is_eq9_over_valid_steps():
    z = np.random.RandomState(2).randn(3, 4, 5).astype(np.float32)
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    acc = interpret.StepSimilarity(4)
    acc.update(jnp.asarray(z[:2]), jnp.asarray(valid[:2]))
    acc.update(jnp.asarray(z[2:]), jnp.asarray(valid[2:]))
    s = acc.matrix()
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    np.testing.assert_allclose(s[0, 1], np.mean([cos(z[b, 0], z[b, 1]) for b in range(3)]), atol=1e-6)
    np.testing.assert_allclose(s[0, 2], np.mean([cos(z[b, 0], z[b, 2]) for b in (0, 2)]), atol=1e-6)
    np.testing.assert_allclose(s[2, 3], cos(z[0, 2], z[0, 3]), atol=1e-6)
    np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-6)


def test_norm_ratio_compares_latents_with_embeddings(tiny):
    model, params = tiny.model, tiny.params
    batch, _ = make_batch(model, seed=12, latent_steps=(1, 3))
    out = forward(model, params, batch)
    stats = interpret.norm_ratio(model, params, out.z, out.valid_steps)
    assert stats["z_norm_per_step"].shape == (3,)
    np.testing.assert_allclose(stats["z_norm_per_step"][2], np.linalg.norm(out.z[1, 2]), rtol=1e-5)
    table = np.asarray(params["backbone"]["language_model"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(stats["embedding_norm"], np.linalg.norm(table, axis=1).mean(), rtol=1e-5)
