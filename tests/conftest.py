"""Test set-up: eight virtual CPU devices, set before jax is first imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment above, before any test imports jax)


@pytest.fixture(scope="session")
def compilation_cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment for train.py subprocesses sharing one persistent XLA compilation cache: runs of
    the same program (e.g. a run and its restart) compile it once; results are unchanged."""
    directory = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
