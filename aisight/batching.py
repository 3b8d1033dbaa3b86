"""Micro-batching: gather concurrent single-image predictions into one model call.

Request threads call ``MicroBatcher.submit(image)`` and block; one batcher thread takes the oldest
waiting image, collects whatever else arrives within ``max_wait`` of that image's arrival (at most
``max_batch`` images), runs the model once and hands every caller its own row. Under load the wait is
usually zero: while one batch runs the next one queues up, and the deadline of its oldest image has
already passed when the batcher comes back for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """Raised to callers whose image was submitted to a batcher that has shut down."""


@dataclass
class _Item:
    image: np.ndarray
    arrived: float
    future: Future = field(default_factory=Future)


_STOP = object()


class MicroBatcher:
    """Run ``run(batch) -> results`` on batches of concurrently submitted items, one batch at a time.

    ``run`` takes an array of shape ``(n, *item_shape)`` and returns a sequence of ``n`` results;
    an exception it raises is given to every caller of that batch. ``max_wait`` is in seconds.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 8,
        max_wait: float = 0.003,
        name: str = "aisight-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self.run = run
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.batch_sizes: Counter[int] = Counter()  # size -> number of batches, for benchmarks and tests
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, image: np.ndarray, timeout: float | None = None):
        """Return the model's result for ``image`` (blocks until its batch has run)."""
        return self.submit_async(image).result(timeout)

    def submit_async(self, image: np.ndarray) -> Future:
        """Queue ``image`` and return the Future of its result."""
        item = _Item(image, time.monotonic())
        # The lock makes "not closed, then queued" atomic with close(): nothing is queued after _STOP.
        with self._close_lock:
            if self._closed:
                raise BatcherClosed("the batcher is shut down")
            self._queue.put(item)
        return item.future

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop after the items already queued have run; later submissions raise BatcherClosed."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            # Count the wait from the oldest image's arrival: time it spent queued behind a running
            # batch already counts, so a busy server never waits on top of that.
            deadline = first.arrived + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
        self._drain()

    def _run_batch(self, batch: list[_Item]) -> None:
        self.batch_sizes[len(batch)] += 1
        try:
            results = self.run(np.stack([it.image for it in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} images returned {len(results)} results")
        except BaseException as exc:  # every caller of the batch hears of the failure, the batcher lives on
            for it in batch:
                it.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for it, result in zip(batch, results, strict=True):
            it.future.set_result(result)

    def _drain(self) -> None:
        """Refuse whatever is still queued (nothing can be, given the lock in submit, but stay safe)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.future.set_exception(BatcherClosed("the batcher shut down before this image ran"))
