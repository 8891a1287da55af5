"""The grain input pipeline for VITAL training and evaluation: records -> fixed-shape numpy batches.

  RecordDataSource (records.jsonl + ROI arrays; split and curriculum K filter; process shard)
    -> [train: seeded global shuffle, reshuffled every epoch, repeated]
    -> ExampleBuilder (per record: image (read by vital_jax.data.images) -> Qwen3-VL patches, chat prompt ids,
       answer ids, per-step reasoning ids, f_ROI row; any error is re-raised naming the record id)
    -> batch + collate_examples (bucketed fixed shapes)
    -> grain iterator (get_state / set_state: a resumed run sees the same data order).

Batch contract (B = cfg.batch_size examples, one image each; all numpy):
  prompt_ids (B, Tp) int32, prompt_valid (B, Tp) bool   LEFT-padded: every prompt ends at slot Tp-1; Tp is the
      smallest of cfg.prompt_buckets that fits the batch's longest prompt.
  pixel_patches (Np, 1536) float32   every image's patches in example order, zero rows after them up to Np, the
      smallest of the patch buckets that fits (`preprocessing.pad_patches`; mask padded rows as it describes).
  image_grid_thw (B, 3) int32        per example [1, gh, gw]: patches of example b are rows
      sum(prod(grid[:b])) ... of pixel_patches.
  answer_ids (B, Ta) int32, answer_valid (B, Ta) bool   answer text + <|im_end|>, right-padded, Ta =
      cfg.max_answer_tokens (a longer answer is an error naming the record, not a silent cut).
  latent_steps (B,) int32            K of each example (its reasoning-chain length).
  step_ids (B, Kmax, Ts) int32, step_valid (B, Kmax, Ts) bool   step k's text (+ <|im_end|> when
      cfg.end_steps_with_im_end, so the auxiliary decoder learns where a step ends), cut to Ts =
      cfg.max_step_tokens, right-padded; slots k >= latent_steps are all invalid. Kmax = cfg.k_max_slots.
  roi_feature (B, dv) float32        f_ROI (unit norm) of each example.
  global_feature (B, dv) float32     only with cfg.global_feature: f_global of the example's image (Appendix C.5,
      global_features.npy), for the per-step visual targets.
  record_index (B,) int32            row of the example in records.jsonl, to name it in errors.
  example_valid (B,) bool            False for padding examples (evaluation only: the last batch of a shard is
      filled by repeating the shard's first example; training drops the incomplete last batch).
Pad ids are <|endoftext|>.

Sharding: the filtered records are dealt round-robin to processes (record j goes to process j % process_count).
Training keeps floor(n / process_count) records per process so that every process runs the same number of steps;
evaluation keeps all and pads shorter shards with invalid examples, so every process yields the same number of
batches and every record is evaluated exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Sequence

import grain
import jax
from absl import flags
import numpy as np

from vital_jax.data import images
from vital_jax.data.records import (GLOBAL_FEATURES_FILE, RECORDS_FILE, Record, load_global_features, load_roi_arrays,
                                    read_records)
from vital_jax.models.qwen3_vl import preprocessing, prompt

PATCH_DIM = 3 * preprocessing.TEMPORAL_PATCH_SIZE * preprocessing.PATCH_SIZE ** 2  # 1536


def blind(patches: np.ndarray) -> np.ndarray:
    """Patches of a mid-gray image of the same size (normalised pixel value 0): the text-only control."""
    return np.zeros_like(patches)


class PipelineError(ValueError):
    """A record cannot become a training example, or the pipeline is misconfigured; names the record."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Shapes and throughput settings of the input pipeline.

    max_pixels / min_pixels: the Qwen3-VL resize budget per image (pixels); an image yields at most
      max_pixels / 256 patches. patch_buckets: allowed Np per batch (multiples of 4); empty -> B*max_patches/4,
      /2 and B*max_patches (`patch_bucket_sizes`). num_workers: grain worker processes (0: threads only).
    global_feature: also emit each example's f_global (needs global_features.npy; `vital.visual_target=
      "interpolated"` sets it).
    blind_images: replace every image's pixels by mid-gray (same size, so the same image tokens): the text-only
      control, which shows how much of a score the question alone earns.
    Prompts have no system message, as at inference (`PromptEncoder`): a `system_prompt` field here, which no
    config set and inference never read, would have trained on prompts the model is never asked.
    """

    batch_size: int = 8
    prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    max_answer_tokens: int = 64
    max_step_tokens: int = 96
    k_max_slots: int = 4
    max_pixels: int = 448 * 448
    min_pixels: int = preprocessing.MIN_PIXELS
    patch_buckets: tuple[int, ...] = ()
    num_workers: int = 0
    read_threads: int = 4
    prefetch_buffer_size: int = 16
    end_steps_with_im_end: bool = True
    global_feature: bool = False
    blind_images: bool = False

    def __post_init__(self):
        if self.batch_size < 1 or self.k_max_slots < 1 or self.max_answer_tokens < 1 or self.max_step_tokens < 1:
            raise PipelineError(f"batch_size, k_max_slots, max_answer_tokens and max_step_tokens must be positive: "
                                f"{self}")
        if not self.prompt_buckets or min(self.prompt_buckets) < 1:
            raise PipelineError(f"prompt_buckets must be positive lengths, got {self.prompt_buckets}")
        block = preprocessing.MERGE_SIZE ** 2
        buckets = self.patch_bucket_sizes
        if any(b <= 0 or b % block for b in buckets):
            raise PipelineError(f"patch_buckets {buckets} must be positive multiples of {block}")
        if max(buckets) < self.batch_size * self.max_patches_per_image:
            raise PipelineError(f"the largest patch bucket {max(buckets)} cannot hold a batch of {self.batch_size} "
                                f"images of up to {self.max_patches_per_image} patches (max_pixels={self.max_pixels})")

    @property
    def max_patches_per_image(self) -> int:
        return self.max_pixels // preprocessing.PATCH_SIZE ** 2

    @property
    def patch_bucket_sizes(self) -> tuple[int, ...]:
        if self.patch_buckets:
            return tuple(sorted(self.patch_buckets))
        full = self.batch_size * self.max_patches_per_image
        block = preprocessing.MERGE_SIZE ** 2
        return tuple(sorted({max(block, -(-full // d // block) * block) for d in (4, 2, 1)}))


# ---------------------------------------------------------------------------------------------------------------
# Source
# ---------------------------------------------------------------------------------------------------------------


def select_records(data_dir: str, split: str | None, k_max: int | None, k_min: int = 1,
                   global_feature: bool = False) -> list[tuple[int, Record]]:
    """(row in records.jsonl, record) of the records in `split` (None: all) with k_min <= latent_steps <= k_max
    (None: no upper bound) that have an ROI row. Raises PipelineError naming records without ROI features, or
    the missing global_features.npy when `global_feature` is asked for."""
    all_records = read_records(os.path.join(data_dir, RECORDS_FILE))
    selected = [(row, r) for row, r in enumerate(all_records)
                if (split is None or r.split == split) and (k_max is None or r.latent_steps <= k_max)
                and r.latent_steps >= k_min]
    roi = load_roi_arrays(data_dir)
    num_rows = 0 if roi is None else roi["features"].shape[0]
    missing = [r.id for _, r in selected if not 0 <= r.roi_index < num_rows]
    if missing:
        raise PipelineError(f"{data_dir}: {len(missing)} record(s) have no ROI feature row (roi_index -1 or past the "
                            f"{num_rows} rows of roi_features.npy), e.g. {missing[:5]}; run vital_jax.data.roi first")
    if global_feature and load_global_features(data_dir) is None:
        raise PipelineError(f"{os.path.join(data_dir, GLOBAL_FEATURES_FILE)} not found: per-step visual targets need "
                            f"f_global; run python -m vital_jax.data.roi --data_dir={data_dir} --encoder_dir=... "
                            f"--global_features")
    return selected


def shard_rows(num_items: int, process_index: int, process_count: int) -> list[int]:
    """Positions of this process's items, dealt round-robin (shards differ in length by at most one)."""
    if not 0 <= process_index < process_count:
        raise PipelineError(f"process_index {process_index} is outside [0, {process_count})")
    return list(range(process_index, num_items, process_count))


class RecordDataSource:
    """A grain RandomAccessDataSource: item i -> {record_index, record, roi_feature (dv,) float32, example_valid}
    (+ global_feature (dv,) float32 with `global_feature`).

    `entries` are (row in records.jsonl, record, valid) triples; the ROI arrays are memory-mapped on first access
    (in each worker process, not pickled), under a lock: grain reads items from several threads, and `np.load`
    parses each .npy header with `ast.literal_eval`, which CPython 3.11 (before 3.11.8) cannot run in two threads
    at once ("SystemError: AST constructor recursion depth mismatch").
    """

    def __init__(self, data_dir: str, entries: Sequence[tuple[int, Record, bool]], global_feature: bool = False):
        self.data_dir = data_dir
        self.entries = list(entries)
        self.global_feature = global_feature
        self._roi_features = None
        self._global_features = None
        self._load_lock = threading.Lock()

    def _load_arrays(self) -> None:
        with self._load_lock:
            if self._roi_features is None:
                self._roi_features = load_roi_arrays(self.data_dir)["features"]
            if self.global_feature and self._global_features is None:
                self._global_features = load_global_features(self.data_dir)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        row, record, valid = self.entries[index]
        if self._roi_features is None or (self.global_feature and self._global_features is None):
            self._load_arrays()
        feature = np.asarray(self._roi_features[record.roi_index], np.float32)
        if not np.isfinite(feature).all():
            raise PipelineError(f"record {record.id!r} (records.jsonl row {row}): ROI feature row {record.roi_index} "
                                f"is not finite")
        item = dict(record_index=row, record=record, roi_feature=feature, example_valid=valid)
        if self.global_feature:
            item["global_feature"] = np.asarray(self._global_features[record.roi_index], np.float32)
            if not np.isfinite(item["global_feature"]).all():
                raise PipelineError(f"record {record.id!r} (records.jsonl row {row}): global feature row "
                                    f"{record.roi_index} is not finite")
        return item

    def __getstate__(self):
        state = dict(self.__dict__, _roi_features=None, _global_features=None)
        del state["_load_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RecordDataSource({self.data_dir!r}, {len(self.entries)} records)"


# ---------------------------------------------------------------------------------------------------------------
# Per-example transform and batching
# ---------------------------------------------------------------------------------------------------------------


class ExampleBuilder:
    """Source item -> one example's variable-length arrays (see `__call__`); the tokenizer loads lazily per process."""

    def __init__(self, data_dir: str, tokenizer_dir: str, cfg: PipelineConfig):
        self.data_dir, self.tokenizer_dir, self.cfg = data_dir, tokenizer_dir, cfg
        self._tokenizer = None

    def __getstate__(self):
        return dict(self.__dict__, _tokenizer=None)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = prompt.load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def __call__(self, item: dict) -> dict:
        """-> prompt_ids (Lp,) int32, patches (N, 1536) float32, grid_thw (3,) int32, answer_ids (La,) int32,
        step_ids / step_valid (Kmax, Ts), latent_steps, roi_feature (dv,), record_index, example_valid."""
        record: Record = item["record"]
        try:
            example = self._build(record)
        except Exception as e:  # any failure (image, tokenizer, lengths) must say which record it was
            raise PipelineError(f"record {record.id!r} (records.jsonl row {item['record_index']}): "
                                f"{type(e).__name__}: {e}") from e
        extra = {"global_feature": item["global_feature"]} if "global_feature" in item else {}
        return dict(example, roi_feature=item["roi_feature"], record_index=item["record_index"],
                    example_valid=item["example_valid"], **extra)

    def _build(self, record: Record) -> dict:
        cfg, tokenizer = self.cfg, self.tokenizer
        specials = prompt.special_token_ids(tokenizer)
        rgb = images.load_image(os.path.join(self.data_dir, record.image))
        patches, grid_thw = preprocessing.preprocess_image(rgb, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        if cfg.blind_images:
            patches = blind(patches)
        prompt_ids = prompt.tokenize_prompt(tokenizer, record.question, grid_thw).input_ids
        answer_ids = np.asarray(tokenizer.encode(record.answer + prompt.IM_END, add_special_tokens=False).ids,
                                np.int32)
        if len(answer_ids) > cfg.max_answer_tokens:
            raise PipelineError(f"answer is {len(answer_ids)} tokens with <|im_end|>, more than max_answer_tokens="
                                f"{cfg.max_answer_tokens}")
        if answer_ids[-1] != specials[prompt.IM_END]:
            raise PipelineError("the answer does not tokenise to a sequence ending with <|im_end|>")
        if record.latent_steps > cfg.k_max_slots:
            raise PipelineError(f"latent_steps={record.latent_steps} exceeds k_max_slots={cfg.k_max_slots}")
        step_ids = np.full((cfg.k_max_slots, cfg.max_step_tokens), specials[prompt.ENDOFTEXT], np.int32)
        step_valid = np.zeros((cfg.k_max_slots, cfg.max_step_tokens), bool)
        suffix = prompt.IM_END if cfg.end_steps_with_im_end else ""
        for k, step in enumerate(record.reasoning_chain):
            ids = tokenizer.encode(step + suffix, add_special_tokens=False).ids[:cfg.max_step_tokens]
            step_ids[k, :len(ids)], step_valid[k, :len(ids)] = ids, True
        return dict(prompt_ids=prompt_ids, patches=patches, grid_thw=grid_thw.astype(np.int32),
                    answer_ids=answer_ids, step_ids=step_ids, step_valid=step_valid,
                    latent_steps=np.int32(record.latent_steps))


def collate_examples(examples: Sequence[dict], cfg: PipelineConfig, pad_id: int) -> dict[str, np.ndarray]:
    """Examples (ExampleBuilder outputs) -> one batch of the module's contract. Fewer than cfg.batch_size examples
    (an evaluation tail) are filled by repeating the first with example_valid=False."""
    if not examples:
        raise PipelineError("collate_examples got no examples")
    examples = list(examples) + [dict(examples[0], example_valid=False)] * (cfg.batch_size - len(examples))
    b = len(examples)
    longest = max(len(e["prompt_ids"]) for e in examples)
    fitting = [t for t in sorted(cfg.prompt_buckets) if t >= longest]
    if not fitting:
        worst = max(examples, key=lambda e: len(e["prompt_ids"]))
        raise PipelineError(f"record at records.jsonl row {worst['record_index']}: prompt of {longest} tokens is "
                            f"longer than the largest prompt bucket {max(cfg.prompt_buckets)}")
    prompt_len = fitting[0]
    prompt_ids = np.full((b, prompt_len), pad_id, np.int32)
    prompt_valid = np.zeros((b, prompt_len), bool)
    answer_ids = np.full((b, cfg.max_answer_tokens), pad_id, np.int32)
    answer_valid = np.zeros((b, cfg.max_answer_tokens), bool)
    for i, e in enumerate(examples):
        n = len(e["prompt_ids"])
        prompt_ids[i, prompt_len - n:], prompt_valid[i, prompt_len - n:] = e["prompt_ids"], True
        m = len(e["answer_ids"])
        answer_ids[i, :m], answer_valid[i, :m] = e["answer_ids"], True
    grids = np.stack([e["grid_thw"] for e in examples]).astype(np.int32)
    patches, _ = preprocessing.pad_patches(np.concatenate([e["patches"] for e in examples]), grids,
                                           cfg.patch_bucket_sizes)
    stack = lambda key, dtype: np.stack([e[key] for e in examples]).astype(dtype)  # noqa: E731
    extra = {"global_feature": stack("global_feature", np.float32)} if "global_feature" in examples[0] else {}
    return dict(prompt_ids=prompt_ids, prompt_valid=prompt_valid, pixel_patches=patches, image_grid_thw=grids,
                answer_ids=answer_ids, answer_valid=answer_valid, latent_steps=stack("latent_steps", np.int32),
                step_ids=stack("step_ids", np.int32), step_valid=stack("step_valid", bool),
                roi_feature=stack("roi_feature", np.float32), record_index=stack("record_index", np.int32),
                example_valid=stack("example_valid", bool), **extra)


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def _to_iter(ds: grain.MapDataset, cfg: PipelineConfig) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.prefetch_buffer_size))
    if cfg.num_workers > 0:
        # grain's worker processes read absl flags; outside `absl.app.run` (notebooks, tests) they are unparsed and
        # grain would fail, so accept the defaults then.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it


def _pad_id(tokenizer_dir: str) -> int:
    # Loading here also fails fast, in the main process, on a missing or foreign tokenizer.
    return prompt.special_token_ids(prompt.load_tokenizer(tokenizer_dir))[prompt.ENDOFTEXT]


def prompt_widths(data_dir: str, tokenizer_dir: str, cfg: PipelineConfig, split: str | None, k_max: int | None,
                  k_min: int = 1) -> list[int]:
    """The prompt widths (`cfg.prompt_buckets`) that batches of the selected records can have, ascending.

    A batch is as wide as the smallest bucket that fits its longest prompt (`collate_examples`), in every process
    (`distributed.global_vital_batch` pads to the widest), so the widths are the buckets of the records' own
    prompt lengths, over the whole split. Each prompt is tokenised as `ExampleBuilder` does it, its image tokens
    counted from the image file's header (no pixels are decoded). A compiled program per width can thus be made
    before the first batch of that width arrives (`vital_jax.train.AheadPrograms`)."""
    tokenizer = prompt.load_tokenizer(tokenizer_dir)
    widths = set()
    for row, record in select_records(data_dir, split, k_max, k_min):
        try:
            height, width = images.check_file(os.path.join(data_dir, record.image))
            grid = preprocessing.grid_for_size(height, width, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
            length = len(prompt.tokenize_prompt(tokenizer, record.question, grid).input_ids)
        except Exception as e:  # as in ExampleBuilder: say which record
            raise PipelineError(f"record {record.id!r} (records.jsonl row {row}): {type(e).__name__}: {e}") from e
        fitting = [t for t in sorted(cfg.prompt_buckets) if t >= length]
        if not fitting:
            raise PipelineError(f"record at records.jsonl row {row}: prompt of {length} tokens is longer than the "
                                f"largest prompt bucket {max(cfg.prompt_buckets)}")
        widths.add(fitting[0])
    return sorted(widths)

def check_answer_lengths(data_dir: str, tokenizer_dir: str, cfg: PipelineConfig, split: str | None) -> None:
    """Every answer of the split fits `cfg.max_answer_tokens` (with its <|im_end|>), checked before training starts:
    `ExampleBuilder` would otherwise stop the run at the first batch holding a longer one, possibly phases in.
    Raises PipelineError naming the longest answer's record and the length to set."""
    tokenizer = prompt.load_tokenizer(tokenizer_dir)
    selected = select_records(data_dir, split, None, 0)
    lengths = [len(ids) for ids in (e.ids for e in tokenizer.encode_batch(
        [r.answer + prompt.IM_END for _, r in selected], add_special_tokens=False))]
    too_long = [(n, row, r) for n, (row, r) in zip(lengths, selected) if n > cfg.max_answer_tokens]
    if too_long:
        n, row, record = max(too_long, key=lambda t: t[0])
        raise PipelineError(f"{data_dir}: {len(too_long)} answer(s) of split {split!r} are longer than "
                            f"max_answer_tokens={cfg.max_answer_tokens} with <|im_end|>, the longest {n} tokens "
                            f"(record {record.id!r}, records.jsonl row {row}); set data.max_answer_tokens >= {n}")


def long_reasoning_steps(data_dir: str, tokenizer_dir: str, cfg: PipelineConfig, split: str | None) -> str | None:
    """What training will cut: the reasoning steps of the split longer than `cfg.max_step_tokens` (with the
    <|im_end|> of `end_steps_with_im_end`), which `ExampleBuilder` truncates to that many tokens (L_text then
    supervises their beginning only, without the end marker). None when every step fits; else one message naming
    how many, the longest step's record and the value that keeps them whole (the train command warns with it)."""
    tokenizer = prompt.load_tokenizer(tokenizer_dir)
    suffix = prompt.IM_END if cfg.end_steps_with_im_end else ""
    steps = [(row, r, k) for row, r in select_records(data_dir, split, None, 0)
             for k in range(len(r.reasoning_chain))]
    lengths = [len(e.ids) for e in tokenizer.encode_batch([r.reasoning_chain[k] + suffix for _, r, k in steps],
                                                          add_special_tokens=False)]
    too_long = [(n, row, r, k) for n, (row, r, k) in zip(lengths, steps) if n > cfg.max_step_tokens]
    if not too_long:
        return None
    n, row, record, k = max(too_long, key=lambda t: t[0])
    return (f"{data_dir}: {len(too_long)} of the {len(steps)} reasoning steps of split {split!r} are longer than "
            f"max_step_tokens={cfg.max_step_tokens} and are cut to it (L_text supervises their first "
            f"{cfg.max_step_tokens} tokens); the longest, step {k + 1} of record {record.id!r} (records.jsonl row "
            f"{row}), has {n} tokens: set data.max_step_tokens >= {n} to keep every step whole")


def make_train_dataset(data_dir: str, tokenizer_dir: str, cfg: PipelineConfig, k_max: int, split: str = "train",
                       seed: int = 0, process_index: int | None = None, process_count: int | None = None,
                       num_epochs: int | None = None, k_min: int = 1) -> grain.IterDataset:
    """The training IterDataset (see `make_train_iterator`)."""
    if not 1 <= k_max <= cfg.k_max_slots:
        raise PipelineError(f"k_max={k_max} must be in 1..k_max_slots={cfg.k_max_slots}")
    process_index, process_count = _process(process_index, process_count)
    if not 0 <= process_index < process_count:
        raise PipelineError(f"process_index {process_index} is outside [0, {process_count})")
    selected = select_records(data_dir, split, k_max, k_min, cfg.global_feature)
    if len(selected) // process_count < cfg.batch_size:
        raise PipelineError(f"{data_dir}: process {process_index}/{process_count} gets "
                            f"{len(selected) // process_count} records of split {split!r} with latent_steps <= "
                            f"{k_max}, fewer than one batch of {cfg.batch_size}")
    collate = functools.partial(collate_examples, cfg=cfg, pad_id=_pad_id(tokenizer_dir))
    source = RecordDataSource(data_dir, [(*row, True) for row in selected], cfg.global_feature)
    # One shuffled stream of all the records (reshuffled each epoch), dealt round-robin: with P processes of
    # batch B, the global batch of step t is positions [t*B*P, (t+1)*B*P) of that stream, the batch one process
    # of batch B*P would train on. Shuffling each process's fixed shard with a common seed instead gave every
    # process the same permutation: each global batch was P consecutive records (records.jsonl keeps an image's
    # questions together), the same blocks every epoch.
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = (ds.map(ExampleBuilder(data_dir, tokenizer_dir, cfg))
          .batch(cfg.batch_size, drop_remainder=True, batch_fn=collate))
    return _to_iter(ds, cfg)


# The version of the order a seed gives the training batches, recorded in every loader state (a checkpoint's):
# resuming a position into another order would skip some records and repeat others. 1 (no field: states saved
# before it was recorded): each process shuffled its own round-robin shard; 2: one shuffled stream of all the
# records dealt round-robin. With one process the two orders are the same.
DATA_ORDER = 2


class TrainIterator:
    """A training iterator whose `get_state()` records `DATA_ORDER` and the global batch (processes x per-process
    batch) beside grain's position, and whose `set_state()` refuses (PipelineError) a position saved under another
    order (unless the orders agree for this run's number of processes) or under another global batch. Iterates
    like the grain iterator it wraps."""

    def __init__(self, iterator: grain.DatasetIterator, process_count: int, batch_size: int):
        self._iterator = iterator
        self._process_count = process_count
        self._batch_size = batch_size

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def close(self) -> None:
        """Stop the wrapped iterator's worker processes, if it has any."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def get_state(self) -> dict:
        return {"data_order": DATA_ORDER, "process_count": self._process_count, "batch_size": self._batch_size,
                "position": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        if "data_order" in state:
            order, position = state["data_order"], state.get("position")
        else:  # saved before the order was recorded: grain's state itself
            order, position = 1, state
        if order != DATA_ORDER and not (order == 1 and self._process_count == 1):
            raise PipelineError(
                f"the loader position was saved under data order {order!r}, this version deals the records in "
                f"order {DATA_ORDER} (vital_jax.data.pipeline.DATA_ORDER) with {self._process_count} processes: "
                "resuming there would skip some records and repeat others; finish the run with the version that "
                "started it, or train in a new --workdir")
        self._check_global_batch(state)
        if not isinstance(position, dict):
            raise PipelineError(f"the loader position {position!r} is not an iterator state")
        self._iterator.set_state(position)

    def _check_global_batch(self, state: dict) -> None:
        """The position counts steps of one global batch: step t covers records [t G, (t + 1) G) of the stream,
        whatever the number of processes G is split over. Under another G the same count of steps lands
        elsewhere in the stream (records repeated or skipped) and every phase has another number of steps.
        States saved before the global batch was recorded carry neither field and are not checked."""
        if "process_count" not in state:
            return
        saved, now = state["process_count"] * state["batch_size"], self._process_count * self._batch_size
        if saved != now:
            raise PipelineError(
                f"the loader position was saved by {state['process_count']} process(es) x batch "
                f"{state['batch_size']} = {saved} examples per step, this run takes {self._process_count} x "
                f"{self._batch_size} = {now}: its steps would cover other records (some repeated, some skipped) "
                f"and each phase another number of steps; resume with {saved} examples per step (on P processes a "
                f"per-process batch of {saved} / P), or train in a new --workdir")


def make_train_iterator(data_dir: str, tokenizer_dir: str, cfg: PipelineConfig, k_max: int, split: str = "train",
                        seed: int = 0, process_index: int | None = None, process_count: int | None = None,
                        num_epochs: int | None = None, k_min: int = 1) -> TrainIterator:
    """Training batches of records with latent_steps <= k_max (the curriculum phase) from `split`.

    Seeded shuffle of all the records, reshuffled each epoch; num_epochs None repeats forever; the incomplete
    last batch is dropped. Batches cross epoch boundaries. With several processes, process p takes positions
    p, p + P, ... of that one stream, so the P processes' batches of a step together are the batch of one process
    with P times the batch size (`make_train_dataset`). The returned iterator's `get_state()` (a
    small JSON-able dict, with the `DATA_ORDER` it was saved under) and `set_state()` resume the exact batch
    sequence. process_index / process_count default to jax.process_index() / jax.process_count().
    """
    process_index, process_count = _process(process_index, process_count)
    return TrainIterator(iter(make_train_dataset(data_dir, tokenizer_dir, cfg, k_max, split, seed, process_index,
                                                 process_count, num_epochs, k_min)), process_count, cfg.batch_size)


def make_eval_batches(data_dir: str, tokenizer_dir: str, cfg: PipelineConfig, split: str = "test",
                      k_max: int | None = None, process_index: int | None = None,
                      process_count: int | None = None) -> grain.DatasetIterator:
    """Evaluation batches in file order: every record of `split` (with latent_steps <= k_max if given) exactly
    once across processes; padding examples (example_valid False) complete the last batch and even out shards."""
    process_index, process_count = _process(process_index, process_count)
    selected = select_records(data_dir, split, k_max, global_feature=cfg.global_feature)
    if not selected:
        raise PipelineError(f"{data_dir}: no records in split {split!r}" +
                            (f" with latent_steps <= {k_max}" if k_max is not None else ""))
    rows = shard_rows(len(selected), process_index, process_count)
    per_process = -(-len(selected) // process_count)
    entries = [(*selected[i], True) for i in rows]
    # A shorter shard repeats a record as invalid so all processes run the same number of batches.
    entries += [(*selected[rows[0] if rows else 0], False)] * (per_process - len(rows))
    collate = functools.partial(collate_examples, cfg=cfg, pad_id=_pad_id(tokenizer_dir))
    ds = (grain.MapDataset.source(RecordDataSource(data_dir, entries, cfg.global_feature))
          .map(ExampleBuilder(data_dir, tokenizer_dir, cfg))
          .batch(cfg.batch_size, drop_remainder=False, batch_fn=collate))
    return iter(_to_iter(ds, cfg))
