"""One run per workdir (clip_jax.training.workdir_lock): a held lock refuses a second holder and
names the first; a lock left by a dead process is taken over with a warning; the remote protocol
(a record with a heartbeat, for gs://) does the same without flock."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from clip_jax.training import workdir_lock
from clip_jax.training.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid  # not reused this quickly


@pytest.mark.parametrize("use_flock", [True, False], ids=["flock", "remote-protocol"])
def test_second_holder_is_refused_with_the_holders_host_and_pid(tmp_path, use_flock):
    first = WorkdirLock(str(tmp_path), use_flock=use_flock)
    first.acquire()
    try:
        with pytest.raises(WorkdirLockedError) as raised:
            WorkdirLock(str(tmp_path), use_flock=use_flock).acquire()
        message = str(raised.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "\n" not in message
    finally:
        first.release()
    # Released: the next run starts, without a warning about a stale lock.
    again = WorkdirLock(str(tmp_path), use_flock=use_flock)
    again.acquire()
    again.release()


@pytest.mark.parametrize("use_flock", [True, False], ids=["flock", "remote-protocol"])
def test_lock_of_a_dead_local_process_is_taken_over_with_a_warning(tmp_path, use_flock, caplog):
    record = {"host": socket.gethostname(), "pid": _dead_pid(), "started": time.time(), "heartbeat": time.time()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    lock = WorkdirLock(str(tmp_path), use_flock=use_flock)
    with caplog.at_level(logging.WARNING, logger=workdir_lock.__name__):
        lock.acquire()
    try:
        assert any(f"pid {record['pid']}" in message and "Taking over" in message for message in caplog.messages)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_remote_lock_of_another_host_is_refused_while_its_heartbeat_is_fresh(tmp_path, monkeypatch):
    record = {"host": "another-host", "pid": 1, "started": time.time(), "heartbeat": time.time()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(WorkdirLockedError, match="another-host, pid 1"):
        WorkdirLock(str(tmp_path), use_flock=False).acquire()
    # A machine that died: its heartbeat stops, and after STALE_AFTER_SECONDS the lock is free.
    record["heartbeat"] = time.time() - workdir_lock.STALE_AFTER_SECONDS - 1
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    lock = WorkdirLock(str(tmp_path), use_flock=False)
    lock.acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()  # the remote record is deleted on release


def test_remote_heartbeat_refreshes_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = WorkdirLock(str(tmp_path), use_flock=False)
    lock.acquire()
    try:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "the heartbeat never refreshed the record"
            time.sleep(0.05)
    finally:
        lock.release()


def test_flock_is_released_when_the_holder_is_killed(tmp_path):
    """SIGKILL leaves the record behind but not the lock: the next run takes over."""
    code = (
        "import sys, time; from clip_jax.training.workdir_lock import WorkdirLock; "
        "lock = WorkdirLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    lock.release()
