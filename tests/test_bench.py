"""The benchmarks in bench/ still run end to end (tiny model, one step): they are not timed here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("open_clip")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _run(script: str, *args: str, tmp_path) -> str:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one CPU device
    process = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    return process.stdout


def test_train_step_bench_compares_both_frameworks(tmp_path):
    out_file = tmp_path / "result.json"
    stdout = _run(
        "train_step.py", "--model", "tiny-vit", "--batch-size", "8", "--steps", "1", "--json-out", str(out_file),
        tmp_path=tmp_path,
    )
    last = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"ratio clip_jax/open_clip: (\d+\.\d\d)", last)
    assert match, last
    result = json.loads(out_file.read_text())
    ours, reference = result["clip_jax"], result["open_clip"]
    assert ours["batch_size"] == reference["batch_size"] == 8
    assert ours["flops_per_step_per_device"] > 0 and 0 < ours["mfu"] < 1.5
    assert result["ratio"] == pytest.approx(ours["pairs_per_second"] / reference["pairs_per_second"])
    assert float(match.group(1)) == pytest.approx(result["ratio"], abs=0.006)
    if sys.platform.startswith("linux"):
        assert "glibc.malloc.hugetlb=1" in stdout.splitlines()[0]


def test_profile_step_sums_the_trace_by_kind(tmp_path):
    stdout = _run(
        "profile_step.py", "--model", "tiny-vit", "--batch-size", "8", "--trace-dir", str(tmp_path / "trace"),
        tmp_path=tmp_path,
    )
    rows = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    assert {"forward", "backward", "loss, optimizer, other", "all"} <= set(rows)
    shares = [int(value) for value in re.findall(r"\((\d+)%\)", rows["all"])]
    assert len(shares) == 4 and abs(sum(shares) - 100) <= 2, rows["all"]
    assert shares[0] > 0, "no matrix multiplies found in the trace"
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no trace written"
