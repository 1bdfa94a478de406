"""Training metrics: TensorBoard event files and a JSONL log (written by process 0 only), a live
progress bar, and model-FLOPs utilisation (XLA's FLOP count of the compiled step against the
device's peak).

The TensorBoard writer encodes the event protocol buffers and TFRecord framing itself, so logging
never imports TensorFlow (seconds of start-up and a second thread pool beside XLA's).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from absl import logging

# Dense bf16 peak FLOP/s of one JAX device, matched against `device.device_kind` in this order
# (the first pattern found in the kind wins, so "v5 lite" is tried before "v5"). A JAX device is
# one chip on TPU v4 and later (megacore) and one GPU.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, str, float], ...] = (
    ("TPU v4", "TPU v4", 275e12),
    ("TPU v5 lite", "TPU v5e", 197e12),
    ("TPU v5e", "TPU v5e", 197e12),
    ("TPU v5p", "TPU v5p", 459e12),
    ("TPU v5", "TPU v5p", 459e12),
    ("TPU v6 lite", "TPU v6e", 918e12),
    ("TPU v6e", "TPU v6e", 918e12),
    ("TPU7x", "TPU v7", 2307e12),
    ("A100", "NVIDIA A100", 312e12),
    ("H100", "NVIDIA H100 SXM", 989e12),
    ("H200", "NVIDIA H200", 989e12),
)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default: the first device), or None when unknown
    (e.g. CPU, where `measure_matmul_peak_flops` gives a measured figure instead)."""
    device = device or jax.devices()[0]
    kind = device.device_kind
    for pattern, _, peak in PEAK_FLOPS_PER_DEVICE:
        if pattern.lower() in kind.lower():
            return peak
    return None


class MatmulPeak(NamedTuple):
    """FLOP/s of square matmuls (see `measure_matmul_peak`)."""

    sustained: float  # the best size's FLOPs / time over back-to-back calls for a window of seconds
    best_single: float  # the fastest single call of any size: a burst figure, for reference
    size: int  # the size whose sustained figure is `sustained`


def measure_matmul_peak(
    sizes: tuple[int, ...] = (1024, 2048, 3072), dtype: str = "float32", seconds: float = 1.0
) -> MatmulPeak:
    """Matmul throughput of the first device: for each square `size`, back-to-back `size`x`size`
    matmuls for at least `seconds` (and at least 3 calls); the sustained figure of a size is its
    FLOPs over the whole window, the peak the best size's.

    Sustained, because what it is compared with (a train step of seconds) is also an average over
    seconds: a single fast call measures a moment when the host's cores happened to be quiet.
    On CPU every virtual device shares the same cores, so this is the peak of the whole host (and
    of whatever else the host runs meanwhile: measure in the same run as what it is compared to).
    """
    if seconds <= 0 or not sizes:
        raise ValueError(f"need at least one size and seconds > 0; got sizes={sizes}, seconds={seconds}")
    device = jax.devices()[0]
    matmul = jax.jit(lambda x, y: x @ y)
    sustained, best_single, best_size = 0.0, 0.0, sizes[0]
    for size in sizes:
        key_a, key_b = jax.random.split(jax.random.key(size))
        a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
        b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
        matmul(a, b).block_until_ready()  # compile
        flops, calls, total = 2.0 * size**3, 0, 0.0
        while total < seconds or calls < 3:
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            elapsed = time.perf_counter() - start
            total, calls = total + elapsed, calls + 1
            best_single = max(best_single, flops / elapsed)
        if flops * calls / total > sustained:
            sustained, best_size = flops * calls / total, size
    return MatmulPeak(sustained, best_single, best_size)


