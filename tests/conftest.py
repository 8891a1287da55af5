"""Shared pytest setup: float32 matmuls on CPU, quiet transformers, the shared-data location."""

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity tests compare float32 numerics; make sure no TF32-like reduced precision sneaks in on accelerators.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def shared_data_dir():
    """`../shared/data` (or $VITAL_SHARED_DATA). Missing data fails under CI=true instead of skipping."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.environ.get("VITAL_SHARED_DATA", os.path.join(here, "..", "..", "shared", "data"))
    if not os.path.isdir(path):
        message = f"shared test data not found at {path} (set VITAL_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
