"""The micro-batcher: own results per caller, batch bounds, error spreading, shutdown (no timing asserts)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from aisight.batching import BatcherClosed, MicroBatcher
from tests.conftest import run_at_once


def first_pixel(batch: np.ndarray) -> np.ndarray:
    """A stand-in model: each image's answer is its first value."""
    return batch.reshape(len(batch), -1)[:, 0].astype(np.float64)


class Gate:
    """A model that holds its first call until released, so later items queue up deterministically."""

    def __init__(self, fn=first_pixel) -> None:
        self.fn = fn
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(10)
        return self.fn(batch)


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def wait_queued(batcher: MicroBatcher, n: int) -> None:
    deadline = time.monotonic() + 10
    while batcher._queue.qsize() < n:
        assert time.monotonic() < deadline, "items never queued"
        time.sleep(0.001)


def test_concurrent_callers_get_their_own_results():
    batcher = MicroBatcher(first_pixel, max_batch=8, max_wait=0.05)
    results: dict[int, float] = {}

    def call(i: int) -> None:
        results[i] = batcher.submit(image(i), timeout=10)

    run_at_once(call, 24, timeout=10)
    batcher.close()
    assert results == {i: float(i) for i in range(24)}
    assert sum(size * n for size, n in batcher.batch_sizes.items()) == 24
    assert max(batcher.batch_sizes) <= 8


def test_queued_items_run_together_up_to_max_batch():
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=4, max_wait=0.0)
    futures = [batcher.submit_async(image(0))]
    assert gate.started.wait(10)
    futures += [batcher.submit_async(image(i)) for i in range(1, 11)]
    wait_queued(batcher, 10)
    gate.release.set()
    assert [f.result(10) for f in futures] == [float(i) for i in range(11)]
    batcher.close()
    # The first call ran alone; the ten queued behind it went in batches of at most four, in order.
    assert gate.calls == [1, 4, 4, 2]


def test_waits_for_company_until_the_batch_is_full():
    calls: list[int] = []
    batcher = MicroBatcher(lambda b: (calls.append(len(b)), first_pixel(b))[1], max_batch=2, max_wait=60.0)
    a = batcher.submit_async(image(1))
    b = batcher.submit_async(image(2))
    # A full batch runs at once: the 60 s wait is an upper bound, not a delay.
    assert (a.result(10), b.result(10)) == (1.0, 2.0)
    batcher.close()
    assert calls == [2]


def test_a_lone_item_runs_after_the_wait():
    calls: list[int] = []
    batcher = MicroBatcher(lambda b: (calls.append(len(b)), first_pixel(b))[1], max_batch=16, max_wait=0.02)
    assert batcher.submit(image(7), timeout=10) == 7.0
    batcher.close()
    assert calls == [1]


def test_a_model_error_reaches_every_caller_of_the_batch_and_the_batcher_lives_on():
    def boom(batch: np.ndarray) -> np.ndarray:
        if (batch == 13).any():
            raise RuntimeError("model exploded")
        return first_pixel(batch)

    gate = Gate(boom)
    batcher = MicroBatcher(gate, max_batch=8, max_wait=0.0)
    first = batcher.submit_async(image(1))
    assert gate.started.wait(10)
    doomed = [batcher.submit_async(image(v)) for v in (2, 13, 4)]
    wait_queued(batcher, 3)
    gate.release.set()
    assert first.result(10) == 1.0
    for f in doomed:
        with pytest.raises(RuntimeError, match="model exploded"):
            f.result(10)
    assert batcher.submit(image(5), timeout=10) == 5.0
    batcher.close()


def test_a_wrong_number_of_results_is_an_error_for_the_batch():
    batcher = MicroBatcher(lambda b: np.zeros(len(b) + 1), max_batch=4, max_wait=0.0)
    with pytest.raises(RuntimeError, match="returned 2 results"):
        batcher.submit(image(1), timeout=10)
    batcher.close()


def test_close_answers_queued_items_then_refuses_and_stops():
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=2, max_wait=0.0)
    futures = [batcher.submit_async(image(0))]
    assert gate.started.wait(10)
    futures += [batcher.submit_async(image(i)) for i in (1, 2, 3)]
    wait_queued(batcher, 3)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.release.set()
    closer.join(10)
    assert [f.result(10) for f in futures] == [0.0, 1.0, 2.0, 3.0]
    assert batcher.closed and not batcher._thread.is_alive()
    with pytest.raises(BatcherClosed):
        batcher.submit(image(4))
    batcher.close()  # twice is fine


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(first_pixel, max_batch=0)
    with pytest.raises(ValueError, match="max_wait"):
        MicroBatcher(first_pixel, max_wait=-1)
