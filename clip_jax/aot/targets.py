"""The accelerators a run can be compiled for from any machine: TPU slices (through libtpu's
ahead-of-time topologies) and NVIDIA GPU hosts (through the CUDA plugin's, where it is installed),
each with the memory of one chip and the device kind that names it.

    target = parse_target("v5e-256")           # Cloud TPU's accelerator type: 256 v5e chips
    target = parse_target("v4:4x8x8")          # the same kind of slice by its chip grid
    devices = target.devices(num_slices=2)     # abstract devices: compile for them, never run
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from jax.experimental import topologies

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip (the JAX device) and how its slices are named."""

    name: str  # as in accelerator types: v4, v5e, v5p, v6e
    hbm_bytes: int
    cores_in_name: int  # v4-512 counts TensorCores (2 per chip, megacore); v5e-256 counts chips
    grid_dimensions: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)

    @property
    def megacore(self) -> bool:
        return self.cores_in_name == 2


# Cloud TPU's published HBM per chip. The compiler reserves a little of it for itself, so a
# program gets somewhat less; a report names both when the compiler says.
TPU_CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, cores_in_name=2, grid_dimensions=3),
    "v5e": Chip("v5e", 16 * GiB, cores_in_name=1, grid_dimensions=2),
    "v5p": Chip("v5p", 95 * GiB, cores_in_name=2, grid_dimensions=3),
    "v6e": Chip("v6e", 32 * GiB, cores_in_name=1, grid_dimensions=2),
}

# GPU hosts, compiled through the CUDA plugin's topology (jax[cuda12] installed, no GPU needed).
# The target text is XLA's GpuTargetConfig for the device; the memory is the device's.
GPU_TARGETS: dict[str, dict[str, Any]] = {
    "h100": {
        "description": "NVIDIA H100 80GB HBM3",
        "memory_bytes": 84_929_347_584,
        "compute_capability": (9, 0),
        "core_count": 132,
        "clock_rate_ghz": 1.98,
        "shared_memory_per_block_optin": 232_448,
        "shared_memory_per_core": 233_472,
        "l2_cache_size": 52_428_800,
        "memory_bandwidth": 3_352_320_000_000,
    },
}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: `chips` devices of one kind per slice, laid out as `grid`."""

    platform: str  # "tpu" or "cuda"
    kind: str  # a TPU_CHIPS or GPU_TARGETS key
    chips: int  # devices (chips / GPUs) per slice
    grid: tuple[int, ...]  # the slice's chip grid (TPU) or (hosts, GPUs per host)

    @property
    def memory_bytes(self) -> int:
        return TPU_CHIPS[self.kind].hbm_bytes if self.platform == "tpu" else GPU_TARGETS[self.kind]["memory_bytes"]

    @property
    def topology_name(self) -> str:
        return f"{self.kind}:{'x'.join(map(str, self.grid))}"

    def describe(self, num_slices: int = 1) -> str:
        if self.platform == "tpu":
            chip = TPU_CHIPS[self.kind]
            text = f"TPU {self.kind}-{self.chips * chip.cores_in_name} ({self.topology_name}, {self.chips} chips)"
        else:
            hosts, per_host = self.grid
            text = f"{hosts} host(s) of {per_host} {GPU_TARGETS[self.kind]['description']}"
        return text if num_slices == 1 else f"{num_slices} x {text}"

    def devices(self, num_slices: int = 1) -> Sequence[Any]:
        """The abstract devices of `num_slices` such slices (each carries `slice_index` when
        `num_slices` > 1); they can be compiled for, not run on."""
        compile_only_environment()
        if self.platform == "tpu":
            extra = {"chip_config_name": "megacore"} if TPU_CHIPS[self.kind].megacore else {}
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=self.topology_name, num_slices=num_slices, **extra
            )
            return topology.devices
        if num_slices != 1:
            raise ValueError(f"num_slices={num_slices}: GPU targets have no slices; give the hosts in the target")
        hosts, per_host = self.grid
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(self.kind), topology=f"1x{hosts}x{per_host}"
        )
        return topology.devices


def compile_only_environment() -> None:
    """The environment libtpu wants on a machine that only compiles (set where unset, before libtpu
    loads): any number of processes may load it at once (by default it takes /tmp/libtpu_lockfile,
    as if it owned the TPU), and it is told what it would otherwise print warnings about finding.
    A TPU VM that trains sets all of these itself."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def parse_target(text: str) -> Target:
    """A target from "v5e-256" (Cloud TPU accelerator type), "v4:4x8x8" (chip grid), or
    "8xh100" / "2x8xh100" (GPU hosts: [hosts x] GPUs per host)."""
    value = text.strip().lower()
    gpu = re.fullmatch(r"(?:(\d+)x)?(\d+)x([a-z0-9]+)", value)
    if gpu and gpu.group(3) in GPU_TARGETS:
        hosts, per_host = int(gpu.group(1) or 1), int(gpu.group(2))
        return Target("cuda", gpu.group(3), hosts * per_host, (hosts, per_host))
    typed = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", value)
    gridded = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", value)
    kind = (typed or gridded).group(1) if (typed or gridded) else None
    if kind not in TPU_CHIPS:
        raise ValueError(
            f"unknown target {text!r}; expected a TPU slice such as v5e-256 or v4:4x8x8 "
            f"({', '.join(TPU_CHIPS)}), or GPU hosts such as 8xh100 or 2x8xh100"
        )
    chip = TPU_CHIPS[kind]
    if gridded:
        grid = tuple(int(size) for size in gridded.group(2).split("x"))
        if len(grid) != chip.grid_dimensions:
            raise ValueError(f"target {text!r}: a {kind} slice has a {chip.grid_dimensions}-D chip grid")
        return Target("tpu", kind, math.prod(grid), grid)
    cores = int(typed.group(2))
    chips, remainder = divmod(cores, chip.cores_in_name)
    if remainder or chips < 1 or chips & (chips - 1):
        raise ValueError(
            f"target {text!r}: {kind} slices have a power of two of chips"
            + (f" ({kind}-N counts {chip.cores_in_name} TensorCores per chip)" if chip.megacore else "")
        )
    return Target("tpu", kind, chips, default_grid(chips, chip.grid_dimensions))


