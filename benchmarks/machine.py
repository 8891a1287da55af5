"""What machine a benchmark ran on, for its header line: CPU ratios move with the CPU model (on the project's
2-core machines the peer train step measured 1.14x on one kind and 1.75x on an AVX-512 AMD EPYC); how the
benchmarks set the process up (`apply_host_setting`) and their `--quick` variants' sizes (`quick_sizes`)."""

from __future__ import annotations

import os
import platform


def cpu_description() -> str:
    """e.g. 'AMD EPYC (family 26, model 2), 2 CPUs, AVX-512' from /proc/cpuinfo (Linux), else platform's words."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    name = fields.get("model name", platform.machine())
    model = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}{model}, {os.cpu_count()} CPUs, {vector}"


def apply_host_setting() -> str:
    """Set up host memory as vital_jax's commands do (`vital_jax.host_memory`: freed memory kept and synchronous
    CPU dispatch, unless VITAL_JAX_HOST_MALLOC=off) -> words for the header line. Call before the first JAX
    computation. It is process-wide: a PyTorch side timed in the same process gets the glibc part too."""
    from vital_jax import host_memory

    if host_memory.apply_environment() is None:
        return "host memory: glibc and JAX defaults (VITAL_JAX_HOST_MALLOC=off)"
    return "host memory: kept, synchronous CPU dispatch (vital_jax's default)"


def quick_sizes(args, sizes: dict):
    """`args` (an argparse Namespace with a `quick` flag) with `sizes` over its values when --quick was given: the
    tiny variant the CI smoke test runs (tests/test_benchmark_smoke.py)."""
    if args.quick:
        vars(args).update(sizes)
    return args
