"""Tiny randomly initialised model directories in HuggingFace format, built without torch or downloads.

The demo (and anyone trying the framework on a laptop) needs a backbone, an auxiliary decoder, a ROI-feature
encoder and a tokenizer. These functions write them exactly as a real checkpoint directory looks (config.json,
model.safetensors, tokenizer / preprocessor files), so the same loading code serves the demo and real
Qwen3-VL-8B / Qwen3-1.7B / MedSigLIP checkpoints: only the paths in a config change.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.models import hf_mapping, safetensors_io
from vital_jax.models.qwen3_vl import preprocessing as vl_preprocessing
from vital_jax.models.qwen3_vl.prompt import (ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END,
                                              VISION_START)

VOCAB_SIZE = 512
# The Qwen special tokens sit at the top of the tiny vocabulary.
SPECIAL_TOKEN_IDS = {ENDOFTEXT: 500, IM_START: 501, IM_END: 502, VISION_START: 503, VISION_END: 504,
                     IMAGE_PAD: 505, VIDEO_PAD: 506}


def _write_model(out_dir: str, hf_config: dict, params, rules) -> None:
    os.makedirs(out_dir, exist_ok=True)
    specs = hf_mapping.to_hf_specs(jax.tree.map(np.asarray, params), rules, np.dtype(np.float32))
    safetensors_io.write_safetensors(out_dir, specs)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


def write_tokenizer(out_dir: str, corpus: Iterable[str]) -> None:
    """A byte-level BPE over the demo's own text with the Qwen special tokens (see tiny_tokenizer)."""
    from vital_jax.models.qwen3_vl.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(out_dir, list(corpus), VOCAB_SIZE, special_token_ids=SPECIAL_TOKEN_IDS)


def mrope_section(head_dim: int) -> list[int]:
    """An MRoPE (T, H, W) split of head_dim/2 frequencies: [4, 2, 2] at head_dim 16 (H and W a quarter each)."""
    half = head_dim // 2
    if head_dim % 2 or half < 4:
        raise ValueError(f"head_dim must be even and >= 8, got {head_dim}")
    return [half - 2 * (half // 4), half // 4, half // 4]


def qwen3_vl_hf_config(hidden: int = 64, layers: int = 2, *, head_dim: int = 16, heads: int | None = None,
                       kv_heads: int | None = None, intermediate: int | None = None, vision_depth: int = 2,
                       vision_hidden: int = 32, vision_heads: int = 2, vision_intermediate: int | None = None,
                       deepstack: tuple[int, ...] = (0,), num_position_embeddings: int = 64,
                       vocab_size: int = VOCAB_SIZE, special_token_ids: dict[str, int] | None = None,
                       rope_theta: float = 5e6) -> dict:
    """The HF `config.json` dict of a small Qwen3-VL. Defaults: heads = hidden / head_dim, kv_heads = heads / 2,
    intermediate = 2 * hidden (same for the vision tower); special ids those of the tiny tokenizer.

    rope_theta: Qwen3-VL's 5e6 suits head_dim 128 (64 frequencies). A small head_dim has few frequencies, and at
    5e6 the height/width ones of MRoPE barely turn between neighbouring image tokens; a small model that must
    learn where things are in the image needs a smaller base (e.g. 1e4)."""
    from transformers import Qwen3VLConfig as HFQwen3VLConfig

    ids = SPECIAL_TOKEN_IDS if special_token_ids is None else special_token_ids
    heads = heads or hidden // head_dim
    return HFQwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or max(1, heads // 2), head_dim=head_dim, rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                          "mrope_section": mrope_section(head_dim), "mrope_interleaved": True}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden,
                           intermediate_size=vision_intermediate or 2 * vision_hidden, num_heads=vision_heads,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=hidden,
                           num_position_embeddings=num_position_embeddings,
                           deepstack_visual_indexes=list(deepstack)),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], eos_token_id=ids[IM_END], tie_word_embeddings=False).to_dict()


def init_qwen3_vl_params(hf_config: dict, seed: int = 0, jit: bool = False) -> dict:
    """Random Flax params (float32, per-layer layout) of the Qwen3-VL that `hf_config` describes. jit=True
    compiles the initialisation once instead of op by op (seconds faster on a CPU; values may differ from the
    eager ones in the last bit)."""
    from vital_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration
    from vital_jax.models.qwen3_vl.config import Qwen3VLConfig

    config = Qwen3VLConfig.from_hf_dict(hf_config, "small qwen3_vl")
    model = Qwen3VLForConditionalGeneration(config)
    vis = config.vision
    grid = ((1, vis.spatial_merge_size, vis.spatial_merge_size),)

    def init(key):
        params = model.init(key, input_ids=jnp.zeros((1, 1), jnp.int32))["params"]
        params["visual"] = model.init(key, jnp.zeros((vis.merge_unit, vis.patch_dim)), grid,
                                      method=model.encode_images)["params"]["visual"]
        return params

    return (jax.jit(init) if jit else init)(jax.random.PRNGKey(seed))


