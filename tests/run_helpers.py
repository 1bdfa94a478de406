"""Helpers shared by the tests that train: the default recipe's config, and train.py subprocesses
(a free coordinator port, waiting for a process and failing with its stderr)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config():
    """configs/default.py's config (a fresh ConfigDict each call)."""
    specification = importlib.util.spec_from_file_location(
        "default_config", os.path.join(REPO, "configs", "default.py")
    )
    module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(module)
    return module.get_config()


def free_port() -> int:
    """A TCP port on localhost that is free now (for jax.distributed's coordinator)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def finish(process: subprocess.Popen) -> str:
    """Wait (at most 10 minutes) for a train.py process started with pipes; its stdout. Fails with
    the end of its stderr if it did not exit 0; kills it if it is still running."""
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-4000:]
    return stdout
