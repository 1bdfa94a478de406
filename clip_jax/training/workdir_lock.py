"""One run per workdir: a lock file that a second `train.py` in the same workdir refuses to pass.

Two runs writing one workdir interleave `metrics.jsonl` and delete each other's checkpoints, so
the second one must not start. Process 0 of a run holds the lock (`<workdir>/run.lock`, a small
JSON record of who holds it) from before the checkpoint manager is created until the run ends.

- Local and NFS workdirs: the file is locked with `flock`, which the kernel releases when the
  holder exits, however it exits (SIGKILL included). A record left by a holder that died is
  therefore stale as soon as the lock can be taken; it is taken over with a warning that names it.
- Remote workdirs (`gs://`, ...): object stores have no locks. The holder writes the record when
  it starts (refusing if a fresh one is there), rewrites its `heartbeat` every
  `HEARTBEAT_SECONDS`, and deletes it when it ends. A record whose heartbeat is older than
  `STALE_AFTER_SECONDS` (a crashed or preempted machine) is taken over with a warning, as is one
  written by a dead process of this same host. Check-then-write is not atomic: two runs started
  within the same second or two can both start (docs/reliability.md says so).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from etils import epath

from clip_jax import paths

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 600.0

logger = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


def _record() -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "heartbeat": now,
    }


def _describe(record: dict[str, Any]) -> str:
    started = record.get("started")
    when = (
        datetime.datetime.fromtimestamp(float(started), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(started, (int, float))
        else "an unknown time"
    )
    return f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {when}"


def _process_is_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _write_record(path: epath.Path, record: dict[str, Any]) -> None:
    """Write the record whole: a reader must never see an empty or half-written record (it would
    read as "no lock"). An object store's write is whole already; a local file is renamed in."""
    if not paths.is_local(path):
        path.write_text(json.dumps(record))
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)  # atomic, and replaces (epath's rename refuses an existing file)


def _parse(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return {}  # unreadable: someone's, but whose is unknown
    return record if isinstance(record, dict) else {}


class WorkdirLock:
    """`acquire()` or raise WorkdirLockedError naming the holder; `release()` when the run ends.

    `use_flock=None` picks flock for local paths and the heartbeat protocol for remote ones (tests
    pass False to exercise the remote protocol on a local directory).
    """

    def __init__(self, workdir: str, use_flock: bool | None = None) -> None:
        self.workdir = workdir
        self.path = epath.Path(workdir) / LOCK_FILE
        self._use_flock = paths.is_local(workdir) if use_flock is None else use_flock
        self._file = None
        self._record: dict[str, Any] | None = None
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _busy(self, record: dict[str, Any]) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"workdir {self.workdir!r} is in use by another run ({_describe(record)}); wait for it to end or "
            f"choose another --workdir (if no run uses it, delete {self.path})"
        )

    def acquire(self) -> None:
        if self._use_flock:
            self._acquire_flock()
        else:
            self._acquire_remote()

    # Local: flock. -------------------------------------------------------------------------

    def _acquire_flock(self) -> None:
        descriptor = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        file = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                file.close()
                raise
            record = _parse(file.read()) or {}
            file.close()
            raise self._busy(record) from None
        previous = _parse(file.read())
        if previous:
            # Whoever wrote it no longer holds the lock: the kernel released it when they died.
            logger.warning(
                "Taking over the lock of %s: that run ended without releasing it (killed or crashed).",
                _describe(previous),
            )
        self._record = _record()
        file.seek(0)
        file.truncate()
        file.write(json.dumps(self._record))
        file.flush()
        self._file = file

    # Remote: a record with a heartbeat. --------------------------------------------------

    def _read_remote(self) -> dict[str, Any] | None:
        try:
            return _parse(self.path.read_text())
        except FileNotFoundError:
            return None

    def _is_stale(self, record: dict[str, Any]) -> bool:
        if record.get("host") == socket.gethostname() and not _process_is_alive(record.get("pid")):
            return True
        heartbeat = record.get("heartbeat")
        return isinstance(heartbeat, (int, float)) and time.time() - float(heartbeat) > STALE_AFTER_SECONDS

    def _acquire_remote(self) -> None:
        previous = self._read_remote()
        if previous is not None:
            if not self._is_stale(previous):
                raise self._busy(previous)
            logger.warning(
                "Taking over the stale lock of %s (its process is gone or its heartbeat stopped).",
                _describe(previous),
            )
        self._record = _record()
        _write_record(self.path, self._record)
        # Last writer wins on an object store: a run that started at the same moment and wrote
        # after us owns the lock, and we refuse.
        time.sleep(0.5)
        current = self._read_remote()
        if current != self._record:
            self._record = None
            raise self._busy(current or {})
        self._heartbeat = threading.Thread(target=self._beat, name="clip_jax-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_SECONDS):
            assert self._record is not None
            self._record["heartbeat"] = time.time()
            try:
                _write_record(self.path, self._record)
            except Exception as error:  # a transient store error must not kill the run
                logger.warning("Could not refresh the workdir lock %s: %s", self.path, error)

    # Both. ----------------------------------------------------------------------------------

    def release(self) -> None:
        """Give the workdir up (the next run starts without a warning)."""
        if self._file is not None:
            # Emptied rather than deleted: deleting a locked file lets a waiting opener lock the
            # old, unlinked file while a third run creates and locks a new one.
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._heartbeat is not None:
            self._stop_heartbeat.set()
            self._heartbeat.join(timeout=5)
            self._heartbeat = None
            if self._read_remote() == self._record:
                self.path.unlink(missing_ok=True)
        self._record = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
