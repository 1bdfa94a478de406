"""Feeding the train step: each process's rows of a batch become one global jax.Array, and a
background thread prepares the next batches while the current step runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np


def to_global_batch(local_batch: dict[str, np.ndarray], batch_sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """One global array per field from each process's rows (`make_array_from_process_local_data`)."""
    return {name: jax.make_array_from_process_local_data(batch_sharding, value) for name, value in local_batch.items()}


class Prefetcher:
    """Takes the next items of `items` in a background thread, up to `size` ahead of the consumer,
    so preparing and transferring a batch overlaps the previous step. An error raised by `items`
    is raised by `next()`; `close()` stops the thread."""

    def __init__(self, items: Iterator[Any], size: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._queue.put(("error", error))
            return
        self._queue.put(("end", None))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
