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
  feature_index.json        {"fingerprint": ..., "records_sha256": ..., "image_rows": [row of anatomical_features
                            per record], ...}
Rows follow records.jsonl (the pipeline's `record_index`). The index is written last, so a store whose index
exists is complete; a store built from other records or another encoder (its weights or settings: feature layer,
compute dtype) or other regions (a different fingerprint) is rebuilt.
`records_sha256` (of records.jsonl's bytes) lets a reader without the encoder (`FeatureStore.load`, as
`trainer.load_trained` does) refuse a store built from other records, even ones with the same count.
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
from vital_jax.jsonio import atomic_write, file_sha256, read_json
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


def records_sha256(records_path: str) -> str:
    """sha256 of records.jsonl's bytes: what the index records of the records a store was built from."""
    return file_sha256(records_path)


def _fingerprint(data_dir: str, encoder: AnatomicalEncoder, encoder_id: str, provider: RegionMaskProvider,
                 dtype: str) -> str:
    """The store's key: the records, the encoder's weights (`encoder_id`) and settings (its feature layer and
    compute dtype among them: `AnatomicalEncoder.settings`), the regions' provider and the stored dtype."""
    h = hashlib.sha256()
    with open(os.path.join(data_dir, RECORDS_FILE), "rb") as f:
        h.update(f.read())
    h.update(json.dumps(dict(encoder=encoder.settings(), encoder_id=encoder_id, image_size=encoder.image_size,
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
    def load(cls, directory: str, records_path: str) -> "FeatureStore":
        """Open the store in `directory`, built from `records_path` (its records.jsonl); FeatureStoreError naming
        the file for anything that disagrees: another records.jsonl, an array's rank, dtype, grid or region count,
        or an image row that is not an integer row of anatomical_features.npy."""
        index_path = os.path.join(directory, INDEX_FILE)
        if not os.path.exists(index_path):
            raise FeatureStoreError(f"{directory}: no {INDEX_FILE}; build the store first (build_feature_store; "
                                    "the MedSynapse-V training command builds it)")
        index = _read_index(index_path)
        if index is None:
            raise FeatureStoreError(f"{index_path}: unreadable (a torn write?); delete it, and the training command "
                                    "rebuilds the store")
        _check_records(directory, index, records_path)
        try:
            features = np.load(os.path.join(directory, FEATURES_FILE), mmap_mode="r", allow_pickle=False)
            masks = np.load(os.path.join(directory, MASKS_FILE), allow_pickle=False)
            confidence = np.load(os.path.join(directory, CONFIDENCE_FILE), allow_pickle=False)
            valid = np.load(os.path.join(directory, VALID_FILE), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise FeatureStoreError(f"{directory}: an array of the feature store cannot be read ({e}); delete the "
                                    "folder to rebuild it") from e
        _check_arrays(directory, len(index["image_rows"]), features, masks, confidence, valid)
        image_rows = _image_rows(index_path, index["image_rows"], features.shape[0])
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


def _check_records(directory: str, index: dict, records_path: str) -> None:
    """The store was built from the records now in `records_path`: rows are record indices, so a store of other
    records (even as many) would hand every record another record's features and regions."""
    rebuild = (f"rebuild the store from the current records: delete {directory} and rerun the MedSynapse-V "
               "training command with the run's config (it builds the store before any stage)")
    recorded = index.get("records_sha256")
    if not isinstance(recorded, str):
        raise FeatureStoreError(f"{directory}: its {INDEX_FILE} records no fingerprint of the records it was built "
                                f"from (a store written before it was recorded), so it cannot be checked against "
                                f"{records_path}; rerun the training command (it adds the fingerprint when the "
                                f"records are unchanged) or {rebuild}")
    try:
        current = records_sha256(records_path)
    except OSError as e:
        raise FeatureStoreError(f"{directory}: cannot read the records it must match ({e})") from e
    if current != recorded:
        raise FeatureStoreError(f"{directory}: built from other records than {records_path} (their sha256 differs "
                                f"from the one in {INDEX_FILE}); restore the records it was built from, or {rebuild}")


def _image_rows(index_path: str, rows: list, num_images: int) -> np.ndarray:
    """The index's image_rows as (num_records,) int64; each must be an integer row of anatomical_features.npy (a
    negative one would wrap around to another image in numpy indexing)."""
    for i, row in enumerate(rows):
        if type(row) is not int or not 0 <= row < num_images:  # type(): True is an int, and not a row
            raise FeatureStoreError(f"{index_path}: image_rows[{i}] = {row!r} is not a row of {FEATURES_FILE} (an "
                                    f"integer in [0, {num_images})); delete the folder to rebuild the store")
    return np.asarray(rows, np.int64).reshape(-1)


def _check_arrays(directory: str, num_records: int, features: np.ndarray, masks: np.ndarray,
                  confidence: np.ndarray, valid: np.ndarray) -> None:
    """Rank, dtype and shape of every array against each other and the index's `num_records` (module
    docstring's layout): a mask on another grid or a region count that `confidence` disagrees with would be
    broadcast or truncated silently downstream."""
    def fail(name: str, array: np.ndarray, expected: str) -> None:
        raise FeatureStoreError(f"{os.path.join(directory, name)}: {array.dtype} {tuple(array.shape)}, expected "
                                f"{expected}; delete the folder to rebuild the store")

    if features.ndim != 4 or features.dtype.name not in DTYPES:
        fail(FEATURES_FILE, features, f"(num_images, Hf, Wf, df) {' or '.join(DTYPES)}")
    grid = features.shape[1:3]
    if masks.ndim != 4 or masks.dtype != np.bool_ or masks.shape[0] != num_records or masks.shape[2:] != grid:
        fail(MASKS_FILE, masks, f"bool ({num_records} records of the index, R, {grid[0]}, {grid[1]} as "
                                f"{FEATURES_FILE})")
    regions = (num_records, masks.shape[1])
    if confidence.dtype != np.float32 or confidence.shape != regions:
        fail(CONFIDENCE_FILE, confidence, f"float32 {regions} (records, regions of {MASKS_FILE})")
    if valid.dtype != np.bool_ or valid.shape != regions:
        fail(VALID_FILE, valid, f"bool {regions} (records, regions of {MASKS_FILE})")


def build_feature_store(data_dir: str, encoder: AnatomicalEncoder, params, out_dir: str, *, encoder_id: str = "",
                        provider: RegionMaskProvider | None = None, batch_size: int = 8,
                        dtype: str = "float32") -> FeatureStore:
    """Compute F for every distinct image of `data_dir`'s records and the regions of every record; reuse a store
    in `out_dir` built from the same records, encoder and provider.

    encoder_id: what identifies the encoder's weights (its directory), part of the fingerprint. provider: where
    regions come from (default: the records' own masks, `RecordRegionMasks`). dtype: of the stored features
    (float16 halves a large store; F is cast back to float32 when gathered).

    In a run of several processes every process calls this at the same point: process 0 builds (or reuses) the
    store while the others wait, then each loads it. Built by every process, the dataset was encoded once per
    process into the same files: a rebuild's removal of the index failed on all but one, and one process's
    `open_memmap(mode="w+")` truncated the features under another's mapping. The workdir must be on a filesystem
    all processes share (as the checkpoints'). A failure on process 0 is raised there and reported by the others.
    """
    if dtype not in DTYPES:
        raise FeatureStoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    provider = provider or RecordRegionMasks()
    from vital_jax import distributed  # here: it imports vital_jax.vital (its batch type); medsynapse must not

    store = distributed.on_primary(
        lambda: _build_or_reuse(data_dir, encoder, params, out_dir, encoder_id, provider, batch_size, dtype),
        f"build the anatomical feature store in {out_dir}", FeatureStoreError)
    if store is not None:  # built (or reused) here: the only process, or process 0
        return store
    return _load_built(data_dir, encoder, out_dir, encoder_id, provider, dtype, distributed.process_position()[0])


def _load_built(data_dir: str, encoder: AnatomicalEncoder, out_dir: str, encoder_id: str,
                provider: RegionMaskProvider, dtype: str, process: int) -> FeatureStore:
    """The store process 0 has just built: loaded, never built here; one of another fingerprint (process 0 saw
    other records or another encoder) or none at all (a workdir not shared with process 0) is an error."""
    index_path = os.path.join(out_dir, INDEX_FILE)
    index = _read_index(index_path) if os.path.exists(index_path) else None
    if index is None:
        raise FeatureStoreError(f"{out_dir}: process 0 built the anatomical feature store, but process {process} "
                                f"finds no readable {INDEX_FILE} there; every process must see the same workdir (a "
                                "shared filesystem)")
    if index.get("fingerprint") != _fingerprint(data_dir, encoder, encoder_id, provider, dtype):
        raise FeatureStoreError(f"{out_dir}: the store process 0 built is not the one process {process} would build "
                                "(other records, encoder, encoder settings, regions or dtype); the processes must "
                                "share the run's data, encoder and config")
    return FeatureStore.load(out_dir, os.path.join(data_dir, RECORDS_FILE))


def _build_or_reuse(data_dir: str, encoder: AnatomicalEncoder, params, out_dir: str, encoder_id: str,
                    provider: RegionMaskProvider, batch_size: int, dtype: str) -> FeatureStore:
    records_path = os.path.join(data_dir, RECORDS_FILE)
    records = read_records(records_path)
    if not records:
        raise FeatureStoreError(f"{records_path}: no records")
    fingerprint = _fingerprint(data_dir, encoder, encoder_id, provider, dtype)
    records_hash = records_sha256(records_path)
    index_path = os.path.join(out_dir, INDEX_FILE)
    if os.path.exists(index_path):
        index = _read_index(index_path)
        if index is not None and index.get("fingerprint") == fingerprint:
            logging.info("anatomical features: reusing %s", out_dir)
            if "records_sha256" not in index:  # a store from before it was recorded: the fingerprint vouches for it
                index["records_sha256"] = records_hash
                atomic_write(index_path, lambda f: json.dump(index, f))
            return FeatureStore.load(out_dir, records_path)
        logging.warning("%s: rebuilding it (%s)", out_dir, "its index is unreadable" if index is None else
                        "built from other records, another encoder or its settings, other regions or dtype")
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
    # Written atomically and fsynced before the index vouches for them (features.flush above is an msync): after a
    # power loss, an index beside empty region arrays was taken for a complete store.
    for name, array in ((MASKS_FILE, masks), (CONFIDENCE_FILE, confidence), (VALID_FILE, valid)):
        atomic_write(os.path.join(out_dir, name), lambda f, array=array: np.save(f, array, allow_pickle=False),
                     binary=True)
    index = dict(fingerprint=fingerprint, records_sha256=records_hash, encoder_id=encoder_id, images=images,
                 image_rows=[image_row[os.path.normpath(r.image)] for r in records])
    atomic_write(index_path, lambda f: json.dump(index, f))   # last: its presence marks a complete store
    return FeatureStore.load(out_dir, records_path)
