"""clip_jax.metrics: the TensorBoard event files tensorboardX writes hold what metrics.jsonl holds,
read back with TensorBoard's own reader; a remote workdir's files go through etils epath; importing
the module brings in neither TensorFlow nor torch. The log survives a full disk (a record is
written whole or not at all, the error names the file), a torn last line is dropped on start, and
a resumed run's log keeps one record per step: the steps it replays are dropped from both files."""

from __future__ import annotations

import glob
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from clip_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _event_scalars(log_dir: str) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the one event file in `log_dir`, as TensorBoard reads it."""
    files = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert len(files) == 1, files
    accumulator = event_accumulator.EventAccumulator(files[0], size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    scalars: dict[tuple[str, int], float] = {}
    for tag in accumulator.Tags()[event_accumulator.SCALARS]:
        for event in accumulator.Scalars(tag):
            assert (tag, event.step) not in scalars, f"{tag} logged twice at step {event.step}"
            scalars[(tag, event.step)] = event.value
    return scalars


def _jsonl_scalars(records: list[dict]) -> dict[tuple[str, int], float]:
    """{(name, step): value} of the JSONL records' logged numbers (None stands for no value)."""
    scalars: dict[tuple[str, int], float] = {}
    for record in records:
        for name, value in record.items():
            if name not in ("step", "time") and value is not None:
                assert (name, record["step"]) not in scalars, f"{name} logged twice at step {record['step']}"
                scalars[(name, record["step"])] = value
    return scalars


def _assert_same_scalars(events: dict[tuple[str, int], float], jsonl: dict[tuple[str, int], float]) -> None:
    assert sorted(events) == sorted(jsonl)
    for key, value in jsonl.items():
        # Event files store float32: equal once the JSONL's float64 is rounded the same way.
        assert events[key] == float(np.float32(value)), key


