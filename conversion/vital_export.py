"""Export a trained VITAL run for serving: the backbone with LoRA merged, as a HF Qwen3-VL directory that
`Qwen3VLForConditionalGeneration.from_pretrained` loads, with the training scaffolding beside it.

Layout of the output directory:
  config.json, model.safetensors, tokenizer / preprocessor files   the deployable model (backbone + merged LoRA)
  vital.json                     {"k_max", "image_token_id", "pixels", ...}: what the latent loop and the prompt
                                 need at inference (`torch_latent_generate`)
  scaffolding/decoder/           the auxiliary text decoder as a HF Qwen3 directory
  scaffolding/heads.safetensors  pj_in.* and visual_projector.* (Flax layout: kernels are (in, out)), and for a
                                 run with `vital.latent_input = "pause"` the slots' inputs `pause_embeddings`
                                 (K_max, D)
The decoder and the heads are for interpretability only; inference uses the top-level model (and, for a pause
run, the pause vectors, as vital.json's "latent_input" says) with `torch_latent_generate`.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from vital_jax.checkpoint import CheckpointError
from vital_jax.jsonio import atomic_write, read_json
from vital_jax.models import hf_config, hf_mapping, model_dir, safetensors_io
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.vital import trainable

VITAL_FILE = "vital.json"
HEADS_FILE = os.path.join("scaffolding", "heads.safetensors")
PAUSE_TENSOR = "pause_embeddings"


def is_training_workdir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        return False
    config = read_json(cfg, CheckpointError)
    return isinstance(config, dict) and "vital" in config


def export_run(workdir: str, out_dir: str, dtype: str = "float32",
               max_shard_bytes: int = safetensors_io.DEFAULT_SHARD_BYTES, run=None) -> dict:
    """Merge LoRA and write the serving directory (the backbone and the decoder sharded above `max_shard_bytes`);
    returns {"model": out_dir, "files": [...]}. `run`: the workdir's `run.TrainedRun` already loaded, else it is
    loaded here."""
    import ml_dtypes

    from vital_jax.run import load_run

    safetensors_io.check_export_dir(out_dir, workdir)
    if run is None:
        run = load_run(workdir)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    model = run.model
    # Merged straight into the export's dtype: a bf16-stored backbone merged into bf16 and then written in
    # float32 would have lost most of a small update to rounding.
    merged = jax.tree.map(np.asarray, trainable.merge_lora(run.params["backbone"], model.config.lora, np_dtype)
                          if model.config.lora else run.params["backbone"])
    # HF checkpoints are per layer: undo the scan layout of a run trained with `model.scan_layers`.
    merged = qwen3_vl_params.to_layout(merged, scan_layers=False)
    decoder = qwen3_params.to_layout(jax.tree.map(np.asarray, run.params["decoder"]), scan_layers=False)
    with safetensors_io.writing_export(out_dir):
        model_dir.copy_side_files(run.paths.backbone_dir, out_dir)
        hf_config.write_dtype(out_dir, np_dtype.name)
        if os.path.isdir(run.paths.tokenizer_dir):
            for name in ("tokenizer.json", "tokenizer_config.json"):
                src = os.path.join(run.paths.tokenizer_dir, name)
                if os.path.exists(src):
                    shutil.copy2(src, os.path.join(out_dir, name))
        files = safetensors_io.write_safetensors(
            out_dir, hf_mapping.to_hf_specs(merged, qwen3_vl_params.rules(model.backbone_config), np_dtype),
            max_shard_bytes)
        scaffold = os.path.join(out_dir, "scaffolding")
        decoder_dir = os.path.join(scaffold, "decoder")
        os.makedirs(decoder_dir, exist_ok=True)
        model_dir.copy_side_files(run.paths.decoder_dir, decoder_dir)
        hf_config.write_dtype(decoder_dir, np_dtype.name)
        safetensors_io.write_safetensors(decoder_dir, hf_mapping.to_hf_specs(decoder, qwen3_params.RULES, np_dtype),
                                         max_shard_bytes)
        heads = {f"{top}.{path.replace('/', '.')}": np.asarray(leaf)
                 for top in ("pj_in", "visual_projector")
                 for path, leaf in hf_mapping.flatten(run.params[top]).items()}
        if model.config.latent_input == "pause":  # the latent slots' inputs: serving without them feeds z back
            heads[PAUSE_TENSOR] = np.asarray(run.params["pause_embeddings"])
        safetensors_io.write_safetensors(scaffold, [safetensors_io.TensorSpec(n, a.shape, a.dtype, lambda a=a: a)
                                                    for n, a in sorted(heads.items())])
        os.replace(os.path.join(scaffold, safetensors_io.SINGLE_FILE), os.path.join(out_dir, HEADS_FILE))
        backbone_cfg = model.backbone_config
        record = {"k_max": model.config.k_max, "image_token_id": backbone_cfg.image_token_id,
                  "spatial_merge_size": backbone_cfg.vision.spatial_merge_size, "trained_step": run.step,
                  "curriculum_finished": run.finished, "lora_merged": model.config.lora is not None,
                  # what a latent slot is fed (z_{k-1}, or heads.safetensors' pause vectors) and the K it trained at
                  "latent_input": model.config.latent_input, "latent_steps_cap": model.config.latent_steps_cap,
                  # the pixel budget of training, which the export's preprocessor_config.json may not state
                  "pixels": {"min_pixels": int(run.config.data.min_pixels),
                             "max_pixels": int(run.config.data.max_pixels)}}
        # Written last and atomically: its presence marks a complete export (`study.sft_backbone` relies on it).
        atomic_write(os.path.join(out_dir, VITAL_FILE), lambda f: json.dump(record, f, indent=2))
    return {"model": out_dir, "files": files}


if __name__ == "__main__":
    # A library module: running it did nothing and exited 0. The command that exports a run is flax_to_hf.
    raise SystemExit("error: conversion.vital_export is a library module; export a training workdir with "
                     "python -m conversion.flax_to_hf --checkpoint=WORKDIR --out=DIR")
