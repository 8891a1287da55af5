"""BatchAhead: batches prepared one step ahead keep the loader position and the errors of the batch they belong to."""

import pytest

from vital_jax.batch_ahead import BatchAhead


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


def _prepare(raw):
    if raw == 2:
        raise ValueError(f"batch {raw}: malformed record")
    return f"host {raw}", f"device {raw}"


def test_batches_come_in_order_with_the_position_after_each_whether_or_not_read_ahead():
    loader = Loader(4)
    batches = BatchAhead(loader, lambda raw: (raw, raw * 10), loader.get_state)
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
    batches = BatchAhead(loader, _prepare, loader.get_state)
    assert batches.take().host == "host 0"
    batches.prepare_next()
    assert batches.take().device == "device 1"
    batches.prepare_next()  # batch 2 fails here, but the step of batch 1 is checked and saved before it surfaces
    with pytest.raises(ValueError, match="batch 2: malformed record"):
        batches.take()
    assert batches.take().host == "host 3"  # the error is raised once