def test_importing_metrics_imports_neither_tensorflow_nor_torch():
    """tensorboardX's package imports torch when it is installed (it is, in the test environment),
    so the module must not import tensorboardX at the top either."""
    script = (
        "import sys\n"
        "import clip_jax.metrics\n"
        "print(sorted(name for name in ('tensorflow', 'torch') if name in sys.modules))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "[]"


def test_writing_a_local_workdir_does_not_import_tensorflow(tmp_path):
    script = (
        "import sys\n"
        "from clip_jax import metrics\n"
        "writer = metrics.MetricsWriter(sys.argv[1], enabled=True)\n"
        "writer.write(1, {'loss': 1.5})\n"
        "writer.close()\n"
        "print('tensorflow' in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "False"
    assert _event_scalars(str(tmp_path / metrics.TENSORBOARD_DIR)) == {("loss", 1): 1.5}


def test_tags_are_kept_as_named_and_missing_values_only_in_the_jsonl(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    writer.write(0, {"compile_seconds": 12.25, "mfu": None})
    writer.write(7, {"retrieval/coco/image_to_text_R@1": 0.1, "loss": float("nan"), "grad_norm": np.float32(3.5)})
    writer.write(9, {"loss": np.inf, "learning_rate": 1e-4})
    writer.close()

    records = metrics.read_jsonl(str(tmp_path / metrics.JSONL_FILE))
    assert [record["step"] for record in records] == [0, 7, 9]
    assert records[0]["mfu"] is None and records[1]["loss"] is None and records[2]["loss"] is None
    events = _event_scalars(str(tmp_path / metrics.TENSORBOARD_DIR))
    assert ("retrieval/coco/image_to_text_R@1", 7) in events  # not rewritten to "R_1"
    assert not any(tag in ("mfu", "loss") for tag, _ in events)  # NaN, inf and None are not plotted
    _assert_same_scalars(events, _jsonl_scalars(records))


# Writes a run's metrics to gs://bucket/run, which epath's test backend serves from a local
# directory, and prints the paths opened. In a subprocess: epath decides once per process whether
# gs:// goes to TensorFlow's file system (then the mock is bypassed) or to its backends.
REMOTE_WRITER = """
import json, os, sys
from etils.epath import testing
from clip_jax import metrics

bucket = sys.argv[1]
opened = []

def local(path):
    path = os.fspath(path)
    assert path.startswith("gs://bucket/"), path  # nothing of the run may land outside the bucket
    return os.path.join(bucket, path[len("gs://bucket/"):])

def open_local(original, path, mode):
    opened.append(os.fspath(path))
    return original(local(path), mode)

def on_local_path(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

with testing.mock_epath(open=open_local, makedirs=on_local_path, mkdir=on_local_path, exists=on_local_path,
                        isdir=on_local_path):
    writer = metrics.MetricsWriter("gs://bucket/run", enabled=True)
    writer.write(2, {"loss": 2.5, "pairs_per_second": 1234.5})
    writer.write(4, {"loss": 2.0})
    writer.close()
    records = metrics.read_jsonl("gs://bucket/run/metrics.jsonl")
print(json.dumps({"opened": opened, "records": records}))
"""


def test_a_remote_workdir_is_written_through_epath(tmp_path):
    """Both files of a gs:// workdir arrive through epath. Without the epath factory, tensorboardX
    would open gs:// with google-cloud-storage (not installed: the write would fail)."""
    bucket = tmp_path / "bucket"
    env = {**os.environ, "EPATH_USE_TF": "false"}
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_WRITER, str(bucket)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "gs://bucket/run/metrics.jsonl" in result["opened"]
    assert any(path.startswith("gs://bucket/run/tensorboard/events.out.tfevents.") for path in result["opened"])
    records = result["records"]
    assert [record["step"] for record in records] == [2, 4]
    assert metrics.read_jsonl(str(bucket / "run" / metrics.JSONL_FILE)) == records
    _assert_same_scalars(_event_scalars(str(bucket / "run" / metrics.TENSORBOARD_DIR)), _jsonl_scalars(records))


def test_a_short_training_run_logs_the_same_scalars_to_tensorboard_and_jsonl(tmp_path, compilation_cache_env):
    """`python train.py` (the tiny default recipe, shortened): every number of metrics.jsonl is in
    the event file at the same step, with the same value, and nothing else is."""
    workdir = tmp_path / "workdir"
    env = {**os.environ, **compilation_cache_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [
            sys.executable, "train.py", f"--workdir={workdir}", "--config.total_steps=6", "--config.log_every_steps=2",
            "--config.global_batch_size=16", "--config.eval.num_examples=0", "--config.tokenizer.training_captions=2000",
            "--config.checkpoint.async_save=False",
        ],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]

    records = metrics.read_jsonl(str(workdir / metrics.JSONL_FILE))
    assert [record["step"] for record in records if "loss" in record] == [2, 4, 6]
    jsonl = _jsonl_scalars(records)
    assert {"loss", "learning_rate", "step_seconds", "compile_seconds"} <= {name for name, _ in jsonl}
    assert all(math.isfinite(value) for value in jsonl.values())
    _assert_same_scalars(_event_scalars(str(workdir / metrics.TENSORBOARD_DIR)), jsonl)
    # The JSONL's own lines: one JSON object each, so a reader that does not use read_jsonl works too.
    lines = epath.Path(workdir / metrics.JSONL_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [record["step"] for record in records]


def test_a_resumed_writer_drops_the_records_of_the_steps_it_replays(tmp_path):
    first = metrics.MetricsWriter(str(tmp_path), enabled=True)
    first.write(0, {"compile_seconds": 3.0})
    for step in range(1, 6):
        first.write(step, {"loss": float(step)})
    first.close()
    time.sleep(1.1)  # event files are named by the second they are created in
    lines: list[str] = []
    resumed = metrics.MetricsWriter(str(tmp_path), enabled=True, start_step=3, say=lines.append)
    for step in (4, 5):
        resumed.write(step, {"loss": 10.0 * step})  # the replayed steps, computed again
    resumed.close()

    path = str(tmp_path / metrics.JSONL_FILE)
    records = metrics.read_jsonl(path)
    assert [record["step"] for record in records] == [0, 1, 2, 3, 4, 5]
    assert [record.get("loss") for record in records] == [None, 1.0, 2.0, 3.0, 40.0, 50.0]
    assert len(lines) == 1 and path in lines[0] and "2 records" in lines[0], lines
    # TensorBoard, reading the directory as one run, also shows each step once: the resumed
    # writer's values (its start event purges the older file's later steps).
    accumulator = event_accumulator.EventAccumulator(
        str(tmp_path / metrics.TENSORBOARD_DIR), size_guidance={event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    assert [(event.step, event.value) for event in accumulator.Scalars("loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)
    ]  # fmt: skip


def test_a_torn_last_line_is_dropped_on_start_in_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / metrics.JSONL_FILE
    whole = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2)]
    path.write_text("\n".join(whole) + '\n{"step": 3, "loss": 0.3')  # a write cut short
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    writer.write(3, {"loss": 0.25})
    writer.close()
    assert [record["step"] for record in metrics.read_jsonl(str(path))] == [1, 2, 3]
    said = [line for line in capsys.readouterr().out.splitlines() if str(path) in line]
    assert len(said) == 1 and "torn" in said[0], said


def test_a_record_cut_by_a_full_disk_is_not_left_in_the_log_and_the_error_names_the_file(tmp_path):
    """A real partial write: RLIMIT_FSIZE makes the kernel write part of a record and then refuse
    the rest (EFBIG), as a full disk does with ENOSPC."""
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    writer.write(1, {"loss": 1.5})
    sizes = [os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(tmp_path) for name in names]
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a signal, at the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 40, limits[1]))
    try:
        with pytest.raises(OSError) as raised:
            writer.write(2, {f"evaluation/metric_{index}": None for index in range(40)})  # JSONL only
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    writer.close()
    path = str(tmp_path / metrics.JSONL_FILE)
    assert path in str(raised.value), raised.value
    with open(path) as file:
        assert file.read() == json.dumps(metrics.read_jsonl(path)[0]) + "\n"  # step 1 whole, nothing of step 2
