"""Shared pytest setup: float32 matmuls on CPU, quiet transformers, the shared-data location, a compilation cache."""

import atexit
import gc
import os
import shutil
import tempfile

import pytest

from tests import fast_compile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Most of the suite's time is XLA compiling small programs, and many are compiled more than once: each
# `python -m vital_jax.train` subprocess (kill -9 and resume, SIGTERM) recompiles what the runs before it compiled,
# and tests re-jit the same functions. A persistent compilation cache shared by this session and its subprocesses
# (they inherit the environment) lets a later compilation load the executable instead. It is a fresh directory per
# session unless JAX_COMPILATION_CACHE_DIR is set; the cache key covers the program, compile options, XLA flags and
# jax version, so a hit is the executable the compiler would have produced. Every program is cached: each compiles
# in well under JAX's default 1 s threshold, but together they dominate the run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="vital_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Faster compiles for the suite's tiny programs (tests/fast_compile.py: XLA CPU optimisation level 0 and the older
# fusion emitter). Existing flags are kept; subprocesses inherit them.
os.environ["XLA_FLAGS"] = fast_compile.added_to(os.environ.get("XLA_FLAGS", ""))

# Parity tests compare float32 numerics; make sure no TF32-like reduced precision sneaks in on accelerators. Set
# before jax is imported and through the environment, so that subprocesses (`python -m vital_jax.train`, the CLIs)
# compile the same programs as this process and share its cache entries.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"


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
    """The demo config shrunk for tests: a few phantoms, the "quick" pretraining, batch 4, one epoch per phase,
    synchronous checkpoints every 4 steps, and a nominal peak FLOP/s so that MFU is logged on the CPU."""
    from configs import demo as demo_config

    c = demo_config.get_config()
    c.demo.split_counts = (6, 2, 3)
    c.demo.pretrain = "quick"
    c.data.batch_size = 4
    c.curriculum.epochs = (1, 1, 1)
    c.checkpoint.save_every_steps = 4
    c.checkpoint.async_save = False
    c.logging.peak_tflops_per_device = 0.01  # a nominal CPU peak, so perf/mfu is logged and checked
    return c


# The same settings as command-line overrides, for tests that run `python -m vital_jax.train` in a subprocess.
DEMO_TEST_OVERRIDES = ["--config.demo.split_counts=(6, 2, 3)", "--config.demo.pretrain=quick",
                       "--config.data.batch_size=4", "--config.curriculum.epochs=(1, 1, 1)",
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


def record_batch_preparation(module, events: list, monkeypatch) -> None:
    """Make `module`'s training loop append "prepare" to `events` each time it prepares a batch (`BatchAhead`) and
    "log N" each time it logs step N's metrics (`MetricsLogger.log`, after the step's results are read), so a test
    can place the preparation of batch N+1 against the read of step N."""
    from vital_jax.batch_ahead import BatchAhead
    from vital_jax.observability import MetricsLogger

    log = MetricsLogger.log

    def recorded_log(self, step, *args, **kwargs):
        events.append(f"log {step}")
        return log(self, step, *args, **kwargs)

    monkeypatch.setattr(MetricsLogger, "log", recorded_log)

    class Recording(BatchAhead):
        def __init__(self, iterator, data_state, place, **kwargs):
            def recorded(host):
                events.append("prepare")
                return place(host)

            super().__init__(iterator, data_state, recorded, **kwargs)

    monkeypatch.setattr(module, "BatchAhead", Recording)


def pytest_collection_finish(session):
    """Python's cyclic garbage collector took ~10 % of a worker's time (tests/medsynapse/test_imt.py: 6.2 s of 56 s,
    test_grpo.py 6.5 of 71 s, each with ~2 s of pytest's own collections at exit), mostly full collections that walk
    every live object: the modules collection imported (jax, flax, transformers, torch) and jax's caches of traced
    programs. Freezing what exists once the test modules are imported takes the former out of every later walk, and
    rarer collections (the youngest generation every 10,000 allocations instead of 700, a full one every 100 of the
    middle generation's instead of 10) make the walks fewer: test_imt.py's 1.7 s instead of 6.2, the same peak
    memory (benchmarks/README.md, "Start-up and the garbage collector")."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 100)
