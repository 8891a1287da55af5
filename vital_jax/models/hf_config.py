"""Reading HF `config.json` files with errors that name the file; stamping an export's with its weights' dtype."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os

import jax.numpy as jnp
from vital_jax.jsonio import atomic_write, read_json

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


class ConfigError(ValueError):
    """A config.json is missing, malformed or of another architecture."""


def read_config_json(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    cfg = read_json(path, ConfigError, "expected a HuggingFace model directory")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def write_dtype(model_dir: str, dtype: str) -> None:
    """Rewrite `model_dir/config.json` to say its weights were written in `dtype` ("float32", "bfloat16",
    "float16"), as transformers 5's save_pretrained records it: `dtype` at the top level (what
    `from_pretrained(dtype="auto")` loads the model as) and in each sub-config that names one; the older
    `torch_dtype` key is dropped (transformers reads it only where `dtype` is missing or null). An export's config
    is its source's, whose dtype (missing, null, or that of other weights) says nothing about the exported ones."""
    def stamped(cfg: dict) -> dict:
        return {**{k: v for k, v in cfg.items() if k != "torch_dtype"}, "dtype": dtype}

    cfg = stamped(read_config_json(model_dir))
    cfg.update({k: stamped(v) for k, v in cfg.items()
                if isinstance(v, dict) and ("dtype" in v or "torch_dtype" in v)})
    atomic_write(os.path.join(model_dir, "config.json"), lambda f: json.dump(cfg, f, indent=2))


def reads_hf_fields(from_hf_dict):
    """For a config class's `from_hf_dict(cls, cfg, source, ...)` (under @classmethod): a field it needs that is
    missing, a sub-config that is not an object, an integer / float field of another type or a value the model
    does not support is a ConfigError naming `source`, not a KeyError from the middle of the reader or a TypeError
    deep in the model."""
    signature = inspect.signature(from_hf_dict)

    @functools.wraps(from_hf_dict)
    def read(cls, cfg, *args, **kwargs):
        bound = signature.bind(cls, cfg, *args, **kwargs)
        bound.apply_defaults()
        source = bound.arguments["source"]
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        try:
            config = from_hf_dict(cls, cfg, *args, **kwargs)
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None
        except (AttributeError, TypeError) as e:
            raise ConfigError(f"{source}: cannot read the config ({e})") from None
        except ConfigError as e:  # a value the model does not support (rope_type, a section sum, ...)
            if str(e).startswith(source):
                raise
            raise ConfigError(f"{source}: {e}") from None
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (field.type == "int" and not (number and isinstance(value, int))) or (
                    field.type == "float" and not number):
                kind = "an integer" if field.type == "int" else "a number"
                raise ConfigError(f"{source}: {field.name}={value!r} is not {kind}")
        return config

    return read


def check_model_type(cfg: dict, expected: tuple[str, ...], source: str) -> None:
    model_type = cfg.get("model_type")
    if model_type not in expected:
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected one of {list(expected)} "
                          f"(architectures: {cfg.get('architectures')})")


def rope_theta(cfg: dict, default: float) -> float:
    """rope_theta from transformers 5 (`rope_parameters`) or 4 (`rope_theta`) style configs."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"unsupported rope_type {params.get('rope_type')!r}; only 'default' is implemented")
    return float(params.get("rope_theta", cfg.get("rope_theta", default)))


def as_dtype(name):
    """'float32' / 'bfloat16' / a jnp dtype -> jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return name


# HF activation name -> whether it is the tanh approximation of GELU (False: exact erf GELU); the vision encoders
# (SAM, SigLIP, Qwen3-VL's tower) implement these three.
GELU_APPROXIMATE = {"gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True}


def square_size(value, key: str, source: str) -> int:
    """An image_size / patch_size given as an int or as a square [n, n] pair -> n; ConfigError otherwise."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{source}: non-square {key}={value} is not supported")
        value = value[0]
    return int(value)


def check_vit_shapes(hidden_size: int, num_attention_heads: int, image_size: int, patch_size: int,
                     hidden_act: str) -> None:
    """ConfigError unless the heads divide the width, the patches tile the image and the activation is a GELU."""
    if hidden_size % num_attention_heads:
        raise ConfigError(f"hidden_size={hidden_size} is not a multiple of num_attention_heads={num_attention_heads}")
    if image_size % patch_size:
        raise ConfigError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    if hidden_act not in GELU_APPROXIMATE:
        raise ConfigError(f"hidden_act={hidden_act!r} is not supported; use one of {sorted(GELU_APPROXIMATE)}")


def image_mean_std(cfg: dict, default_mean: tuple[float, ...], default_std: tuple[float, ...],
                   source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A preprocessor config's (image_mean, image_std): three numbers each (or one for every channel)."""
    mean, std = cfg.get("image_mean", default_mean), cfg.get("image_std", default_std)
    mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
    std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"{source}: image_mean/image_std must have 3 entries, got {mean} / {std}")
    return mean, std


def with_overrides(cls, fields: dict, overrides: dict, source: str):
    """`cls(**fields)` with `overrides` applied on top (dtype names converted: "bfloat16" -> jnp.bfloat16); an
    unknown override or a ConfigError of the class is reported against `source`."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{source}: unknown override(s) {sorted(unknown)}")
    fields = dict(fields, **{k: (as_dtype(v) if k in ("dtype", "param_dtype") else v) for k, v in overrides.items()})
    try:
        return cls(**fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
