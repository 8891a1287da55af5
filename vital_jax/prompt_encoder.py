"""(image, question) pairs -> fixed-shape `PrefixInputs` for a Qwen3-VL backbone: the prompt side of every
method's predictor (VITAL's `inference.Predictor`, MedSynapse-V's `medsynapse.predict.MemoryPredictor`) and of the
training probe. It knows the backbone's config and the tokenizer, nothing of any method.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from vital_jax.data.images import load_image
from vital_jax.data.pipeline import blind
from vital_jax.models.qwen3_vl import preprocessing, prompt
from vital_jax.models.qwen3_vl.cached import prefix_inputs
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{what} of {n} exceeds the largest bucket {max(buckets)}")


def same_source(current: dict, recorded: dict) -> bool:
    """Whether what a cached predictor was built from (`recorded`: name -> object) is still what the run holds
    (`current`): the same objects (a replaced module, config or parameter tree means a new predictor), the
    frozen-dataclass `paths` compared by value. Shared by VITAL's and MedSynapse-V's `shared_predictor`."""
    return current.keys() == recorded.keys() and all(
        current[k] is recorded[k] or (k == "paths" and current[k] == recorded[k]) for k in current)


class PromptEncoder:
    """(image, question) pairs -> fixed-shape `PrefixInputs` (prompt and patch buckets, so that one compiled
    program serves every batch). Needs no parameters: the training probe encodes its example with it too."""

    def __init__(self, backbone_config: Qwen3VLConfig, data_config, tokenizer_dir: str, batch_size: int):
        self.backbone_config = backbone_config
        self.batch_size = batch_size
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer = prompt.load_tokenizer(tokenizer_dir)
        self.special = prompt.special_token_ids(self.tokenizer)
        cfg = data_config
        self.min_pixels, self.max_pixels = cfg.min_pixels, cfg.max_pixels
        self.blind_images = bool(cfg.get("blind_images", False))
        # Benchmark prompts (options listed) can be longer than training prompts; extra buckets cost one compile each.
        self.prompt_buckets = tuple(sorted(set(cfg.prompt_buckets) | {256, 512, 1024, 2048, 4096}))
        vis = backbone_config.vision
        per_image = self.max_pixels // (vis.patch_size ** 2)
        self.patch_bucket = batch_size * (per_image + 4 * vis.merge_unit)
        self.vocab_size = backbone_config.text.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, int]:
        """Where an answer ends: <|im_end|> (the chat turn) or <|endoftext|>."""
        return self.special[prompt.IM_END], self.special[prompt.ENDOFTEXT]

    def decode(self, ids, length: int) -> str:
        """The text of the first `length` generated tokens, end-of-sequence tokens dropped."""
        stop = set(self.eos_token_ids)
        return self.tokenizer.decode([int(t) for t in ids[:int(length)] if int(t) not in stop],
                                     skip_special_tokens=True).strip()

    def encode(self, images: Sequence, questions: Sequence[str]):
        """Images + questions -> (PrefixInputs, number of real examples); pads to the batch size."""
        n = len(images)
        if n > self.batch_size:
            raise ValueError(f"{n} examples > batch size {self.batch_size}")
        patches, grids, rows = [], [], []
        for index, (image, question) in enumerate(zip(images, questions)):
            # The checks and 16-bit window every stage applies (vital_jax.data.images); errors name the file.
            rgb = load_image(image)
            try:
                p, g = preprocessing.preprocess_image(rgb, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            except preprocessing.ImagePreprocessError as e:
                name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"example {index}"
                raise preprocessing.ImagePreprocessError(f"{name}: {e}") from e
            if self.blind_images:  # a text-only control run is evaluated as it was trained: without the image
                p = blind(p)
            patches.append(p)
            grids.append(g)
            rows.append(prompt.tokenize_prompt(self.tokenizer, question, g).input_ids)
        for i, row in enumerate(rows):
            # An id past the embedding table would silently become a NaN embedding inside jit.
            bad = sorted({int(t) for t in row if not 0 <= int(t) < self.vocab_size})
            if bad:
                raise ValueError(f"example {i} ({questions[i]!r}): prompt token ids {bad[:5]} are outside the "
                                 f"model's vocabulary of {self.vocab_size}; does the tokenizer in "
                                 f"{self.tokenizer_dir} belong to this model?")
        longest = max(range(n), key=lambda i: len(rows[i]))
        if len(rows[longest]) > max(self.prompt_buckets):
            image = images[longest]
            name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"example {longest}"
            question = questions[longest]
            raise ValueError(f"{name}, question {question[:80]!r}{'...' if len(question) > 80 else ''}: the prompt "
                             f"is {len(rows[longest])} tokens, more than the largest prompt bucket "
                             f"{max(self.prompt_buckets)}")
        while len(rows) < self.batch_size:  # padding examples repeat the first one
            patches.append(patches[0])
            grids.append(grids[0])
            rows.append(rows[0])
        width = _bucket(max(len(r) for r in rows), self.prompt_buckets, "prompt length")
        ids = np.full((self.batch_size, width), self.special[prompt.ENDOFTEXT], np.int32)
        valid = np.zeros((self.batch_size, width), bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], valid[i, width - len(r):] = r, True
        packed = np.concatenate(patches)
        if packed.shape[0] > self.patch_bucket:
            raise ValueError(f"{packed.shape[0]} image patches exceed the bucket {self.patch_bucket}")
        packed = np.concatenate([packed, np.zeros((self.patch_bucket - packed.shape[0], packed.shape[1]),
                                                  packed.dtype)])
        return prefix_inputs(ids, valid, np.stack(grids), packed, self.backbone_config), n
