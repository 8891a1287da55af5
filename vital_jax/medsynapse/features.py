"""E_ana(X) and the counterfactual regions of every record, computed once and stored beside a run.

E_ana is frozen in every stage of MedSynapse-V (§2.2), so its feature map F (Hf x Wf x df) of an image is the same
at every step of every epoch; so are the regions Eq. 5 removes. Computing them once per dataset instead of once
per step keeps the encoder out of the training programs entirely (Stage I and II only ever see F), which is also
what makes the deployed model's independence from it easy to check.

Layout of a store directory (written by `build_feature_store`, read by `FeatureStore`):
  anatomical_features.npy   (num_images, Hf, Wf, df)   F of each distinct image of the dataset
  region_masks.npy          (num_records, R, Hf, Wf)   bool, each record's candidate regions on the feature grid
  region_confidence.npy     (num_records, R)           float32
  region_valid.npy          (num_records, R)           bool (False: a padding slot)
  feature_index.json        {"fingerprint": ..., "image_rows": [row of anatomical_features per record], ...}
Rows follow records.jsonl (the pipeline's `record_index`). The index is written last, so a store whose index
exists is complete; a store built from other records or another encoder (a different fingerprint) is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vital_jax.data.records import RECORDS_FILE, read_records
from vital_jax.jsonio import atomic_write, read_json
from vital_jax.medsynapse.encoder import (AnatomicalEncoder, RecordRegionMasks, RegionMaskProvider,
                                          stack_region_masks)

FEATURES_FILE = "anatomical_features.npy"
MASKS_FILE = "region_masks.npy"
CONFIDENCE_FILE = "region_confidence.npy"
VALID_FILE = "region_valid.npy"
INDEX_FILE = "feature_index.json"
DTYPES = ("float32", "float16")


class FeatureStoreError(ValueError):
    """A store cannot be built or read (a missing file, a record whose image or mask fails, a foreign store)."""


def _fingerprint(data_dir: str, encoder: AnatomicalEncoder, encoder_id: str, provider: RegionMaskProvider,
                 dtype: str) -> str:
    h = hashlib.sha256()
    with open(os.path.join(data_dir, RECORDS_FILE), "rb") as f:
        h.update(f.read())
    h.update(json.dumps(dict(encoder=type(encoder).__name__, encoder_id=encoder_id, image_size=encoder.image_size,
                             grid=list(encoder.grid), feature_dim=encoder.feature_dim, provider=repr(provider),
                             dtype=dtype), sort_keys=True).encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class FeatureStore:
    """A built store, memory-mapped. `gather` returns the arrays of a batch of records."""

    directory: str
    features: np.ndarray      # (num_images, Hf, Wf, df)
    image_rows: np.ndarray    # (num_records,) int
    masks: np.ndarray         # (num_records, R, Hf, Wf) bool
    confidence: np.ndarray    # (num_records, R) float32
    valid: np.ndarray         # (num_records, R) bool

    @classmethod
    def load(cls, directory: str) -> "FeatureStore":
        index_path = os.path.join(directory, INDEX_FILE)
        if not os.path.exists(index_path):
            raise FeatureStoreError(f"{directory}: no {INDEX_FILE}; build the store first (build_feature_store; "
                                    "the MedSynapse-V training command builds it)")
        index = _read_index(index_path)
        if index is None:
            raise FeatureStoreError(f"{index_path}: unreadable (a torn write?); delete it, and the training command "
                                    "rebuilds the store")
        try:
            features = np.load(os.path.join(directory, FEATURES_FILE), mmap_mode="r", allow_pickle=False)
            masks = np.load(os.path.join(directory, MASKS_FILE), allow_pickle=False)
            confidence = np.load(os.path.join(directory, CONFIDENCE_FILE), allow_pickle=False)
            valid = np.load(os.path.join(directory, VALID_FILE), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise FeatureStoreError(f"{directory}: an array of the feature store cannot be read ({e}); delete the "
                                    "folder to rebuild it") from e
        image_rows = np.asarray(index["image_rows"], np.int64)
        n = len(image_rows)
        if masks.shape[0] != n or confidence.shape[0] != n or valid.shape[0] != n or (
                n and int(image_rows.max()) >= features.shape[0]):
            raise FeatureStoreError(f"{directory}: the store's arrays disagree with its index ({n} records); delete "
                                    "the folder to rebuild it")
        return cls(directory, features, image_rows, masks, confidence, valid)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.features.shape[1:3])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[3])

    def gather(self, record_index: np.ndarray) -> dict[str, np.ndarray]:
        """record_index (B,) rows of records.jsonl -> feature_map (B, Hf, Wf, df) float32, region_masks
        (B, R, Hf, Wf) bool, region_confidence (B, R) float32, region_valid (B, R) bool."""
        rows = np.asarray(record_index, np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= len(self.image_rows))):
            raise FeatureStoreError(f"{self.directory}: record_index {rows.tolist()[:8]} outside the store's "
                                    f"{len(self.image_rows)} records (built from another records.jsonl?)")
        return dict(feature_map=np.asarray(self.features[self.image_rows[rows]], np.float32),
                    region_masks=self.masks[rows], region_confidence=self.confidence[rows],
                    region_valid=self.valid[rows])


def _read_index(path: str) -> dict | None:
    """The store's index, or None when it cannot be read as one (malformed JSON, not an object, no image rows):
    the store is derived data, rebuilt rather than trusted."""
    try:
        index = read_json(path, FeatureStoreError)
    except FeatureStoreError as e:
        logging.warning("%s", e)
        return None
    if not isinstance(index, dict) or not isinstance(index.get("image_rows"), list):
        logging.warning("%s: not a feature-store index (no image_rows list)", path)
        return None
    return index


def build_feature_store(data_dir: str, encoder: AnatomicalEncoder, params, out_dir: str, *, encoder_id: str = "",
                        provider: RegionMaskProvider | None = None, batch_size: int = 8,
                        dtype: str = "float32") -> FeatureStore:
    """Compute F for every distinct image of `data_dir`'s records and the regions of every record; reuse a store
    in `out_dir` built from the same records, encoder and provider.

    encoder_id: what identifies the encoder's weights (its directory), part of the fingerprint. provider: where
    regions come from (default: the records' own masks, `RecordRegionMasks`). dtype: of the stored features
    (float16 halves a large store; F is cast back to float32 when gathered).
    """
    if dtype not in DTYPES:
        raise FeatureStoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    provider = provider or RecordRegionMasks()
    records = read_records(os.path.join(data_dir, RECORDS_FILE))
    if not records:
        raise FeatureStoreError(f"{os.path.join(data_dir, RECORDS_FILE)}: no records")
    fingerprint = _fingerprint(data_dir, encoder, encoder_id, provider, dtype)
    index_path = os.path.join(out_dir, INDEX_FILE)
    if os.path.exists(index_path):
        index = _read_index(index_path)
        if index is not None and index.get("fingerprint") == fingerprint:
            logging.info("anatomical features: reusing %s", out_dir)
            return FeatureStore.load(out_dir)
        logging.warning("%s: rebuilding it (%s)", out_dir, "its index is unreadable" if index is None else
                        "built from other records or another encoder")
        os.remove(index_path)  # the index goes first: an interrupted rebuild never looks complete
    os.makedirs(out_dir, exist_ok=True)

    images = list(dict.fromkeys(os.path.normpath(r.image) for r in records))
    image_row = {path: i for i, path in enumerate(images)}
    store_dtype = jnp.dtype(dtype)
    features = np.lib.format.open_memmap(os.path.join(out_dir, FEATURES_FILE), mode="w+", dtype=store_dtype,
                                         shape=(len(images), *encoder.grid, encoder.feature_dim))
    run = jax.jit(encoder.feature_map)
    logging.info("anatomical features: encoding %d images into %s", len(images), out_dir)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = np.zeros((batch_size, encoder.image_size, encoder.image_size, 3), np.float32)
        for i, path in enumerate(chunk):
            try:
                pixels[i] = encoder.preprocess(os.path.join(data_dir, path))
            except (OSError, ValueError) as e:  # ImageError is a ValueError
                raise FeatureStoreError(f"{os.path.join(data_dir, path)}: cannot be encoded: {e}") from e
        out = np.asarray(run(params, jnp.asarray(pixels)))
        features[start:start + len(chunk)] = out[:len(chunk)].astype(store_dtype)
    features.flush()
    del features

    regions = []
    for record in records:
        try:
            regions.append(provider(encoder, params, os.path.join(data_dir, record.image),
                                    os.path.join(data_dir, record.mask)))
        except (OSError, ValueError) as e:
            raise FeatureStoreError(f"record {record.id!r}: no regions for the counterfactual: {e}") from e
    masks, confidence, valid = stack_region_masks(regions)
    np.save(os.path.join(out_dir, MASKS_FILE), masks, allow_pickle=False)
    np.save(os.path.join(out_dir, CONFIDENCE_FILE), confidence, allow_pickle=False)
    np.save(os.path.join(out_dir, VALID_FILE), valid, allow_pickle=False)
    index = dict(fingerprint=fingerprint, encoder_id=encoder_id, images=images,
                 image_rows=[image_row[os.path.normpath(r.image)] for r in records])
    atomic_write(index_path, lambda f: json.dump(index, f))   # last: its presence marks a complete store
    return FeatureStore.load(out_dir)
