"""Reading HF `config.json` files with errors that name the file."""

from __future__ import annotations

import os

import jax.numpy as jnp
from vital_jax.jsonio import read_json

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


class ConfigError(ValueError):
    """A config.json is missing, malformed or of another architecture."""


def read_config_json(model_dir: str) -> dict:
    return read_json(os.path.join(model_dir, "config.json"), ConfigError, "expected a HuggingFace model directory")


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