def default_grid(chips: int, dimensions: int) -> tuple[int, ...]:
    """Cloud TPU's default chip grid for a slice of `chips` (a power of two): as even as powers of
    two allow, the longer sides last (v5e-32: 4x8; v4-512: 4x8x8), a 4-chip 3-D slice 2x2x1."""
    exponent = chips.bit_length() - 1
    base, extra = divmod(exponent, dimensions)
    grid = [2 ** (base + (index >= dimensions - extra)) for index in range(dimensions)]
    if dimensions == 3 and grid[0] == 1:  # a slice smaller than a cube lies flat: 2x2x1
        grid = grid[1:] + grid[:1]
    return tuple(grid)


def gpu_target_config(kind: str) -> str:
    """XLA's GpuTargetConfig text proto for a GPU kind (what the CUDA plugin compiles against)."""
    info = GPU_TARGETS[kind]
    major, minor = info["compute_capability"]
    return (
        "gpu_device_info {\n"
        "  threads_per_block_limit: 1024\n  threads_per_warp: 32\n"
        f"  shared_memory_per_block: 49152\n  shared_memory_per_core: {info['shared_memory_per_core']}\n"
        "  threads_per_core_limit: 2048\n"
        f"  core_count: {info['core_count']}\n  fpus_per_core: 128\n  block_dim_limit_x: 2147483647\n"
        "  block_dim_limit_y: 65535\n  block_dim_limit_z: 65535\n"
        f"  memory_bandwidth: {info['memory_bandwidth']}\n  l2_cache_size: {info['l2_cache_size']}\n"
        f"  clock_rate_ghz: {info['clock_rate_ghz']}\n  device_memory_size: {info['memory_bytes']}\n"
        f"  shared_memory_per_block_optin: {info['shared_memory_per_block_optin']}\n"
        f"  cuda_compute_capability {{\n    major: {major}\n    minor: {minor}\n  }}\n"
        "  registers_per_core_limit: 65536\n  registers_per_block_limit: 65536\n"
        "}\n"
        'platform_name: "CUDA"\n'
        "dnn_version_info {\n  major: 9\n  minor: 7\n}\n"
        f'device_description_str: "{info["description"]}"\n'
    )
