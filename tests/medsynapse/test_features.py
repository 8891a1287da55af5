"""The stored E_ana features and counterfactual regions: the same arrays as computing them per batch, reused when
nothing changed, rebuilt when the records change, and clear errors for bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import transformers
from PIL import Image

from tests.medsynapse.test_encoder import SIGLIP_KW, _save
from vital_jax import distributed
from vital_jax.data import records as records_lib
from vital_jax.medsynapse import encoder as ana
from vital_jax.medsynapse import features, trainer


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("siglip"))
    _save(transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**SIGLIP_KW), path,
          {"image_processor_type": "SiglipImageProcessor", "size": {"height": 56, "width": 56}}, seed=0)
    return path, *ana.load_anatomical_encoder("siglip", path)


def _record(i: int, image: str, mask: str) -> records_lib.Record:
    return records_lib.Record(id=f"r{i}", image=image, mask=mask, question="Where is the liver?", answer="left",
                              reasoning_chain=("a step.",), latent_steps=1, question_type="location",
                              target="liver", target_type="organ", modality="CT", source="test", split="train")


def _dataset(root: str) -> str:
    rng = np.random.RandomState(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for name in ("a", "b"):
        Image.fromarray(rng.randint(0, 255, (40, 48, 3), np.uint8)).save(os.path.join(root, "images", f"{name}.png"))
    for name, cols in (("left", slice(0, 24)), ("right", slice(24, 48))):
        mask = np.zeros((40, 48), np.uint8)
        mask[:, cols] = 255
        Image.fromarray(mask).save(os.path.join(root, "images", f"{name}.png"))
    # Records 0 and 1 share image a (one encoding) but have different masks.
    recs = [_record(0, "images/a.png", "images/left.png"), _record(1, "images/a.png", "images/right.png"),
            _record(2, "images/b.png", "images/left.png")]
    records_lib.write_records(os.path.join(root, records_lib.RECORDS_FILE), recs)
    return root


def test_store_holds_each_records_features_and_regions(siglip, tmp_path):
    path, encoder, params = siglip
    data_dir = _dataset(str(tmp_path / "data"))
    store = features.build_feature_store(data_dir, encoder, params, str(tmp_path / "store"), encoder_id=path,
                                         batch_size=2)
    assert store.features.shape == (2, *encoder.grid, encoder.feature_dim)
    got = store.gather(np.array([2, 0, 1]))
    for row, (image, mask) in zip(range(3), (("b", "left"), ("a", "left"), ("a", "right"))):
        pixels = encoder.preprocess(os.path.join(data_dir, "images", f"{image}.png"))[None]
        direct = np.asarray(encoder.feature_map(params, pixels))[0]
        np.testing.assert_allclose(got["feature_map"][row], direct, atol=1e-5)
        regions = ana.RecordRegionMasks()(encoder, params, os.path.join(data_dir, "images", f"{image}.png"),
                                          os.path.join(data_dir, "images", f"{mask}.png"))
        assert (got["region_masks"][row] == regions.masks).all()
    assert got["region_valid"].all() and (got["region_confidence"] == 1.0).all()
    assert not (got["region_masks"][1] & got["region_masks"][2]).any()  # left and right halves of image a
    with pytest.raises(features.FeatureStoreError, match="outside the store's 3 records"):
        store.gather(np.array([3]))


def test_store_is_reused_and_rebuilt_when_the_records_change(siglip, tmp_path):
    path, encoder, params = siglip
    data_dir = _dataset(str(tmp_path / "data"))
    out = str(tmp_path / "store")
    features.build_feature_store(data_dir, encoder, params, out, encoder_id=path)
    stamp = os.path.getmtime(os.path.join(out, features.FEATURES_FILE))
    features.build_feature_store(data_dir, encoder, params, out, encoder_id=path)
    assert os.path.getmtime(os.path.join(out, features.FEATURES_FILE)) == stamp
    recs = records_lib.read_records(os.path.join(data_dir, records_lib.RECORDS_FILE))
    records_lib.write_records(os.path.join(data_dir, records_lib.RECORDS_FILE), recs[:2])
    store = features.build_feature_store(data_dir, encoder, params, out, encoder_id=path)
    assert len(store.image_rows) == 2 and store.features.shape[0] == 1
    # A store written before the index recorded its records' sha256 is reused (its fingerprint covers the
    # records) and gains it, so that readers without the encoder can check it.
    stamp = os.path.getmtime(os.path.join(out, features.FEATURES_FILE))
    index_path = os.path.join(out, features.INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    del index["records_sha256"]
    with open(index_path, "w") as f:
        json.dump(index, f)
    features.build_feature_store(data_dir, encoder, params, out, encoder_id=path)
    assert os.path.getmtime(os.path.join(out, features.FEATURES_FILE)) == stamp
    with open(index_path) as f:
        assert json.load(f)["records_sha256"] == features.records_sha256(
            os.path.join(data_dir, records_lib.RECORDS_FILE))


def test_store_is_rebuilt_for_another_feature_layer_or_compute_dtype(siglip, tmp_path):
    """SigLIP's two feature layers share grid and dim: a key of shapes alone reused a store of post_layernorm
    features for a run that computes last_block ones (Stage I trained P_phi on another F than evaluation's)."""
    path, encoder, params = siglip
    data_dir = _dataset(str(tmp_path / "data"))
    out = str(tmp_path / "store")
    first = np.array(features.build_feature_store(data_dir, encoder, params, out, encoder_id=path).features)
    last_block = dataclasses.replace(encoder, feature_layer="last_block")
    second = features.build_feature_store(data_dir, last_block, params, out, encoder_id=path)
    pixels = last_block.preprocess(os.path.join(data_dir, "images", "a.png"))[None]
    np.testing.assert_allclose(second.features[0], np.asarray(last_block.feature_map(params, pixels))[0], atol=1e-5)
    assert not np.allclose(second.features, first, atol=1e-3)
    # The key is deterministic (a fresh load of the same encoder reuses the store) and covers the compute dtype.
    reloaded = ana.load_anatomical_encoder("siglip", path, "last_block")[0]
    bf16 = ana.load_anatomical_encoder("siglip", path, "last_block", dtype="bfloat16")[0]
    key = features._fingerprint(data_dir, last_block, path, ana.RecordRegionMasks(), "float32")
    assert features._fingerprint(data_dir, reloaded, path, ana.RecordRegionMasks(), "float32") == key
    assert features._fingerprint(data_dir, bf16, path, ana.RecordRegionMasks(), "float32") != key


def test_every_region_array_is_on_disk_before_the_index_vouches_for_it(siglip, tmp_path, monkeypatch):
    """They were written with np.save and never fsynced, then the index atomically: after a power loss the index
    could stand beside empty arrays."""
    path, encoder, params = siglip
    data_dir = _dataset(str(tmp_path / "data"))
    out = str(tmp_path / "store")
    synced, unsynced_at_index = set(), []
    real_fsync, real_atomic_write = os.fsync, features.atomic_write

    def fsync(fd):
        real_fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    def atomic_write(target, write, binary=False):
        if os.path.basename(target) == features.INDEX_FILE:
            unsynced_at_index.extend(name for name in (features.MASKS_FILE, features.CONFIDENCE_FILE,
                                                       features.VALID_FILE)
                                     if os.stat(os.path.join(out, name)).st_ino not in synced)
        return real_atomic_write(target, write, binary=binary)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(features, "atomic_write", atomic_write)
    store = features.build_feature_store(data_dir, encoder, params, out, encoder_id=path)
    assert unsynced_at_index == [] and os.path.exists(os.path.join(out, features.INDEX_FILE))
    assert store.masks.shape[0] == 3


def test_store_in_half_precision_and_bad_inputs(siglip, tmp_path):
    path, encoder, params = siglip
    data_dir = _dataset(str(tmp_path / "data"))
    store = features.build_feature_store(data_dir, encoder, params, str(tmp_path / "half"), dtype="float16")
    assert store.features.dtype == np.float16 and store.gather(np.array([0]))["feature_map"].dtype == np.float32
    with pytest.raises(features.FeatureStoreError, match="dtype"):
        features.build_feature_store(data_dir, encoder, params, str(tmp_path / "x"), dtype="int8")
    with open(os.path.join(data_dir, "images", "b.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(features.FeatureStoreError, match="b.png"):
        features.build_feature_store(data_dir, encoder, params, str(tmp_path / "bad"))
    with pytest.raises(features.FeatureStoreError, match="no feature_index.json"):
        features.FeatureStore.load(str(tmp_path / "bad"), os.path.join(data_dir, records_lib.RECORDS_FILE))


@pytest.mark.parametrize("torn", ['{"fingerprint": "ab', "[1, 2]", '{"fingerprint": "x"}'])
def test_a_torn_index_is_named_on_load_and_rebuilt_by_the_builder(siglip, tmp_path, caplog, torn):
    path, encoder, params = siglip
    data_dir = _dataset(str(tmp_path / "data"))
    out = str(tmp_path / "store")
    features.build_feature_store(data_dir, encoder, params, out, encoder_id=path)
    index = os.path.join(out, features.INDEX_FILE)
    with open(index, "w") as f:
        f.write(torn)
    with pytest.raises(features.FeatureStoreError, match=f"{index}: unreadable"):
        features.FeatureStore.load(out, os.path.join(data_dir, records_lib.RECORDS_FILE))
    store = features.build_feature_store(data_dir, encoder, params, out, encoder_id=path)
    assert len(store.image_rows) == 3 and "its index is unreadable" in caplog.text


# A store written by hand (no encoder: these tests are about reading): 2 images on a 4x4 grid, 3 records of 2
# regions each, built from the records.jsonl it is given.
GRID = (4, 4)


def _hand_store(root) -> tuple[str, str]:
    """-> (store directory, records.jsonl path)."""
    data_dir, store = os.path.join(root, "data"), os.path.join(root, "store")
    os.makedirs(data_dir)
    os.makedirs(store)
    records_path = os.path.join(data_dir, records_lib.RECORDS_FILE)
    records_lib.write_records(records_path, [_record(i, f"images/{i // 2}.png", "images/m.png") for i in range(3)])
    np.save(os.path.join(store, features.FEATURES_FILE), np.zeros((2, *GRID, 8), np.float32))
    np.save(os.path.join(store, features.MASKS_FILE), np.ones((3, 2, *GRID), bool))
    np.save(os.path.join(store, features.CONFIDENCE_FILE), np.ones((3, 2), np.float32))
    np.save(os.path.join(store, features.VALID_FILE), np.ones((3, 2), bool))
    _write_index(store, fingerprint="by hand", records_sha256=features.records_sha256(records_path),
                 image_rows=[0, 0, 1])
    return store, records_path


def _write_index(store: str, **index) -> None:
    with open(os.path.join(store, features.INDEX_FILE), "w") as f:
        json.dump(index, f)


def test_a_hand_written_store_loads(tmp_path):
    store, records_path = _hand_store(str(tmp_path))   # the baseline that the tests below corrupt one part of
    loaded = features.FeatureStore.load(store, records_path)
    assert loaded.grid == GRID and loaded.image_rows.tolist() == [0, 0, 1]


@pytest.mark.parametrize("name, array, message", [
    (features.FEATURES_FILE, np.zeros((2, *GRID, 8), np.float64), "expected .* float32 or float16"),
    (features.FEATURES_FILE, np.zeros((2, 16, 8), np.float32), r"expected \(num_images, Hf, Wf, df\)"),
    (features.MASKS_FILE, np.ones((3, 2, 5, 5), bool), r"expected bool \(3 records .*, 4, 4 as"),
    (features.MASKS_FILE, np.ones((3, 2, *GRID), np.float64), "float64 .*expected bool"),
    (features.MASKS_FILE, np.ones((2, 2, *GRID), bool), r"expected bool \(3 records of the index"),
    (features.CONFIDENCE_FILE, np.ones((3, 3), np.float32), r"expected float32 \(3, 2\)"),
    (features.CONFIDENCE_FILE, np.ones((3, 2), np.float64), r"float64 \(3, 2\), expected float32"),
    (features.VALID_FILE, np.ones((3,), bool), r"bool \(3,\), expected bool \(3, 2\)"),
    (features.VALID_FILE, np.ones((3, 2), np.uint8), r"uint8 .*expected bool"),
])
def test_load_refuses_an_array_whose_rank_dtype_grid_or_regions_disagree(tmp_path, name, array, message):
    store, records_path = _hand_store(str(tmp_path))
    np.save(os.path.join(store, name), array)
    with pytest.raises(features.FeatureStoreError, match=f"{os.path.join(store, name)}: .*{message}"):
        features.FeatureStore.load(store, records_path)


@pytest.mark.parametrize("row", [-1, 2, "1", 1.0, True, None])
def test_load_refuses_an_image_row_that_is_negative_or_not_an_integer_naming_the_entry(tmp_path, row):
    store, records_path = _hand_store(str(tmp_path))
    _write_index(store, fingerprint="by hand", records_sha256=features.records_sha256(records_path),
                 image_rows=[0, row, 1])
    index_path = os.path.join(store, features.INDEX_FILE)
    with pytest.raises(features.FeatureStoreError,
                       match=rf"{index_path}: image_rows\[1\] = {re.escape(repr(row))} is not a row"):
        features.FeatureStore.load(store, records_path)


def test_a_store_built_from_other_records_of_the_same_count_is_refused_by_load_trained(tmp_path):
    store, records_path = _hand_store(str(tmp_path))
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    os.rename(store, os.path.join(workdir, trainer.FEATURES_DIR))
    store = os.path.join(workdir, trainer.FEATURES_DIR)
    paths = trainer.Paths(data_dir=os.path.dirname(records_path), tokenizer_dir="", backbone_dir="",
                          encoder_dir="")
    assert len(trainer.load_feature_store(workdir, paths).image_rows) == 3
    recs = records_lib.read_records(records_path)
    records_lib.write_records(records_path, recs[::-1])   # as many records, in another order
    with pytest.raises(features.FeatureStoreError,
                       match=f"{store}: built from other records than {records_path}.*delete {store} and rerun"):
        trainer.load_feature_store(workdir, paths)
    _write_index(store, fingerprint="by hand", image_rows=[0, 0, 1])   # a store from before the sha256
    with pytest.raises(features.FeatureStoreError, match=f"{store}: its feature_index.json records no fingerprint"):
        trainer.load_feature_store(workdir, paths)


def test_in_a_run_of_several_processes_process_0_builds_the_store_and_the_others_load_it(siglip, tmp_path,
                                                                                          monkeypatch):
    """Every process built the store into the same workdir: the dataset encoded once per process, a rebuild's
    removal of the index failing on all but one, open_memmap(mode="w+") truncating features under another's
    mapping. One process of two is played at a time (jax's process index and barrier stand-ins)."""
    path, encoder, params = siglip
    data_dir = _dataset(str(tmp_path / "data"))
    process, encoded, barriers = [0], [], []

    class Recording:  # E_ana, noting which process encodes an image
        def __getattr__(self, name):
            return getattr(encoder, name)

        def preprocess(self, image_path):
            encoded.append(process[0])
            return encoder.preprocess(image_path)

    def barrier(built):  # process 0 reports its own outcome; process 1 gets `outcome`, what process 0 reported
        barriers.append((process[0], built, os.path.exists(os.path.join(out, features.INDEX_FILE))))
        return outcome[0] if process[0] else built

    monkeypatch.setattr(distributed, "process_position", lambda: (process[0], 2))
    monkeypatch.setattr(distributed, "_primary_outcome", barrier)
    recording = Recording()

    def build(who, directory, **kw):
        process[0] = who
        return features.build_feature_store(data_dir, recording, params, directory, encoder_id=path, **kw)

    out, outcome = str(tmp_path / "store"), [True]
    first = build(0, out)
    assert encoded == [0, 0] and barriers == [(0, True, True)]  # both images, by process 0, before the barrier
    second = build(1, out)
    assert encoded == [0, 0] and barriers[1] == (1, True, True)  # process 1 encoded nothing: it loaded the store
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.masks, first.masks)
    # Process 0 failed: it raises its own error after telling the others, which stop naming it.
    os.remove(os.path.join(data_dir, "images", "b.png"))
    with pytest.raises(features.FeatureStoreError, match="b.png: cannot be encoded"):
        build(0, str(tmp_path / "failed"))
    assert barriers[-1][:2] == (0, False)
    outcome[0] = False
    with pytest.raises(features.FeatureStoreError, match="process 0 could not build .* process 1 stops"):
        build(1, str(tmp_path / "failed"))
    # A store process 1 would not have built (here: another dtype), or none at all (an unshared workdir): an error,
    # never a build of its own.
    outcome[0], encoded[:] = True, []
    with pytest.raises(features.FeatureStoreError, match="not the one process 1 would build"):
        build(1, out, dtype="float16")
    with pytest.raises(features.FeatureStoreError, match="process 1 finds no readable feature_index.json"):
        build(1, str(tmp_path / "elsewhere"))
    assert encoded == []
