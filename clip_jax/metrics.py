"""Training metrics: TensorBoard event files and a JSONL log (written by process 0 only), a live
progress bar, and model-FLOPs utilisation (XLA's FLOP count of the compiled step against the
device's peak).

Event files are written by tensorboardX, which does not need TensorFlow (seconds of start-up and a
second thread pool beside XLA's). The workdir may be local or remote (gs://...): metrics.jsonl, and
the event files of a remote workdir, are opened through etils epath like every other file.
`announce` is the one way a run tells the person watching what it does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

from clip_jax import paths

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
# TensorBoard event files, written by tensorboardX.
# --------------------------------------------------------------------------------------------

# Remote schemes that etils epath serves (Cloud Storage, S3, Azure). tensorboardX opens an event
# file with the built-in open() unless a writer factory is registered for the path's scheme; its
# own gs:// and s3:// factories need google-cloud-storage and boto3 and re-upload the whole file at
# every flush. Registering epath's for them sends event files through the same file layer (and
# credentials) as metrics.jsonl and the checkpoints.
REMOTE_SCHEMES: tuple[str, ...] = ("gs", "s3", "az")


class _EpathEventFile:
    """An event file opened through etils epath, as tensorboardX's RecordWriter uses it.

    Only write, flush and close: RecordWriter fsyncs a file that has a `fileno`, which an object in
    a bucket does not have (fsspec's file objects have one that raises)."""

    def __init__(self, path: str) -> None:
        self._file = epath.Path(path).open("wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _EpathEventFiles:
    """A tensorboardX writer factory (`tensorboardX.record_writer.register_writer_factory`)."""

    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboardx() -> Any:
    """tensorboardX, imported when the first TensorBoard writer is made, with epath registered for
    the remote schemes. Not at the top of this module: tensorboardX's package imports torch when
    torch is installed (a second of start-up; this module does not use it), and only process 0
    writes event files."""
    import tensorboardX.event_file_writer
    import tensorboardX.proto.event_pb2
    import tensorboardX.proto.summary_pb2
    import tensorboardX.record_writer

    for scheme in REMOTE_SCHEMES:
        tensorboardX.record_writer.register_writer_factory(scheme, _EpathEventFiles())
    return tensorboardX


class TensorBoardWriter:
    """Scalar summaries in one `events.out.tfevents.*` file of `log_dir` (local or remote), which
    TensorBoard reads.

    Each `scalars` call is one event, in the file (flushed to the OS, or to the bucket) when it
    returns, like the JSONL line written beside it. tensorboardX's `SummaryWriter` would queue
    events for a background process and flush every two minutes instead.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_from_step: int | None = None) -> None:
        """`purge_from_step`: TensorBoard drops the events of earlier files at that step and later
        (a resumed run replays them), as tensorboardX's `SummaryWriter(purge_step=...)` does."""
        tensorboardx = _tensorboardx()
        self._event = tensorboardx.proto.event_pb2.Event
        self._summary = tensorboardx.proto.summary_pb2.Summary
        log_dir = epath.Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        # The process id in the name keeps two writers started in the same second apart.
        self._writer = tensorboardx.event_file_writer.EventsWriter(
            str(log_dir / "events"), filename_suffix=f".{os.getpid()}.clip_jax"
        )
        self.path = self._writer._file_name  # named in errors
        if purge_from_step is not None:
            start = tensorboardx.proto.event_pb2.SessionLog(status=tensorboardx.proto.event_pb2.SessionLog.START)
            self._writer.write_event(self._event(wall_time=time.time(), step=purge_from_step, session_log=start))
        self.flush()

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One event holding `scalars` at `step`, tags exactly as named (tensorboardX's own
        `summary.scalar` would rewrite characters such as the "@" of "R@1")."""
        if not scalars:
            return
        values = [self._summary.Value(tag=name, simple_value=float(value)) for name, value in scalars.items()]
        with _naming(self.path):
            self._writer.write_event(
                self._event(wall_time=time.time(), step=int(step), summary=self._summary(value=values))
            )
        self.flush()

    def flush(self) -> None:
        with _naming(self.path):
            self._writer.flush()

    def close(self) -> None:
        with _naming(self.path):
            self._writer.close()


@contextlib.contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError raised in the block, said again with `path` in its message (a full disk's
    "[Errno 28] No space left on device" names no file)."""
    try:
        yield
    except OSError as error:
        if os.fspath(path) in str(error):
            raise
        raise OSError(error.errno, f"{error.strerror or error} (writing {os.fspath(path)})") from error


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
    `workdir` may be local or remote (gs://...): both files go through etils epath.

    The log survives interruptions and a full disk: on start it is repaired (`repair_jsonl`: lines
    that are not whole records, such as one cut short, are dropped), and with `start_step` (the
    step a run starts or resumes from) the records of later steps are dropped too, in the JSONL
    and in TensorBoard's view, since the run replays those steps: one record per step, as if the
    run had not been interrupted. A record is appended whole or not at all (`JsonlLog`). Each
    repair is said in one line through `say` (default: `announce`); an I/O error names its file.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        enabled: bool | None = None,
        start_step: int | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._tensorboard: TensorBoardWriter | None = None
        self._jsonl: JsonlLog | None = None
        if self.enabled:
            directory = epath.Path(workdir)
            dropped = repair_jsonl(directory / JSONL_FILE, start_step, say or announce)
            # TensorBoard's files are not rewritten: a start event hides their replayed steps.
            purge = start_step + 1 if dropped else None
            self._tensorboard = TensorBoardWriter(directory / TENSORBOARD_DIR, purge_from_step=purge)
            self._jsonl = JsonlLog(directory / JSONL_FILE)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log `scalars` (python/numpy numbers; None = unavailable, kept only in the JSONL)."""
        if not self.enabled:
            return
        values = {name: (None if value is None else _finite_float(value)) for name, value in scalars.items()}
        self._tensorboard.scalars(step, {name: value for name, value in values.items() if value is not None})
        self._jsonl.append(json.dumps({"step": int(step), "time": round(time.time(), 3), **values}))

    def flush(self) -> None:
        if self.enabled:
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()
            self.enabled = False


class JsonlLog:
    """A JSONL file that records are appended to whole or not at all, each on the disk (or in the
    bucket) when `append` returns.

    Locally one `os.write` per record on a file opened for appending; when the disk fills part way
    (a short write, then ENOSPC), the file is cut back to where the record began and the error,
    naming the file, is raised. Remote files go through epath, whose stores write objects whole.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with _naming(self.path):
            if paths.is_local(self.path):
                self._descriptor: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._file = None
            else:
                self._descriptor, self._file = None, epath.Path(self.path).open("a")

    def append(self, record: str) -> None:
        """Append `record` (one JSON text, no newline) as one line."""
        data = (record + "\n").encode("utf-8")
        with _naming(self.path):
            if self._descriptor is None:
                self._file.write(data.decode("utf-8"))
                self._file.flush()
                return
            start = os.fstat(self._descriptor).st_size
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._descriptor, data[written:])
            except OSError:
                os.ftruncate(self._descriptor, start)  # not half a record
                raise

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        elif self._file is not None:
            with _naming(self.path):
                self._file.close()
            self._file = None


def repair_jsonl(path: str | os.PathLike, start_step: int | None, announce: Callable[[str], None]) -> int:
    """Drop the lines of metrics JSONL file `path` that are not whole records (a line cut short by
    a crash or a full disk, always the last one) and, when `start_step` is given, the records of
    later steps (which the starting run replays); the file is replaced atomically, and each kind
    of drop said in one line naming the file. Returns how many records of later steps it dropped.
    Does nothing to a missing file, and does not rewrite a file it keeps whole."""
    path = epath.Path(path)
    with _naming(path):
        if not path.exists():
            return 0
        lines = path.read_bytes().split(b"\n")
    kept: list[bytes] = []
    torn = later = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            torn += 1
            continue
        if start_step is not None and step > start_step:
            later += 1
            continue
        kept.append(line)
    if not torn and not later:
        return 0
    with _naming(path):
        _replace(path, b"".join(line + b"\n" for line in kept))
    if torn:
        announce(f"Dropped {torn} torn line(s) of {path}: records cut short (a crash or a full disk)")
    if later:
        announce(f"Dropped {later} records of steps after {start_step} from {path}: this run trains those steps again")
    return later


def _replace(path: epath.Path, data: bytes) -> None:
    """Write `path` whole: beside it then renamed locally; object stores write an object whole."""
    if not paths.is_local(os.fspath(path)):
        path.write_bytes(data)
        return
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(data)
    except OSError:
        partial.unlink(missing_ok=True)  # a full disk: the file stays as it was
        raise
    os.replace(partial, path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (local or remote), in order."""
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def announce(message: str) -> None:
    """A line for the person watching: printed by process 0 (above the progress bar), and logged."""
    logging.info(message)
    if jax.process_index() == 0:
        tqdm.write(message)


class ProgressBar:
    """A tqdm bar over training steps on process 0 (silent elsewhere), showing the latest metrics."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool | None = None) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = None
        if self.enabled:
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


def lowered_flops(lowered: Any, device_count: int) -> float | None:
    """FLOPs per device of a lowered (not compiled) program over `device_count` devices, from XLA's
    cost analysis of the whole program; None when XLA gives no count."""
    analysis = lowered.cost_analysis()
    if not analysis or not analysis.get("flops"):
        return None
    return float(analysis["flops"]) / device_count
