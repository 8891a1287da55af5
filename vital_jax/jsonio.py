"""Reading a JSON file with an error that names it (shared by model configs, processors and data ingestion)."""

from __future__ import annotations

import json
import os


def read_json(path: str, error: type[Exception], missing_hint: str = "") -> object:
    """Parse `path`; a missing file or malformed JSON raises `error` with the path (and `missing_hint`)."""
    if not os.path.isfile(path):
        raise error(f"{path}: not found" + (f"; {missing_hint}" if missing_hint else ""))
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON: {e}") from e
