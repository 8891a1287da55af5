"""Export the deployable parts of MedSynapse-V (backbone + A_psi; no E_ana, no P_phi) for serving with transformers.

Layout of the output directory:
  config.json, model.safetensors, tokenizer / processor files   the backbone (Stage II's LoRA merged) as a HF
                                                                Qwen3-VL directory, loadable by from_pretrained
  autonomous.safetensors     A_psi in float32, Flax layout (kernels are (in, out)):
                               autonomous.queries (N, D), autonomous.norm.{scale,bias} (D,),
                               autonomous.fc1.{kernel (D, H), bias (H,)}, autonomous.fc2.{kernel (H, D), bias (D,)},
                               autonomous.slot_bias (N, D) (added to slot n's MLP output; new in version 2)
  medsynapse.json            {"format": "medsynapse-v-autonomous", "version": 3, "num_memory": N,
                              "hidden_size": D, "mlp_hidden": H, "layer_norm_eps", "activation": "gelu_erf",
                              "pooling": "learned_query_attention", "image_token_id", "lora_merged",
                              "memory_position", "prompt_tail"}
                             (version 3 added the last two; a version-2 export is read with prompt_tail 0)
What A_psi computes from those weights, and where its N vectors go (a block of input embeddings after the prompt's
first T - prompt_tail tokens, followed by the prompt's last prompt_tail tokens (the run's memory_position: 0 for
"assistant_turn", the assistant header's length for "user_turn"), positions continuing at t + rope_delta on all
three MRoPE axes, then the answer), is `vital_jax/medsynapse/{autonomous,memory}.py` and
`conversion/torch_medsynapse_generate.py` (the PyTorch reference, which reads this directory).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable

import jax
import numpy as np

from vital_jax.jsonio import atomic_write, read_json
from vital_jax.layers.linear import LoraConfig, merge_lora
from vital_jax.medsynapse.autonomous import AutonomousConfig
from vital_jax.models import hf_config, hf_mapping, model_dir, safetensors_io
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig

FORMAT = "medsynapse-v-autonomous"
VERSION = 3
READABLE_VERSIONS = (2, 3)
META_FILE = "medsynapse.json"
AUTONOMOUS_FILE = "autonomous.safetensors"
PREFIX = "autonomous."


def export_deployable(out_dir: str, backbone_dir: str, backbone_config: Qwen3VLConfig, params: dict,
                      autonomous_config: AutonomousConfig, lora: LoraConfig | None = None,
                      dtype: str = "float32", max_shard_bytes: int = safetensors_io.DEFAULT_SHARD_BYTES,
                      memory_position: str = "assistant_turn", prompt_tail: int = 0) -> dict:
    """Write the serving directory from params {"backbone", "autonomous", ...} (anything else, e.g. P_phi, is not
    written). memory_position / prompt_tail: where the run put its memory (`memory.inject`). backbone_dir: the
    backbone's HF directory, whose config.json and tokenizer / processor files are copied. lora: the adapters' config
    when params["backbone"] holds LoRA leaves (they are merged). dtype: of the
    backbone's tensors (A_psi is always float32), sharded above `max_shard_bytes`. Returns {"model": out_dir,
    "files": [...], "meta": what medsynapse.json records}."""
    import ml_dtypes

    safetensors_io.check_export_dir(out_dir, backbone_dir)
    # A_psi is checked before anything is written: a run that never reached Stage III has none, and a folder left
    # with only the backbone would load as a plain VLM (and refuse the next export).
    if "autonomous" not in params:
        raise ValueError("no A_psi parameters (params['autonomous']): the run has not finished Stage III (imt); "
                         "train it first")
    tensors = {PREFIX + path.replace("/", "."): np.asarray(leaf, np.float32)
               for path, leaf in hf_mapping.flatten(params["autonomous"]).items()}
    _check_autonomous(tensors, autonomous_config)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    # Merged straight into the export's dtype (a bf16 merge written in float32 loses small updates to rounding).
    backbone = merge_lora(params["backbone"], lora, np_dtype) if lora is not None else params["backbone"]
    backbone = qwen3_vl_params.to_layout(jax.tree.map(np.asarray, backbone), scan_layers=False)
    with safetensors_io.writing_export(out_dir):
        model_dir.copy_side_files(backbone_dir, out_dir)
        hf_config.write_dtype(out_dir, np_dtype.name)
        files = safetensors_io.write_safetensors(
            out_dir, hf_mapping.to_hf_specs(backbone, qwen3_vl_params.rules(backbone_config), np_dtype),
            max_shard_bytes)
        tmp = os.path.join(out_dir, ".autonomous")
        safetensors_io.write_safetensors(tmp, [safetensors_io.TensorSpec(n, a.shape, a.dtype, lambda a=a: a)
                                               for n, a in sorted(tensors.items())])
        os.replace(os.path.join(tmp, safetensors_io.SINGLE_FILE), os.path.join(out_dir, AUTONOMOUS_FILE))
        os.rmdir(tmp)
        meta = {"format": FORMAT, "version": VERSION, "num_memory": autonomous_config.num_queries,
                "hidden_size": autonomous_config.hidden_size, "mlp_hidden": autonomous_config.mlp_width,
                "layer_norm_eps": autonomous_config.layer_norm_eps, "activation": "gelu_erf",
                "pooling": "learned_query_attention", "image_token_id": backbone_config.image_token_id,
                "lora_merged": lora is not None, "memory_position": memory_position,
                "prompt_tail": int(prompt_tail)}
        atomic_write(os.path.join(out_dir, META_FILE), lambda f: json.dump(meta, f, indent=2))
    return {"model": out_dir, "files": files + [AUTONOMOUS_FILE, META_FILE], "meta": meta}


def describe_export(workdir: str, result: dict) -> str:
    """The line the export command prints: what went into `result` (`export_deployable`'s), from where."""
    meta = result["meta"]
    backbone = "LoRA merged" if meta["lora_merged"] else "no LoRA (Stage II did not run)"
    return (f"exported the MedSynapse-V run {workdir} ({backbone}, A_psi, memory at {meta['memory_position']}) to "
            f"{result['model']}: {', '.join(result['files'])}")


def is_medsynapse_workdir(path: str) -> bool:
    """Whether `path` is a MedSynapse-V training workdir (its recorded config has method "medsynapse")."""
    cfg = os.path.join(path, "config.json")
    return os.path.isfile(cfg) and read_json(cfg, ExportError).get("method") == "medsynapse"


def export_run(workdir: str, out_dir: str, dtype: str = "float32",
               max_shard_bytes: int = safetensors_io.DEFAULT_SHARD_BYTES) -> dict:
    """`export_deployable` of the MedSynapse-V run in `workdir` (`trainer.load_trained`: Stage II's LoRA merged,
    Stage III's A_psi; a run without Stage III is refused before anything is written)."""
    from vital_jax.medsynapse import trainer
    from vital_jax.models.qwen3_vl import prompt

    run = trainer.load_trained(workdir)
    tail = trainer.memory_prompt_tail(run.config, prompt.load_tokenizer(run.paths.tokenizer_dir))
    return export_deployable(out_dir, run.paths.backbone_dir, run.backbone.config, run.params,
                             run.autonomous.config if run.autonomous is not None else None, run.backbone.lora,
                             dtype, max_shard_bytes, trainer.memory_position(run.config), tail)


def _check_autonomous(tensors: dict, cfg: AutonomousConfig) -> None:
    n, d, h = cfg.num_queries, cfg.hidden_size, cfg.mlp_width
    want = {"queries": (n, d), "norm.scale": (d,), "norm.bias": (d,), "fc1.kernel": (d, h), "fc1.bias": (h,),
            "fc2.kernel": (h, d), "fc2.bias": (d,), "slot_bias": (n, d)}
    got = {k[len(PREFIX):]: tuple(v.shape) for k, v in tensors.items()}
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in got]
    problems += [f"unexpected {k} {s}" for k, s in got.items() if k not in want]
    problems += [f"{k}: {got[k]}, expected {s}" for k, s in want.items() if k in got and got[k] != s]
    if problems:
        raise ValueError(f"A_psi parameters do not match its config (num_memory={n}, hidden_size={d}, "
                         f"mlp_hidden={h}): " + "; ".join(problems))


