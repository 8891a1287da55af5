"""Export a vital_jax Flax model directory back to a HuggingFace checkpoint directory.

    python -m conversion.flax_to_hf --checkpoint=/models/qwen3_1p7b_flax --out=/export/qwen3 [--dtype=bfloat16]

Writes config.json, model.safetensors (sharded with an index above --max_shard_gb) and the tokenizer/processor
files, loadable with transformers' `from_pretrained`. Tensors are produced and written one at a time.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from vital_jax import cli
from vital_jax.checkpoint import CheckpointError
from vital_jax.models import hf_config, hf_mapping, model_dir, registry, safetensors_io

_NP_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def export(checkpoint: str, out_dir: str, dtype: str = "float32", max_shard_gb: float = 2.0) -> list[str]:
    """Export `checkpoint` (a converted-model directory) to `out_dir`; returns written weight files."""
    import ml_dtypes

    safetensors_io.check_export_dir(out_dir, checkpoint)
    cfg = hf_config.read_config_json(checkpoint)
    source = f"{checkpoint}/config.json"
    family = registry.family_for(cfg, source)
    if family.export_rules is None:
        raise hf_config.ConfigError(f"{source}: export of {family.name} to HF is not supported")
    meta = model_dir.read_meta(checkpoint)
    config = family.config_from_hf(cfg, source, param_dtype=meta.get("param_dtype", "float32"))
    params = model_dir.load_params(checkpoint, family.abstract_params(config))
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(_NP_DTYPES[dtype])
    specs = hf_mapping.to_hf_specs(params, family.export_rules(config), np_dtype)
    with safetensors_io.writing_export(out_dir):
        model_dir.copy_side_files(checkpoint, out_dir)
        hf_config.write_dtype(out_dir, np_dtype.name)
        return safetensors_io.write_safetensors(out_dir, specs, int(max_shard_gb * 2**30))


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m conversion.flax_to_hf",
        description="Export a vital_jax Flax model directory (from conversion.hf_to_flax) to a HuggingFace "
                    "checkpoint directory that transformers' from_pretrained loads.")
    parser.add_argument("--checkpoint", required=True,
                        help="a vital_jax converted-model directory, a VITAL training workdir (LoRA is merged "
                             "into the backbone and the scaffolding is written under scaffolding/) or a MedSynapse-V "
                             "one (LoRA merged when Stage II ran, A_psi in autonomous.safetensors; "
                             "conversion/medsynapse_export.py)")
    parser.add_argument("--out", required=True,
                        help="output HF directory (created; must hold no weights yet, unless an interrupted export "
                             "left them: that export is redone)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_NP_DTYPES),
                        help="dtype of the written tensors (default float32)")
    parser.add_argument("--max_shard_gb", type=float, default=2.0,
                        help="shard size limit in GiB (default 2; one shard is held in memory while written)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        cli.usage(f"--checkpoint={args.checkpoint}: no such directory")
    cli.require_directories(out=args.out)
    cli.quiet_libraries()
    try:
        from conversion import medsynapse_export, vital_export

        if medsynapse_export.is_medsynapse_workdir(args.checkpoint):
            cli.status(f"loading the MedSynapse-V run in {args.checkpoint} and writing {args.out}...")
            result = medsynapse_export.export_run(args.checkpoint, args.out, args.dtype,
                                                  int(args.max_shard_gb * 2**30))
            print(medsynapse_export.describe_export(args.checkpoint, result))
            return 0
        if vital_export.is_training_workdir(args.checkpoint):
            cli.status(f"loading the VITAL run in {args.checkpoint}, merging LoRA and writing {args.out}...")
            result = vital_export.export_run(args.checkpoint, args.out, args.dtype, int(args.max_shard_gb * 2**30))
            print(f"exported the VITAL run {args.checkpoint} (LoRA merged) to {args.out}: "
                  f"{', '.join(result['files'])} + scaffolding/")
            return 0
        files = export(args.checkpoint, args.out, args.dtype, args.max_shard_gb)
    except (hf_mapping.ConversionError, hf_config.ConfigError, model_dir.ModelDirError, CheckpointError,
            ValueError, OSError) as e:
        cli.fail(e)
    print(f"exported {args.checkpoint} to {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
