"""What the config + workdir commands (train, pretrain, study) share at start-up."""

from __future__ import annotations

from absl import app, flags, logging


def begin(argv, config_flag, workdir_flag) -> None:
    """No positional arguments, --config and --workdir given, and WARNING verbosity unless --verbosity was set
    (orbax logs every save at INFO; progress lines come from the MetricsLogger instead)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config_flag.value is None or workdir_flag.value is None:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