class ExportError(ValueError):
    """An export's medsynapse.json or autonomous.safetensors is malformed or does not match the other; the message
    names the file."""


def load_autonomous(export_dir: str) -> tuple[AutonomousConfig, dict]:
    """(config, Flax params) of the exported A_psi, for serving the export from JAX (where its memory goes:
    `read_prompt_tail`, checked here too, so that a damaged export fails on loading as with the PyTorch loader)."""
    from safetensors.numpy import load_file

    cfg = read_autonomous_config(export_dir)
    read_prompt_tail(export_dir)
    tensors = read_autonomous_tensors(export_dir, cfg, load_file)
    return cfg, hf_mapping.unflatten({k[len(PREFIX):].replace(".", "/"): v for k, v in tensors.items()})


def _read_meta(export_dir: str) -> tuple[str, dict]:
    path = os.path.join(export_dir, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, f"no {META_FILE}: not a MedSynapse-V export", path)
    meta = read_json(path, ExportError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{path}: not a {FORMAT} export of version {READABLE_VERSIONS} (format, version: "
                          f"{found})")
    return path, meta


def read_prompt_tail(export_dir: str) -> int:
    """How many of the prompt's last tokens follow the memory (`memory.inject`'s prompt_tail) in this export:
    0 for a version-2 export (the memory after the whole prompt)."""
    path, meta = _read_meta(export_dir)
    if meta["version"] == 2:
        return 0
    tail = meta.get("prompt_tail")
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < 0:
        raise ExportError(f"{path}: prompt_tail is {tail!r}, not an integer >= 0; export the run again")
    return tail


def read_autonomous_config(export_dir: str) -> AutonomousConfig:
    """A_psi's config from the export's medsynapse.json (this loader's and the PyTorch reference's). A missing file
    is a FileNotFoundError; a malformed one, another format or a missing or mistyped size an ExportError."""
    path, meta = _read_meta(export_dir)
    for key in ("num_memory", "hidden_size", "mlp_hidden", "layer_norm_eps"):
        if key not in meta:
            raise ExportError(f"{path}: no {key!r}; the export is incomplete, export the run again")
        value, integer = meta[key], key != "layer_norm_eps"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value <= 0:
            raise ExportError(f"{path}: {key} is {value!r}, not a positive {'integer' if integer else 'number'}")
    return AutonomousConfig(hidden_size=meta["hidden_size"], num_queries=meta["num_memory"],
                            mlp_hidden=meta["mlp_hidden"], layer_norm_eps=meta["layer_norm_eps"])


def read_autonomous_tensors(export_dir: str, cfg: AutonomousConfig, load_file: Callable[[str], dict]) -> dict:
    """The export's autonomous.safetensors read by `load_file` (safetensors.numpy's or safetensors.torch's), its
    tensor names and shapes checked against `cfg` (from medsynapse.json). A missing file is a FileNotFoundError; an
    unreadable or mismatched one an ExportError naming it."""
    from safetensors import SafetensorError

    path = os.path.join(export_dir, AUTONOMOUS_FILE)
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise ExportError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        _check_autonomous(tensors, cfg)
    except ValueError as e:
        raise ExportError(f"{path}: does not match {META_FILE}: {e}") from e
    return tensors


if __name__ == "__main__":
    # A library module: running it did nothing and exited 0. The command that exports a run is flax_to_hf.
    raise SystemExit("error: conversion.medsynapse_export is a library module; export a training workdir with "
                     "python -m conversion.flax_to_hf --checkpoint=WORKDIR --out=DIR")