def measure_matmul_peak_flops(
    sizes: tuple[int, ...] = (1024, 2048, 3072), dtype: str = "float32", seconds: float = 1.0
) -> float:
    """The sustained matmul FLOP/s of the first device (`measure_matmul_peak(...).sustained`)."""
    return measure_matmul_peak(sizes, dtype, seconds).sustained


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled (`jit(...).lower(...).compile()`) function, per device.

    XLA analyses the SPMD-partitioned program, i.e. the work of one device. None if the backend
    gives no cost analysis.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning nothing
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def model_flops_utilization(
    flops_per_device: float | None, step_seconds: float, peak_flops_per_device: float | None
) -> float | None:
    """Fraction of the peak used: FLOPs of one step on one device / step time / device peak."""
    if not flops_per_device or not peak_flops_per_device or step_seconds <= 0:
        return None
    return flops_per_device / step_seconds / peak_flops_per_device


# --------------------------------------------------------------------------------------------
# TensorBoard event files: TFRecord-framed `Event` protocol buffers, encoded by hand.
# --------------------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord files use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecord(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (
        length
        + struct.pack("<I", _masked_crc32c(length))
        + payload
        + struct.pack("<I", _masked_crc32c(payload))
    )


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf encodes negative int64 as ten-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None) -> bytes:
    """An `Event` message: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    message = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        message += _length_delimited(3, file_version.encode())
    if summary is not None:
        message += _length_delimited(5, summary)
    return message


def _scalar_summary(scalars: Mapping[str, float]) -> bytes:
    """A `Summary` of `Value`s with tag (1, string) and simple_value (2, float)."""
    values = b""
    for tag, value in scalars.items():
        value_message = _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
        values += _length_delimited(1, value_message)
    return values


def _is_remote(path: str) -> bool:
    return "://" in path


def _open_for_append(path: str, mode: str):
    """A file object for local paths; tf.io.gfile (imported only then) for gs:// and the like."""
    if _is_remote(path):
        import tensorflow as tf

        return tf.io.gfile.GFile(path, mode)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return open(path, mode)


class TensorBoardWriter:
    """Appends scalar summaries to one `events.out.tfevents.*` file that TensorBoard reads."""

    def __init__(self, log_dir: str) -> None:
        filename = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.clip_jax"
        self.path = os.path.join(log_dir, filename)
        self._file = _open_for_append(self.path, "ab")
        self._file.write(_tfrecord(_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if scalars:
            self._file.write(_tfrecord(_event(time.time(), step, summary=_scalar_summary(scalars))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------------------------
# The writer the training loop uses.
# --------------------------------------------------------------------------------------------

JSONL_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _finite_float(value: Any) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Scalars to TensorBoard (`<workdir>/tensorboard/`) and to `<workdir>/metrics.jsonl`.

    Only process 0 writes (pass `enabled=False` elsewhere); each JSONL line is
    {"step": ..., "time": unix seconds, name: value, ...}, None standing for NaN/inf/unavailable.
    """

    def __init__(self, workdir: str, enabled: bool | None = None) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._tensorboard: TensorBoardWriter | None = None
        self._jsonl = None
        if self.enabled:
            self._tensorboard = TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR))
            self._jsonl = _open_for_append(os.path.join(workdir, JSONL_FILE), "a")

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log `scalars` (python/numpy numbers; None = unavailable, kept only in the JSONL)."""
        if not self.enabled:
            return
        values = {name: (None if value is None else _finite_float(value)) for name, value in scalars.items()}
        self._tensorboard.scalars(step, {name: value for name, value in values.items() if value is not None})
        self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **values}) + "\n")
        self.flush()

    def flush(self) -> None:
        if self.enabled:
            self._tensorboard.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()
            self.enabled = False


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file, in order."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def announce(message: str) -> None:
    """A line for the person watching: printed by process 0 (above the progress bar), and logged."""
    logging.info(message)
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message)


class ProgressBar:
    """A tqdm bar over training steps on process 0 (silent elsewhere), showing the latest metrics."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool | None = None) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def show(self, values: Mapping[str, Any]) -> None:
        """Put `values` (formatted briefly) after the bar."""
        if self._bar is not None:
            self._bar.set_postfix({name: _brief(value) for name, value in values.items()}, refresh=False)

    def write(self, message: str) -> None:
        """A line above the bar (print would tear it)."""
        if self._bar is not None:
            self._bar.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _brief(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.4g}"
