"""XLA flags under which the suite's tiny programs compile fast on the CPU (the suite only, never a user's run).

Most of the suite's time is XLA compiling small programs. Two flags cut it without changing what a program
computes (the parity tests run under them):
- `xla_backend_optimization_level=0`: LLVM's optimisation passes buy nothing for tiny programs; about half the
  compile time.
- `xla_cpu_use_fusion_emitters=false`: at level 0, XLA:CPU's older elemental emitter compiles fusions faster than
  the newer MLIR fusion emitters: the tiny VITAL train step compiled in ~9 instead of ~14 CPU seconds (jaxlib
  0.10.2). At the default level it gains nothing, so the study's fixture, which runs at that level for its
  hundreds of steps, drops both (`without`).
Subprocesses (training commands, benchmarks, multi-process workers) inherit them through XLA_FLAGS."""

from __future__ import annotations

FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}


def added_to(xla_flags: str) -> str:
    """`xla_flags` with each of FLAGS that it does not set already (a flag set there is kept as it is)."""
    present = {flag.split("=")[0] for flag in xla_flags.split()}
    return " ".join([xla_flags.strip(), *(f"{name}={value}" for name, value in FLAGS.items() if name not in present)
                     ]).strip()


def without(xla_flags: str) -> str:
    """`xla_flags` with FLAGS removed (what a run at XLA's default optimisation needs)."""
    return " ".join(flag for flag in xla_flags.split() if flag.split("=")[0] not in FLAGS)
