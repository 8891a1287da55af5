"""BatchAhead: batches prepared one step ahead keep the loader position and the errors of the batch they belong to,
and an error on one process stops every process at the same batch."""

import pytest

from vital_jax.batch_ahead import BatchAhead, BatchError


class Loader:
    """A loader of numbered batches whose position (`get_state`) is the number of batches read."""

    def __init__(self, n):
        self.read, self.n = 0, n

    def __iter__(self):
        return self

    def __next__(self):
        if self.read == self.n:
            raise StopIteration
        self.read += 1
        return self.read - 1

    def get_state(self):
        return {"read": self.read}


def _check(raw):
    if raw == 2:
        raise ValueError(f"batch {raw}: malformed record")
    return f"host {raw}"


def test_batches_come_in_order_with_the_position_after_each_whether_or_not_read_ahead():
    loader = Loader(4)
    batches = BatchAhead(loader, loader.get_state, place=lambda host: host * 10)
    first = batches.take()  # nothing read ahead: prepared on the spot
    assert (first.host, first.device, first.data_state) == (0, 0, {"read": 1})
    batches.prepare_next()
    batches.prepare_next()  # a second call before `take` reads nothing more
    assert loader.read == 2
    assert first.data_state == {"read": 1}  # the checkpoint after batch 0's step resumes at batch 1
    second = batches.take()
    assert (second.host, second.device, second.data_state) == (1, 10, {"read": 2})
    assert [batches.take().host for _ in range(2)] == [2, 3]
    batches.prepare_next()  # the loader is exhausted: kept for `take`
    with pytest.raises(StopIteration):
        batches.take()


def test_an_error_while_reading_ahead_is_raised_by_the_take_of_its_batch():
    loader = Loader(4)
    placed = []
    batches = BatchAhead(loader, loader.get_state, check=_check, place=lambda host: placed.append(host) or host)
    assert batches.take().host == "host 0"
    batches.prepare_next()
    assert batches.take().device == "host 1"
    batches.prepare_next()  # batch 2 fails here, but the step of batch 1 is checked and saved before it surfaces
    with pytest.raises(ValueError, match="batch 2: malformed record"):
        batches.take()
    assert placed == ["host 0", "host 1"]  # a batch that failed its check is not placed
    assert batches.take().host == "host 3"  # the error is raised once


def test_a_batch_that_fails_on_one_process_stops_every_process_before_placing_it():
    """Placing is collective (the processes agree on the batch's shapes): a process that skipped it while the
    others did not would pair its next collective with theirs. Two processes, simulated: each asks `any_process`
    once per batch, between checking and placing, and the answer is the other's failure or its own."""
    outcome = {}  # process -> whether its check of batch 2 failed

    def processes(me):
        def any_process(failed):
            outcome[me] = failed
            return any(outcome.values())
        return any_process

    good, bad = Loader(4), Loader(4)
    on_good = BatchAhead(good, good.get_state, check=lambda raw: f"host {raw}", place=lambda host: host,
                         any_process=processes("good"))
    on_bad = BatchAhead(bad, bad.get_state, check=_check, place=lambda host: host, any_process=processes("bad"))
    for _ in range(2):
        assert on_bad.take().host == on_good.take().host
    on_bad.prepare_next()  # the bad process asks first (its own failure) ...
    on_good.prepare_next()  # ... and the other hears of it
    with pytest.raises(ValueError, match="batch 2: malformed record"):
        on_bad.take()
    with pytest.raises(BatchError, match="another process could not read or check its part of the next batch"):
        on_good.take()
