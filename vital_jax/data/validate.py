"""Check a dataset directory against the record contract (vital_jax.data.records).

    python -m vital_jax.data.validate --data_dir=DIR [--nocheck_files]

Prints every problem, one line each naming the record id, and exits 1 if there is any; else prints a summary.
"""

from __future__ import annotations

import collections
import os
import sys

from absl import app, flags

from vital_jax.data import records

_DATA_DIR = flags.DEFINE_string("data_dir", None, "dataset directory holding records.jsonl", required=True)
_CHECK_FILES = flags.DEFINE_bool("check_files", True, "also check that image/mask files exist and match in size")


def main(argv) -> int:
    del argv
    problems = records.validate_dataset(_DATA_DIR.value, check_files=_CHECK_FILES.value)
    if problems:
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s) in {_DATA_DIR.value}", file=sys.stderr)
        return 1
    rows = records.read_records(os.path.join(_DATA_DIR.value, records.RECORDS_FILE))
    splits = collections.Counter(r.split for r in rows)
    with_roi = sum(r.roi_index >= 0 for r in rows)
    print(f"{_DATA_DIR.value}: {len(rows)} valid records ({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}); "
          f"{with_roi} with ROI features")
    return 0


if __name__ == "__main__":
    from vital_jax import cli

    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
