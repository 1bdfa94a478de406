"""Multislice meshes: the data axis spans slices over the data-centre network, fsdp and model stay
inside a slice, and the global contrastive loss is exactly the single-device one.

On CPU a slice is a process (`sharding.make_mesh` uses jax's `create_hybrid_device_mesh` with
`process_is_granule` wherever devices carry no `slice_index`): two processes of 4 devices each,
joined by gloo, are a 2-slice job. The TPU side (devices with `slice_index`, one program per
slice, the collectives that cross slices) is tested by compiling for a 2-slice topology in
tests/test_aot.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from run_helpers import finish, free_port

from clip_jax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def test_two_slice_mesh_keeps_slices_whole_and_the_loss_exact():
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    processes = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multislice_worker.py"), address, str(index)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for index in range(2)
    ]
    outputs = [json.loads(finish(process).strip().splitlines()[-1]) for process in processes]
    for result in outputs:
        # mesh (data 4, fsdp 2, model 1): rows 0-1 of the data axis are slice (process) 0, rows
        # 2-3 slice 1, so every fsdp group lies inside one slice.
        assert result["mesh_processes"] == [[0, 0], [0, 0], [1, 1], [1, 1]]
        assert set(result["losses"]) == {"softmax/all_gather", "softmax/ring", "sigmoid/all_gather", "sigmoid/ring"}
        for name, values in result["losses"].items():
            actual, expected = values["loss"]
            assert abs(actual - expected) <= 1e-5 * abs(expected), (name, actual, expected)
            assert values["max_gradient_difference"] <= 1e-5 * values["max_gradient"], (name, values)


def test_dcn_data_must_match_the_slices():
    import jax

    with pytest.raises(ValueError, match=r"mesh.dcn_data=2 but the 8 devices form 1 process"):
        sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1, "dcn_data": 2}, jax.devices())
    with pytest.raises(ValueError, match=r"mesh.dcn_data must be a positive number of slices or -1"):
        sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1, "dcn_data": 0}, jax.devices())
    # -1: every slice there is, here one; the mesh is the single-slice one.
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "model": 1, "dcn_data": -1}, jax.devices())
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
