"""Tiny MedSynapse-V setups for tests: a random Qwen3-VL backbone from transformers, converted, and batches of
left-padded image prompts, right-padded answers and random anatomical feature maps."""

from __future__ import annotations

import dataclasses

import numpy as np

from tests.hf_reference import save_tiny_qwen3_vl
from vital_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, load_params
from vital_jax.models.qwen3_vl.cached import prefix_inputs

IMG, VS, VE, IM_END = 190, 188, 189, 187
# Not the default tiny shape: hidden 48, GQA 4:1, head_dim 12, two decoder layers.
TEXT = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=12, intermediate_size=80,
            num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": [2, 2, 2], "mrope_interleaved": True})


@dataclasses.dataclass
class TinyBackbone:
    hf: object
    config: Qwen3VLConfig
    model: Qwen3VLForConditionalGeneration
    params: dict


def build_backbone(path) -> TinyBackbone:
    hf = save_tiny_qwen3_vl(str(path), seed=7, text=TEXT)
    config = Qwen3VLConfig.from_pretrained(str(path))
    return TinyBackbone(hf, config, Qwen3VLForConditionalGeneration(config), load_params(str(path), config))


def make_batch(config: Qwen3VLConfig, seed=0, grids=((1, 4, 4), (1, 4, 6)), answer_len=(3, 5)) -> dict:
    """Numpy batch of len(grids) examples: prompt_ids/prompt_valid (B, Tp) left-padded, pixel_patches,
    image_grid_thw, answer_ids/answer_valid (B, Ta) right-padded (ending with <|im_end|>), and `prefix`."""
    rng = np.random.RandomState(seed)
    rows = []
    for i, (t, h, w) in enumerate(grids):
        rows.append(list(rng.randint(0, 180, 2 + i)) + [VS] + [IMG] * (t * h * w // 4) + [VE]
                    + list(rng.randint(0, 180, 3 + 2 * i)))
    b, tp = len(rows), max(len(r) for r in rows)
    prompt_ids, prompt_valid = np.zeros((b, tp), np.int32), np.zeros((b, tp), bool)
    for i, r in enumerate(rows):
        prompt_ids[i, tp - len(r):], prompt_valid[i, tp - len(r):] = r, True
    ta = max(answer_len) + 1
    answer_ids, answer_valid = np.zeros((b, ta), np.int32), np.zeros((b, ta), bool)
    for i in range(b):
        n = answer_len[i % len(answer_len)]
        answer_ids[i, :n + 1] = list(rng.randint(0, 180, n)) + [IM_END]
        answer_valid[i, :n + 1] = True
    pixels = rng.randn(sum(t * h * w for t, h, w in grids), config.vision.patch_dim).astype(np.float32)
    grids = np.asarray(grids, np.int32)
    return dict(prompt_ids=prompt_ids, prompt_valid=prompt_valid, pixel_patches=pixels, image_grid_thw=grids,
                answer_ids=answer_ids, answer_valid=answer_valid,
                prefix=prefix_inputs(prompt_ids, prompt_valid, grids, pixels, config))
