"""What the processes of a multi-host run agree on outside the train step: bytes of process 0 sent
to all (the tokenizer, a lock's refusal), a flag that must hold everywhere (a checkpoint that
restores), and a barrier. With one process each is a no-op."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def broadcast_bytes(data: bytes | None) -> bytes:
    """`data` of process 0 on every process (others pass None); no shared filesystem needed."""
    if jax.process_count() == 1:
        assert data is not None
        return data
    length = np.array([len(data) if jax.process_index() == 0 else 0], dtype=np.int64)
    length = int(multihost_utils.broadcast_one_to_all(length)[0])
    payload = np.zeros((length,), dtype=np.uint8)
    if jax.process_index() == 0:
        payload[:] = np.frombuffer(data, dtype=np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(payload)).tobytes()


def all_processes_agree(ok: bool) -> bool:
    """True on every process if `ok` is True on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray([1 if ok else 0], np.int32))
    return bool(np.asarray(flags).min())


def sync(name: str) -> None:
    """Wait until every process reaches the barrier `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
