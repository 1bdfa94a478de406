"""Ordered parallel preparation: a pool of worker threads or processes that prepares chunks of
examples, and `prepared_in_order`, which keeps a bounded number of examples in flight and hands
the results back in the order of the source, whatever the workers' timing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

from clip_jax.data.config import WORKER_KINDS
from clip_jax.data.sources import RawExample, RecordReader, SkippedExample

# Examples per task sent to a worker: amortises the per-task cost of a process pool.
CHUNK_SIZE = 8

# Imported by the forkserver before it forks workers: what the preparers live in.
_PRELOADED_MODULES = ["clip_jax.data.decode", __name__]

# What a worker process prepares with; set once per process by its pool's initializer.
_worker_function: Callable[[RawExample], Any] | None = None


def default_num_workers() -> int:
    """One worker per CPU core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class PreparerWithReader:
    """A picklable f(example) -> preparer(example, reader)."""

    preparer: Callable[..., Any]
    reader: RecordReader | None

    def __call__(self, example: RawExample) -> Any:
        return self.preparer(example, self.reader)


def _set_worker_function(function: Callable[[RawExample], Any]) -> None:
    global _worker_function
    _worker_function = function


def _run_chunk(
    examples: list[RawExample], function: Callable[[RawExample], Any] | None = None
) -> list[tuple[Any, str | None]]:
    """[(result or None, skip reason or None)] of `function` (the process's own one if None)."""
    function = function or _worker_function
    results = []
    for example in examples:
        try:
            results.append((function(example), None))
        except SkippedExample as skipped:
            results.append((None, skipped.reason))
    return results


class WorkerPool:
    """Runs `function` over chunks of examples in `num_workers` threads or processes.

    Processes come from a "forkserver" (forking the training process itself, whose JAX runtime
    holds threads, is unsafe); `function` is pickled once per worker, not per task.
    """

    def __init__(self, function: Callable[[RawExample], Any], num_workers: int, worker_kind: str) -> None:
        if worker_kind not in WORKER_KINDS:
            raise ValueError(f"data.worker_kind must be one of {WORKER_KINDS}, got {worker_kind!r}")
        if num_workers < 1:
            raise ValueError(f"the number of workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.worker_kind = worker_kind
        if worker_kind == "process":
            context = multiprocessing.get_context("forkserver")
            # Each worker imports these once at start-up rather than at its first task.
            context.set_forkserver_preload(_PRELOADED_MODULES)
            self._executor: concurrent.futures.Executor = concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=context, initializer=_set_worker_function, initargs=(function,)
            )
            self._function = None
        else:
            self._executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="clip_jax-data")
            self._function = function

    def submit(self, examples: list[RawExample]) -> concurrent.futures.Future:
        return self._executor.submit(_run_chunk, examples, self._function)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def prepared_in_order(
    items: Iterator[tuple[RawExample, Any]],
    pool: WorkerPool,
    lookahead: int,
) -> Iterator[tuple[RawExample, Any, Any, str | None]]:
    """(example, tag, result or None, skip reason or None) in the order of `items`, with up to
    `lookahead` examples being prepared by `pool` ahead of the consumer."""
    pending: collections.deque = collections.deque()  # (example, tag, future or None, index in chunk)
    chunk: list[tuple[RawExample, Any]] = []
    exhausted = False

    def send_chunk() -> None:
        future = pool.submit([example for example, _ in chunk])
        pending.extend((example, tag, future, index) for index, (example, tag) in enumerate(chunk))
        chunk.clear()

    while True:
        while not exhausted and len(pending) + len(chunk) < lookahead:
            try:
                example, tag = next(items)
            except StopIteration:
                exhausted = True
                break
            if example.problem is not None:  # nothing to decode: never sent to a worker
                if chunk:
                    send_chunk()
                pending.append((example, tag, None, 0))
                continue
            chunk.append((example, tag))
            if len(chunk) == CHUNK_SIZE:
                send_chunk()
        # A part-filled chunk waits for more examples while the workers have others in hand: sent
        # as soon as a slot frees, chunks would shrink to one example each after the first fill,
        # and every example would pay a task's cost (a pickle round trip with processes).
        if chunk and (exhausted or not pending):
            send_chunk()
        if not pending:
            return
        example, tag, future, index = pending.popleft()
        if future is None:
            yield example, tag, None, example.problem
        else:
            result, reason = future.result()[index]
            yield example, tag, result, reason
