"""The next training batch, prepared while the devices run the current step.

A jitted step returns once it is dispatched; the loop's first read of a result (the loss, checked for NaN at every
step) waits for the devices. Without a lookahead the host then reads the next records, slices and checks them and
copies them to the devices while the accelerator idles, at every step. `BatchAhead.prepare_next`, called right after
the dispatch and before that read, does the host's part of step N+1 during step N. (On a CPU backend the
commands dispatch synchronously, `host_memory`: a single-device step has then run when it returns, and the
host's part follows it; the step occupies the CPU's cores either way.)

Used by every training loop (VITAL `train`, `pretrain`, MedSynapse-V's stages), so that what a checkpoint records
and where an error surfaces stay as they were without the lookahead:
- each batch carries the loader's position taken right after it was read (`Prepared.data_state`): a checkpoint
  saved after step N resumes at batch N+1 even though N+1 has been read already;
- an error while preparing a batch ahead (a malformed record, an exhausted iterator) is raised by `take`, i.e. only
  after step N was checked and saved;
- with several processes, an error on one of them is raised by every process at the same `take`
  (`any_process`): placing a batch is collective (`distributed.global_vital_batch` agrees on its shapes), and a
  process that skipped it while the others did not would pair its next collective with theirs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


class BatchError(RuntimeError):
    """Another process could not read or check its part of the batch (its own log names the record)."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One batch ready for its step: `host` (the checked numpy batch the loop keeps for record ids and shapes),
    `device` (what the step takes) and `data_state` (the loader's position after this batch)."""

    host: Any
    device: Any
    data_state: Any


class BatchAhead:
    """Batches of `iterator`, each prepared once, one step ahead when the loop calls `prepare_next` (otherwise when
    it calls `take`): `check(raw batch) -> host batch` (host work that may fail on a bad record: slicing, token
    checks), then `place(host batch) -> device batch` (the copy to the devices; collective in a multi-process run).
    `data_state()` reads the loader's position. `any_process(flag) -> bool` (a collective; None in one process)
    tells whether reading or checking failed on any process, between the two."""

    def __init__(self, iterator: Iterator, data_state: Callable[[], Any], place: Callable[[Any], Any],
                 check: Callable[[Any], Any] = lambda raw: raw,
                 any_process: Callable[[bool], bool] | None = None):
        self._iterator = iterator
        self._data_state = data_state
        self._check = check
        self._place = place
        self._any_process = any_process
        self._pending: Prepared | Exception | None = None

    def prepare_next(self) -> None:
        """Read and prepare the next batch now (right after dispatching a step, before reading its results). A
        second call before `take` does nothing. An error is kept for `take`."""
        if self._pending is not None:
            return
        error = None
        try:
            raw = next(self._iterator)
            data_state = self._data_state()  # before `check`, which may fail: nothing is read after this batch
            host = self._check(raw)
        except Exception as e:  # noqa: BLE001 -- re-raised by `take`, where the loop would have met it
            error = e
        if self._any_process is not None and self._any_process(error is not None) and error is None:
            error = BatchError("another process could not read or check its part of the next batch (its log "
                               "names the record); stopping with it")
        if error is not None:
            self._pending = error
            return
        try:
            self._pending = Prepared(host, self._place(host), data_state)
        except Exception as e:  # noqa: BLE001 -- as above
            self._pending = e

    def take(self) -> Prepared:
        """The next batch: the one prepared ahead, or prepared now. Raises what preparing it raised."""
        self.prepare_next()
        pending, self._pending = self._pending, None
        if isinstance(pending, Exception):
            raise pending
        return pending
