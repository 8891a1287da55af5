"""Convert a HuggingFace checkpoint directory (safetensors) into a vital_jax Flax model directory.

    python -m conversion.hf_to_flax --hf_dir=/ckpt/Qwen3-1.7B --out=/models/qwen3_1p7b_flax [--param_dtype=bfloat16]

Reads single-file or sharded safetensors tensor by tensor (the safetensors library, no torch), checks every tensor
against the architecture in config.json, reports all unknown/missing/mis-shaped tensors together, and writes
config.json + an orbax checkpoint of the params + the tokenizer/processor files (see vital_jax.models.model_dir).
"""

from __future__ import annotations

import os
import sys
import time

from vital_jax import cli
from vital_jax.models import hf_config, model_dir, registry
from vital_jax.models.hf_mapping import ConversionError
from vital_jax.models.safetensors_io import SafetensorsError


def convert(hf_dir: str, out_dir: str, param_dtype: str = "float32") -> dict:
    """Convert `hf_dir` into `out_dir`; returns a small summary dict."""
    if os.path.realpath(out_dir) == os.path.realpath(hf_dir):
        raise model_dir.ModelDirError(f"{out_dir}: the conversion would write into its own source; give another "
                                      "--out")
    cfg = hf_config.read_config_json(hf_dir)
    model_dir.check_output_dir(out_dir, cfg)
    source = f"{hf_dir}/config.json"
    family = registry.family_for(cfg, source)
    config = family.config_from_hf(cfg, source, param_dtype=param_dtype)
    params = family.load_hf(hf_dir, config)
    copied = model_dir.save(out_dir, params, cfg, param_dtype, side_files_from=hf_dir)
    count = sum(int(x.size) for x in __import__("jax").tree.leaves(params))
    return {"family": family.name, "parameters": count, "copied_files": copied}


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m conversion.hf_to_flax",
        description="Convert a HuggingFace checkpoint directory (config.json + *.safetensors) into a vital_jax "
                    "Flax model directory (config.json + orbax params + tokenizer files). Supported model types: "
                    "qwen3, qwen3_vl, siglip / siglip_vision_model, sam / sam_vision_model (image encoder only).")
    parser.add_argument("--hf_dir", required=True, help="local HF model directory (no hub downloads)")
    parser.add_argument("--out", required=True, help="output directory (created; must not hold params, weights or "
                                                     "another model's config.json yet)")
    parser.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"],
                        help="storage dtype of the converted parameters (default float32)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.hf_dir):
        cli.usage(f"--hf_dir={args.hf_dir}: no such directory")
    cli.require_directories(out=args.out)
    start = time.time()
    try:
        summary = convert(args.hf_dir, args.out, args.param_dtype)
    except (ConversionError, SafetensorsError, hf_config.ConfigError, model_dir.ModelDirError, OSError) as e:
        cli.fail(e)
    print(f"converted {summary['family']} ({summary['parameters']:,} parameters) from {args.hf_dir} "
          f"to {args.out} in {time.time() - start:.1f}s; copied {', '.join(summary['copied_files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
