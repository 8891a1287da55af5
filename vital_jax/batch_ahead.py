"""The next training batch, prepared while the devices run the current step.

A jitted step returns once it is dispatched; the loop's first read of a result (the loss, checked for NaN at every
step) waits for the devices. Without a lookahead the host then reads the next records, slices and checks them and
copies them to the devices while the accelerator idles, at every step. `BatchAhead.prepare_next`, called right after
the dispatch and before that read, does the host's part of step N+1 during step N.

Used by every training loop (VITAL `train`, `pretrain`, MedSynapse-V's stages), so that what a checkpoint records
and where an error surfaces stay as they were without the lookahead:
- each batch carries the loader's position taken right after it was read (`Prepared.data_state`): a checkpoint
  saved after step N resumes at batch N+1 even though N+1 has been read already;
- an error while preparing a batch ahead (a malformed record, an exhausted iterator) is raised by `take`, i.e. only
  after step N was checked and saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One batch ready for its step: `host` (the numpy batch the loop keeps for record ids and shapes), `device`
    (what the step takes) and `data_state` (the loader's position after this batch)."""

    host: Any
    device: Any
    data_state: Any


class BatchAhead:
    """Batches of `iterator`, each prepared by `prepare(raw batch) -> (host, device)` once, one step ahead when
    the loop calls `prepare_next` (otherwise when it calls `take`). `data_state()` reads the loader's position."""

    def __init__(self, iterator: Iterator, prepare: Callable[[Any], tuple[Any, Any]],
                 data_state: Callable[[], Any]):
        self._iterator = iterator
        self._prepare = prepare
        self._data_state = data_state
        self._pending: Prepared | Exception | None = None

    def prepare_next(self) -> None:
        """Read and prepare the next batch now (right after dispatching a step, before reading its results). A
        second call before `take` does nothing. An error is kept for `take`."""
        if self._pending is not None:
            return
        try:
            raw = next(self._iterator)
            data_state = self._data_state()  # before `prepare`, which may fail: nothing is read after this batch
            host, device = self._prepare(raw)
        except Exception as e:  # noqa: BLE001 -- re-raised by `take`, where the loop would have met it
            self._pending = e
        else:
            self._pending = Prepared(host, device, data_state)

    def take(self) -> Prepared:
        """The next batch: the one prepared ahead, or prepared now. Raises what preparing it raised."""
        self.prepare_next()
        pending, self._pending = self._pending, None
        if isinstance(pending, Exception):
            raise pending
        return pending
