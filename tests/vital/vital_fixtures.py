"""Tiny VITAL setups for tests: a random Qwen3-VL backbone and Qwen3 decoder from transformers, and batches."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from tests.hf_reference import save_tiny_qwen3, save_tiny_qwen3_vl
from vital_jax.layers.linear import LoraConfig
from vital_jax.models.qwen3 import Qwen3Config
from vital_jax.models.qwen3 import load_params as load_qwen3
from vital_jax.models.qwen3_vl import Qwen3VLConfig, load_params
from vital_jax.vital.batch import VitalBatch, prefix_inputs
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.model import VitalModel

IMG, VS, VE, IM_END = 190, 188, 189, 187
ROI_DIM = 24


@dataclasses.dataclass
class TinyVital:
    hf_backbone: object
    model: VitalModel
    params: dict


def build(tmp_path, k_max=4, lora_rank=4, dtype="float32", param_dtype="float32", **vital_overrides) -> TinyVital:
    """dtype / param_dtype: compute and storage dtype of both models, as loaded (before training's fp32 copy)."""
    hf_backbone = save_tiny_qwen3_vl(str(tmp_path / "backbone"), seed=3)
    save_tiny_qwen3(str(tmp_path / "decoder"), seed=4, vocab_size=200, hidden_size=48, head_dim=16,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    backbone_config = Qwen3VLConfig.from_pretrained(str(tmp_path / "backbone"), **dtypes)
    decoder_config = Qwen3Config.from_pretrained(str(tmp_path / "decoder"), **dtypes)
    cfg = VitalConfig(k_max=k_max, roi_dim=ROI_DIM,
                      lora=LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, dropout=0.05) if lora_rank else None,
                      **vital_overrides)
    model = VitalModel(cfg, backbone_config, decoder_config)
    params = model.init_params(jax.random.PRNGKey(0), load_params(str(tmp_path / "backbone"), backbone_config),
                               load_qwen3(str(tmp_path / "decoder"), decoder_config))
    return TinyVital(hf_backbone, model, params)


def prompt_row(rng, grid, text_before=3, text_after=4):
    t, h, w = grid
    return ([int(x) for x in rng.randint(0, 180, text_before)] + [VS] + [IMG] * (t * h * w // 4) + [VE]
            + [int(x) for x in rng.randint(0, 180, text_after)])


def make_batch(model: VitalModel, seed=0, latent_steps=(2, 4), grids=((1, 4, 4), (1, 4, 6)), answer_len=(3, 5),
               step_len=5, pad_patches_to=None, with_global=False) -> tuple[VitalBatch, dict]:
    """A random batch of len(latent_steps) examples; returns (VitalBatch, the numpy dict it came from)."""
    rng = np.random.RandomState(seed)
    b = len(latent_steps)
    rows = [prompt_row(rng, g, 2 + i, 3 + 2 * i) for i, g in enumerate(grids[:b])]
    tp = max(len(r) for r in rows)
    prompt_ids = np.zeros((b, tp), np.int32)
    prompt_valid = np.zeros((b, tp), bool)
    for i, r in enumerate(rows):
        prompt_ids[i, tp - len(r):], prompt_valid[i, tp - len(r):] = r, True
    ta = max(answer_len) + 1
    answer_ids = np.zeros((b, ta), np.int32)
    answer_valid = np.zeros((b, ta), bool)
    for i in range(b):
        n = answer_len[i % len(answer_len)]
        answer_ids[i, :n + 1] = list(rng.randint(0, 180, n)) + [IM_END]
        answer_valid[i, :n + 1] = True
    k_max = model.config.k_max
    step_ids = rng.randint(0, 180, (b, k_max, step_len)).astype(np.int32)
    step_valid = np.zeros((b, k_max, step_len), bool)
    for i, k in enumerate(latent_steps):
        for s in range(k):
            step_valid[i, s, :rng.randint(2, step_len + 1)] = True
    n_patches = sum(t * h * w for t, h, w in grids[:b])
    patches = rng.randn(pad_patches_to or n_patches, model.backbone_config.vision.patch_dim).astype(np.float32)
    roi = rng.randn(b, ROI_DIM).astype(np.float32)
    roi /= np.linalg.norm(roi, axis=1, keepdims=True)
    data = dict(prompt_ids=prompt_ids, prompt_valid=prompt_valid, pixel_patches=patches,
                image_grid_thw=np.asarray(grids[:b], np.int32), answer_ids=answer_ids, answer_valid=answer_valid,
                latent_steps=np.asarray(latent_steps, np.int32), step_ids=step_ids, step_valid=step_valid,
                roi_feature=roi, example_valid=np.ones((b,), bool))
    if with_global:
        g = rng.randn(b, ROI_DIM).astype(np.float32)
        data["global_feature"] = g / np.linalg.norm(g, axis=1, keepdims=True)
    from vital_jax.vital.batch import from_numpy
    return from_numpy(data, model.backbone_config), data


def select(data: dict, rows) -> dict:
    """Sub-batch of the given example rows (re-packing the image patches)."""
    grids = data["image_grid_thw"]
    sizes = [int(np.prod(g)) for g in grids]
    starts = np.cumsum([0] + sizes)
    out = {k: v[rows] for k, v in data.items() if k not in ("pixel_patches", "image_grid_thw")}
    out["pixel_patches"] = np.concatenate([data["pixel_patches"][starts[r]:starts[r + 1]] for r in rows])
    out["image_grid_thw"] = grids[rows]
    # Drop all-padding prompt columns so the sub-batch is what it would be alone.
    keep = out["prompt_valid"].any(axis=0)
    out["prompt_ids"], out["prompt_valid"] = out["prompt_ids"][:, keep], out["prompt_valid"][:, keep]
    return out


@functools.lru_cache(maxsize=None)
def _jitted_forward(model: VitalModel):
    return jax.jit(lambda params, batch: model.forward(params, batch))


def forward(model: VitalModel, params, batch):
    """model.forward, jitted once per model (eager dispatch through the scan is slow on CPU)."""
    return _jitted_forward(model)(params, batch)


__all__ = ["TinyVital", "build", "forward", "make_batch", "prefix_inputs", "select"]
