"""What the config + workdir commands (train, pretrain, study) share at start-up, and their SIGTERM handling."""

from __future__ import annotations

import signal
import sys

from absl import app, flags, logging


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the batch's records."""


def begin(argv, config_flag, workdir_flag) -> None:
    """No positional arguments, --config and --workdir given, and WARNING verbosity unless --verbosity was set
    (orbax logs every save at INFO; progress lines come from the MetricsLogger instead)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config_flag.value is None or workdir_flag.value is None:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def parse_flags(argv):
    """absl flag parsing with a readable message for an unknown `--config.FIELD` (ml_collections raises a bare
    AttributeError/KeyError deep in its override code)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        print(f"error: unknown config field in {overrides}: {e}. See configs/base.py for every field.",
              file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class Preemption:
    """SIGTERM sets a flag; the training loop saves a checkpoint at the next step and exits cleanly."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True
