"""What the commands share: flag parsing whose errors are one line, quiet third-party logging, progress lines,
one-line failures, and (for train and pretrain) SIGTERM handling.

Output convention: progress goes to stderr as plain lines (`status`, and the training progress of
`observability.ProgressReporter`), results to stdout; a failure the user can fix (a flag, a file, a value) is one
line `error: ...` on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import NoReturn

from absl import flags, logging
from ml_collections import config_flags

HELP_HINT = "(--help lists the flags)"
HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")  # absl's; each exits after its output


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the batch's records."""


def non_finite_loss(what: str, directory: str, newest: int | None) -> NonFiniteLossError:
    """The error a training loop raises on a non-finite loss: `what` (the loss, step and records) and what a rerun
    will do. The loss of step k is computed from the parameters after update k - 1, so the newest checkpoint holds
    the parameters that gave it: they may already have diverged, and then a rerun stops at the same step."""
    if newest is None:
        then = f"No checkpoint of this phase was saved yet in {directory}; a rerun starts it again."
    else:
        then = (f"A rerun resumes from {directory}/{newest}, the parameters this loss was computed from: if they "
                f"have diverged (a learning rate too high: see the loss curve), it stops here again; a run with "
                f"another config needs a new --workdir.")
    return NonFiniteLossError(f"{what}. {then}")


def fail(message, code: int = 1) -> NoReturn:
    """Exit with one line `error: <message>` on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def usage(message: str) -> NoReturn:
    """A wrong or missing argument: one line and exit status 2, as for an unknown flag."""
    fail(f"{message} {HELP_HINT}", 2)


def status(message: str) -> None:
    """A progress line on stderr ("compiling the train step..."), from the primary process only."""
    import jax

    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """WARNING verbosity for absl logging unless --verbosity was given: orbax (and grain) log every checkpoint
    save and restore at INFO. Our own progress lines are printed (`status`), so they still show."""
    if "verbosity" not in flags.FLAGS or not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def tune_host_memory() -> None:
    """Keep freed host memory for reuse and dispatch CPU computations synchronously unless
    `VITAL_JAX_HOST_MALLOC=off` (`host_memory`: XLA:CPU programs then stop faulting in their buffers on every call);
    every command that runs jitted programs (train, pretrain, study, evaluate, explain, and the data
    commands that run the ROI encoder) calls it first, before JAX's backend starts. Silent: it is the
    documented default, and a command's stderr is kept for its one-line errors."""
    from vital_jax import host_memory

    try:
        host_memory.apply_environment()
    except ValueError as e:
        fail(e, 2)


def no_positional(argv) -> None:
    if len(argv) > 1:
        usage(f"unexpected arguments: {' '.join(argv[1:])}")


def require(**values) -> None:
    """Each keyword names a flag that must have been given (its value is not None)."""
    missing = [f"--{name}" for name, value in values.items() if value is None]
    if missing:
        usage(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def require_directories(**paths) -> None:
    """Each keyword names a flag whose value is a directory the command writes into (created if missing): a path
    that exists as something else, or a URL (`jsonio.url_problem`), is a usage error now, before any work, not an
    OSError (or a directory named "gs:") once results are ready."""
    from vital_jax.jsonio import url_problem

    for name, path in paths.items():
        if path is not None and url_problem(path):
            usage(f"--{name}={url_problem(path)}")
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            usage(f"--{name}={path} exists and is not a directory")


def begin(argv, config_flag, workdir_flag) -> None:
    """No positional arguments, --config and --workdir given, third-party logging quiet (`quiet_libraries`;
    progress lines come from the MetricsLogger and `status` instead), host memory kept (`tune_host_memory`)."""
    no_positional(argv)
    require(config=config_flag.value, workdir=workdir_flag.value)
    require_directories(workdir=workdir_flag.value)
    try:  # ml_collections reports a config file that failed to load only when the config is first used
        config_flag.value.keys()
    except OSError as e:
        path = config_flags.get_config_filename(flags.FLAGS[config_flag.name]).split(":", 1)[0]  # no ":variant"
        why = "no such file" if not os.path.exists(path) else " ".join(str(e).split())
        fail(f"--config={path}: {why}", 2)
    quiet_libraries()
    tune_host_memory()


def config_import_root(argv) -> str | None:
    """The directory that holds the `configs` package of the `--config` file in `argv` (the repository root), for
    a config file given by a path from another working directory: the config files import their siblings as
    `configs.X` (`from configs import base`), a package that is not installed with vital_jax. None when the file
    does not lie in a `configs` package."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        else:
            continue
        directory = os.path.dirname(os.path.abspath(path.split(":", 1)[0]))  # no ":variant"
        while os.path.dirname(directory) != directory:
            if os.path.basename(directory) == "configs" and os.path.isfile(os.path.join(directory, "__init__.py")):
                return os.path.dirname(directory)
            directory = os.path.dirname(directory)
    return None


def parse_flags(argv):
    """absl flag parsing with a readable message for an unknown `--config.FIELD` (ml_collections raises a bare
    AttributeError/KeyError deep in its override code). A `--config` file of a repository's `configs` package
    imports its siblings from any working directory (`config_import_root`)."""
    root = config_import_root(argv)
    if root is not None and root not in sys.path:
        sys.path.insert(0, root)
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:
        # absl prints the help that --help (--helpfull, ...) asked for, then exits 1 as if it were an error.
        if e.code == 1 and any(arg in HELP_FLAGS for arg in argv[1:]):
            sys.exit(0)
        raise
    except (AttributeError, KeyError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        # A KeyError's str() is the repr of its message (quotes escaped, "\n" literal), and ml_collections wraps
        # that KeyError in an AttributeError: use the message itself.
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        detail = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
        detail = " ".join(detail.split())
        detail += "" if detail.endswith((".", "?")) else "."
        fail(f"unknown config field in {overrides}: {detail} See configs/base.py for every field.", 2)
    except flags.Error as e:
        usage(" ".join(str(e).split()))
    except Exception as e:  # noqa: BLE001 - a config file that fails to load (ml_collections re-raises its error)
        fail(f"{type(e).__name__}: {' '.join(str(e).split())}", 2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the commands' one-line errors (argparse prints its usage block and the error)."""

    def error(self, message: str) -> NoReturn:
        usage(message)


class Preemption:
    """SIGTERM sets a flag; the training loop saves a checkpoint at the next step and exits cleanly."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True
