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


def demo_test_config():
    """The demo config shrunk for tests: 5 phantoms, one epoch per phase, synchronous checkpoints every 4 steps,
    and a nominal peak FLOP/s so that MFU is logged on the CPU."""
    from configs import demo as demo_config

    c = demo_config.get_config()
    c.demo.num_phantoms = 5
    c.curriculum.epochs = (1, 1, 1)
    c.checkpoint.save_every_steps = 4
    c.checkpoint.async_save = False
    c.logging.peak_tflops_per_device = 0.01  # a nominal CPU peak, so perf/mfu is logged and checked
    return c


# The same settings as command-line overrides, for tests that run `python -m vital_jax.train` in a subprocess.
DEMO_TEST_OVERRIDES = ["--config.demo.num_phantoms=5", "--config.curriculum.epochs=(1, 1, 1)",
                       "--config.checkpoint.save_every_steps=4", "--config.checkpoint.async_save=False"]


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's phantom dataset and tiny models, built once per test session (copy before writing into it)."""
    from vital_jax import demo

    root = tmp_path_factory.mktemp("demo_assets")
    demo.prepare(str(root), demo_test_config().demo)
    return str(root / "demo")


@pytest.fixture(scope="session")
def trained_demo_run(tmp_path_factory, demo_assets):
    """A workdir trained through the whole (shrunk) demo curriculum, shared read-only by several tests."""
    import shutil

    from vital_jax import train

    workdir = tmp_path_factory.mktemp("trained_demo_run")
    shutil.copytree(demo_assets, workdir / "demo")
    summary = train.train(demo_test_config(), str(workdir))
    assert not summary["preempted"]
    return str(workdir)