def save_qwen3_vl(out_dir: str, hf_config: dict, params: dict, image_pixels: int,
                  tokenizer_dir: str | None = None) -> str:
    """Write a Qwen3-VL HF directory: config.json, model.safetensors (float32), preprocessor_config.json (every
    image resized to about `image_pixels`) and the tokenizer files of `tokenizer_dir`."""
    from vital_jax.models.qwen3_vl import params as vl_params
    from vital_jax.models.qwen3_vl.config import Qwen3VLConfig

    config = Qwen3VLConfig.from_hf_dict(hf_config, out_dir)
    _write_model(out_dir, hf_config, params, vl_params.rules(config))
    vl_preprocessing.write_preprocessor_config(out_dir, min_pixels=image_pixels, max_pixels=image_pixels)
    _copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def write_tiny_qwen3_vl(out_dir: str, seed: int = 0, hidden: int = 64, layers: int = 2, image_pixels: int = 128 * 128,
                        tokenizer_dir: str | None = None, **sizes) -> str:
    """A tiny random Qwen3-VL (text hidden `hidden`, `layers` decoder layers, a 2-block vision tower with
    deepstack) whose processor resizes every image to about `image_pixels`. `sizes`: the other knobs of
    `qwen3_vl_hf_config` (head_dim, heads, vision_depth, vision_hidden, ...)."""
    hf = qwen3_vl_hf_config(hidden, layers, **sizes)
    return save_qwen3_vl(out_dir, hf, init_qwen3_vl_params(hf, seed), image_pixels, tokenizer_dir)


def qwen3_hf_config(hidden: int = 48, layers: int = 2, *, head_dim: int = 16, heads: int | None = None,
                    kv_heads: int = 1, intermediate: int | None = None, vocab_size: int = VOCAB_SIZE,
                    eos_token_id: int = SPECIAL_TOKEN_IDS[IM_END]) -> dict:
    """The HF `config.json` dict of a small Qwen3 causal LM with tied embeddings (like Qwen3-1.7B)."""
    from transformers import Qwen3Config as HFQwen3Config

    return HFQwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads or hidden // head_dim,
                         num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=True,
                         eos_token_id=eos_token_id).to_dict()


def init_qwen3_params(hf_config: dict, seed: int = 1, jit: bool = False) -> dict:
    """Random Flax params (float32, per-layer layout) of the Qwen3 that `hf_config` describes (jit: see
    `init_qwen3_vl_params`)."""
    from vital_jax.models.qwen3 import Qwen3ForCausalLM
    from vital_jax.models.qwen3.config import Qwen3Config

    config = Qwen3Config.from_hf_dict(hf_config, "small qwen3")

    def init(key):
        return Qwen3ForCausalLM(config).init(key, input_ids=jnp.zeros((1, 1), jnp.int32))["params"]

    return (jax.jit(init) if jit else init)(jax.random.PRNGKey(seed))


def save_qwen3(out_dir: str, hf_config: dict, params: dict, tokenizer_dir: str | None = None) -> str:
    """Write a Qwen3 HF directory: config.json, model.safetensors (float32) and the tokenizer files."""
    from vital_jax.models.qwen3 import params as qwen3_params

    _write_model(out_dir, hf_config, params, qwen3_params.RULES)
    _copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def write_tiny_qwen3(out_dir: str, seed: int = 1, hidden: int = 48, layers: int = 2,
                     tokenizer_dir: str | None = None, **sizes) -> str:
    """A tiny random Qwen3 causal LM (tied embeddings, like Qwen3-1.7B) over the same tiny vocabulary. `sizes`:
    the other knobs of `qwen3_hf_config` (head_dim, heads, kv_heads, intermediate)."""
    hf = qwen3_hf_config(hidden, layers, **sizes)
    return save_qwen3(out_dir, hf, init_qwen3_params(hf, seed), tokenizer_dir)


def tiny_siglip_config(hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int | None = None,
                       image_size: int = 112, patch_size: int = 14):
    """The SiglipVisionConfig of a tiny SigLIP vision tower without the MAP head (ROI features use patch tokens)."""
    from vital_jax.models.siglip.config import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
                              patch_size=patch_size, use_head=False)


def siglip_preprocessor_config(image_size: int) -> dict:
    """The preprocessor_config.json of SigLIP's image processor (bicubic resize to a square, mean = std = 0.5)."""
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "size": {"height": image_size, "width": image_size}}


def save_siglip(out_dir: str, config, params: dict) -> str:
    """Write a SigLIP vision tower as a HF directory: config.json, model.safetensors (float32) and
    `siglip_preprocessor_config` at the config's image size."""
    from vital_jax.models.siglip.params import save_siglip_vision

    save_siglip_vision(out_dir, config, jax.tree.map(np.asarray, params))
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(siglip_preprocessor_config(config.image_size), f, indent=2)
    return out_dir


def write_tiny_siglip(out_dir: str, seed: int = 2, hidden: int = 32, image_size: int = 112) -> str:
    """A tiny random SigLIP vision tower (patch 14: an 8x8 grid at 112 px) with its preprocessor config.

    Written into `out_dir`.tmp and renamed into place whole, so `out_dir` exists only complete: the demo and the
    study reuse an encoder they find (by its config.json), and one cut short by a kill failed every later run.
    `out_dir` must not exist or be empty."""
    from vital_jax.models.siglip import SiglipVisionModel

    config = tiny_siglip_config(hidden, image_size=image_size)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; write the tiny SigLIP into a new one")
    model = SiglipVisionModel(config)
    params = model.init(jax.random.PRNGKey(seed), model.dummy_input())["params"]
    staging = out_dir.rstrip(os.sep) + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed write left
    save_siglip(staging, config, params)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.rename(staging, out_dir)
    return out_dir


def _copy_tokenizer(tokenizer_dir: str | None, out_dir: str) -> None:
    if tokenizer_dir is None:
        return
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
