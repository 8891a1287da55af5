"""A pretraining corpus (image-text pairs and plain texts) -> fixed-shape numpy batches, seeded and resumable.

Corpus directory:
  pairs.jsonl   {"id": str, "image": path relative to the corpus, "prompt": str, "text": str, "split": str}
  texts.jsonl   {"id": str, "text": str, "split": str}          (reasoning-chain sentences)
  tokenizer/    tokenizer.json + tokenizer_config.json with the Qwen special tokens

Pair batches follow the contract of `vital_jax.data.pipeline` for the fields they carry (all numpy):
  prompt_ids, prompt_valid (B, Tp)   chat prompt with the image, LEFT-padded; Tp the smallest prompt bucket that fits.
  pixel_patches (Np, 1536), image_grid_thw (B, 3)   as in the pipeline (`preprocessing.pad_patches`).
  answer_ids, answer_valid (B, Ta)   the pair's text + <|im_end|>, right-padded; Ta the smallest text bucket that
      fits (a longer text is an error naming the record, not a silent cut).
  record_index (B,), example_valid (B,)   the row in pairs.jsonl (of this split); False for padding examples.
Text batches: ids, valid (B, T) = text + <|im_end|>, right-padded to a bucket; record_index, example_valid.
Pad ids are <|endoftext|>.

Order: training batch i holds the examples perm_e[j*B : (j+1)*B] with e = i // batches_per_epoch,
j = i % batches_per_epoch and perm_e a permutation seeded by (seed, e). A batch is a pure function of its index,
so the loader state is the next batch index (`TrainBatches.get_state / set_state`) and a resumed run sees
exactly the batches an uninterrupted one would. The incomplete last batch of an epoch is dropped.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np

from vital_jax.data import images
from vital_jax.data.records import LineError, iter_jsonl
from vital_jax.models.qwen3_vl import preprocessing, prompt

PAIRS_FILE = "pairs.jsonl"
TEXTS_FILE = "texts.jsonl"
TOKENIZER_DIR = "tokenizer"
_PAIR_FIELDS = ("id", "image", "prompt", "text", "split")
_TEXT_FIELDS = ("id", "text", "split")


class CorpusError(ValueError):
    """The corpus is malformed or an example cannot become a batch row; names the file/line or record."""


def read_jsonl(path: str, fields: Sequence[str], split: str | None = None) -> list[dict]:
    """Records of a JSONL file (those of `split` unless None), each checked to have `fields`."""
    if not os.path.isfile(path):
        raise CorpusError(f"{path}: not found")
    out = []
    for line_no, record in iter_jsonl(path):  # a line that is not UTF-8, JSON or an object is a LineError
        if isinstance(record, LineError):
            raise CorpusError(f"{path}:{line_no}: {record}")
        missing = [k for k in fields if not isinstance(record.get(k), str)]
        if missing:
            raise CorpusError(f"{path}:{line_no}: missing or non-string field(s) {missing}")
        if split is None or record["split"] == split:
            out.append(record)
    return out


def _bucket(length: int, buckets: Sequence[int]) -> int | None:
    return next((b for b in sorted(buckets) if b >= length), None)


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Batch shapes. min_pixels / max_pixels: the Qwen3-VL resize budget per image (the backbone's
    preprocessor_config); patch buckets are B x (max patches per image) / 2 and x 1."""

    batch_size: int = 16
    prompt_buckets: tuple[int, ...] = (64, 128)
    text_buckets: tuple[int, ...] = (32, 64, 128)
    min_pixels: int = 128 * 128
    max_pixels: int = 128 * 128

    def __post_init__(self):
        if self.batch_size < 1 or not self.prompt_buckets or not self.text_buckets:
            raise CorpusError(f"batch_size must be positive and the buckets non-empty: {self}")
        if min(self.text_buckets) < 2:
            raise CorpusError(f"text buckets must be >= 2 tokens (one is predicted from the prompt): {self}")

    @property
    def patch_buckets(self) -> tuple[int, ...]:
        full = self.batch_size * (self.max_pixels // preprocessing.PATCH_SIZE ** 2)
        block = preprocessing.MERGE_SIZE ** 2
        return tuple(sorted({max(block, -(-full // d // block) * block) for d in (2, 1)}))


class Examples(abc.ABC):
    """Shared by pairs and texts: the tokenizer, the special ids and padding of a list of record indices."""

    def __init__(self, corpus_dir: str, records: list[dict], cfg: CorpusConfig, tokenizer_dir: str | None):
        self.corpus_dir, self.records, self.cfg = corpus_dir, records, cfg
        self.tokenizer = prompt.load_tokenizer(tokenizer_dir or os.path.join(corpus_dir, TOKENIZER_DIR))
        specials = prompt.special_token_ids(self.tokenizer)
        self.pad_id, self.im_end_id = specials[prompt.ENDOFTEXT], specials[prompt.IM_END]

    def __len__(self) -> int:
        return len(self.records)

    def ids(self, index: int) -> list[str]:
        return [self.records[int(i)]["id"] for i in np.atleast_1d(index)]

    def _text_ids(self, record: dict) -> np.ndarray:
        ids = np.asarray(self.tokenizer.encode(record["text"] + prompt.IM_END, add_special_tokens=False).ids,
                         np.int32)
        if len(ids) < 2 or ids[-1] != self.im_end_id:
            raise CorpusError(f"record {record['id']!r}: text does not tokenise to >= 1 token + <|im_end|>")
        return ids

    def _right_padded(self, rows: list[np.ndarray], buckets: Sequence[int], what: str,
                      indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(r) for r in rows)
        length = _bucket(longest, buckets)
        if length is None:
            worst = int(indices[int(np.argmax([len(r) for r in rows]))])
            raise CorpusError(f"record {self.records[worst]['id']!r}: {what} of {longest} tokens is longer than "
                              f"the largest bucket {max(buckets)}")
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        valid = np.zeros((len(rows), length), bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)], valid[i, :len(r)] = r, True
        return ids, valid

    @abc.abstractmethod
    def batch(self, indices: Sequence[int], valid: Sequence[bool]) -> dict[str, np.ndarray]:
        """The batch of the examples at `indices` (`valid` False marks padding examples)."""


class PairExamples(Examples):
    """The image-text pairs of one split of a corpus; `batch(indices, valid)` -> a pair batch (module doc)."""

    def __init__(self, corpus_dir: str, split: str, cfg: CorpusConfig, tokenizer_dir: str | None = None):
        super().__init__(corpus_dir, read_jsonl(os.path.join(corpus_dir, PAIRS_FILE), _PAIR_FIELDS, split), cfg,
                         tokenizer_dir)

    def example(self, index: int) -> dict:
        """-> prompt_ids (Lp,), patches (N, 1536), grid_thw (3,), answer_ids (La,); errors name the record."""
        record = self.records[index]
        try:
            rgb = images.load_image(os.path.join(self.corpus_dir, record["image"]))
            patches, grid = preprocessing.preprocess_image(rgb, min_pixels=self.cfg.min_pixels,
                                                           max_pixels=self.cfg.max_pixels)
            prompt_ids = prompt.tokenize_prompt(self.tokenizer, record["prompt"], grid).input_ids
            return dict(prompt_ids=prompt_ids, patches=patches, grid_thw=grid.astype(np.int32),
                        answer_ids=self._text_ids(record))
        except CorpusError:
            raise
        except Exception as e:  # image, tokenizer: say which record
            raise CorpusError(f"record {record['id']!r} ({PAIRS_FILE}): {type(e).__name__}: {e}") from e

    def batch(self, indices: Sequence[int], valid: Sequence[bool]) -> dict[str, np.ndarray]:
        examples = [self.example(int(i)) for i in indices]
        longest = max(len(e["prompt_ids"]) for e in examples)
        prompt_len = _bucket(longest, self.cfg.prompt_buckets)
        if prompt_len is None:
            worst = int(indices[int(np.argmax([len(e["prompt_ids"]) for e in examples]))])
            raise CorpusError(f"record {self.records[worst]['id']!r}: prompt of {longest} tokens is longer than "
                              f"the largest prompt bucket {max(self.cfg.prompt_buckets)}")
        b = len(examples)
        prompt_ids = np.full((b, prompt_len), self.pad_id, np.int32)
        prompt_valid = np.zeros((b, prompt_len), bool)
        for i, e in enumerate(examples):
            n = len(e["prompt_ids"])
            prompt_ids[i, prompt_len - n:], prompt_valid[i, prompt_len - n:] = e["prompt_ids"], True
        answer_ids, answer_valid = self._right_padded([e["answer_ids"] for e in examples], self.cfg.text_buckets,
                                                      "text", indices)
        grids = np.stack([e["grid_thw"] for e in examples]).astype(np.int32)
        try:
            patches, _ = preprocessing.pad_patches(np.concatenate([e["patches"] for e in examples]), grids,
                                                   self.cfg.patch_buckets)
        except preprocessing.ImagePreprocessError as e:
            raise CorpusError(f"records {self.ids(indices)}: {e}") from e
        return dict(prompt_ids=prompt_ids, prompt_valid=prompt_valid, pixel_patches=patches, image_grid_thw=grids,
                    answer_ids=answer_ids, answer_valid=answer_valid,
                    record_index=np.asarray(indices, np.int32), example_valid=np.asarray(valid, bool))


class TextExamples(Examples):
    """The texts of one split of a corpus, tokenised once; `batch(indices, valid)` -> ids, valid (B, T), ..."""

    def __init__(self, corpus_dir: str, split: str, cfg: CorpusConfig, tokenizer_dir: str | None = None):
        super().__init__(corpus_dir, read_jsonl(os.path.join(corpus_dir, TEXTS_FILE), _TEXT_FIELDS, split), cfg,
                         tokenizer_dir)
        self._ids = [self._text_ids(r) for r in self.records]

    def batch(self, indices: Sequence[int], valid: Sequence[bool]) -> dict[str, np.ndarray]:
        ids, token_valid = self._right_padded([self._ids[int(i)] for i in indices], self.cfg.text_buckets, "text",
                                              indices)
        return dict(ids=ids, valid=token_valid, record_index=np.asarray(indices, np.int32),
                    example_valid=np.asarray(valid, bool))


class TrainBatches:
    """Endless training batches of `examples` in a seeded per-epoch order (module doc); resumable by index."""

    def __init__(self, examples: Examples, batch_size: int, seed: int):
        if len(examples) < batch_size:
            raise CorpusError(f"{len(examples)} training examples are fewer than one batch of {batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.batches_per_epoch = len(examples) // batch_size
        self.next_index = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, batch_index: int) -> np.ndarray:
        """Rows of the examples in training batch `batch_index`."""
        epoch, j = divmod(batch_index, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._perm[1][j * self.batch_size:(j + 1) * self.batch_size]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        rows = self.indices(self.next_index)
        self.next_index += 1
        return self.examples.batch(rows, np.ones(len(rows), bool))

    def get_state(self) -> dict:
        return {"next_batch": int(self.next_index), "seed": int(self.seed)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise CorpusError(f"loader state of seed {state['seed']} does not fit this loader (seed {self.seed})")
        self.next_index = int(state["next_batch"])


def eval_batches(examples: Examples, batch_size: int, limit: int | None = None) -> Iterator[dict]:
    """Batches of the first `limit` examples (None: all) in file order; the last batch is filled by repeating
    the first example with example_valid False."""
    n = len(examples) if limit is None else min(limit, len(examples))
    for start in range(0, n, batch_size):
        rows = list(range(start, min(start + batch_size, n)))
        valid = [True] * len(rows) + [False] * (batch_size - len(rows))
        yield examples.batch(rows + [0] * (batch_size - len(rows)), valid)
