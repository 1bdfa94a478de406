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
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    return process.stdout


def test_train_step_bench_compares_both_frameworks(tmp_path):
    out_file = tmp_path / "result.json"
    stdout = _run(
        "train_step.py",
        "--model",
        "tiny-vit",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--json-out",
        str(out_file),
        tmp_path=tmp_path,
    )
    # On CPU the two children take turns, one step each.
    turns = re.findall(r"^step (\d)/2: clip_jax (\S+) s, open_clip (\S+) s$", stdout, re.MULTILINE)
    assert [turn[0] for turn in turns] == ["1", "2"], stdout
    last = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"ratio clip_jax/open_clip: (\d+\.\d\d)", last)
    assert match, last
    result = json.loads(out_file.read_text())
    ours, reference = result["clip_jax"], result["open_clip"]
    assert ours["batch_size"] == reference["batch_size"] == 8
    assert ours["flops_per_step_per_device"] > 0 and 0 < ours["mfu"] < 1.5
    assert result["ratio"] == pytest.approx(ours["pairs_per_second"] / reference["pairs_per_second"])
    assert float(match.group(1)) == pytest.approx(result["ratio"], abs=0.006)
    for name, column in (("clip_jax", 1), ("open_clip", 2)):
        times = result[name]["step_seconds_all"]
        assert times == pytest.approx([float(turn[column]) for turn in turns], abs=1e-3)
        assert min(times) <= result[name]["step_seconds"] <= max(times)
    # The peak is the higher of the sustained matmul throughputs measured before and after the steps.
    peaks = ours["matmul_peaks"]
    assert len(peaks) == 2 and ours["peak_flops_per_device"] == max(peak["sustained"] for peak in peaks)
    assert ours["mfu_against_best_single_matmul"] <= ours["mfu"]
    if sys.platform.startswith("linux"):
        for tunable in ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0"):
            assert tunable in stdout.splitlines()[0]


def test_profile_step_sums_the_trace_by_kind(tmp_path):
    stdout = _run(
        "profile_step.py",
        "--model",
        "tiny-vit",
        "--batch-size",
        "8",
        "--trace-dir",
        str(tmp_path / "trace"),
        tmp_path=tmp_path,
    )
    rows = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    assert {"forward", "backward", "loss, optimizer, other", "all"} <= set(rows)
    shares = [int(value) for value in re.findall(r"\((\d+)%\)", rows["all"])]
    assert len(shares) == 4 and abs(sum(shares) - 100) <= 2, rows["all"]
    assert shares[0] > 0, "no matrix multiplies found in the trace"
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no trace written"
    covered = re.search(r"traced on some thread for (\d+\.\d+) s of the (\d+\.\d+) s step", stdout)
    assert covered and 0 < float(covered.group(1)) <= float(covered.group(2)) + 0.01, stdout[-2000:]


def test_matmul_peak_is_sustained_over_a_window():
    from clip_jax import metrics

    peak = metrics.measure_matmul_peak(sizes=(64, 128), seconds=0.05)
    assert peak.size in (64, 128)
    assert 0 < peak.sustained <= peak.best_single  # a window's average never beats its fastest call
    assert metrics.measure_matmul_peak_flops(sizes=(64,), seconds=0.01) > 0
    with pytest.raises(ValueError, match="seconds=0"):
        metrics.measure_matmul_peak(sizes=(64,), seconds=0)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from Linux's /proc")
def test_hostile_inputs_bench_times_the_tokenizer_and_reads_both_shards(tmp_path):
    stdout = _run(
        "hostile_inputs.py", "--word-lengths", "2000,4000", "--zeros-mib", "80", "--caption-mib", "1", tmp_path=tmp_path
    )
    assert re.search(r"one 4,000-letter word: +\d+\.\d ms", stdout), stdout
    assert re.search(r"a 1 MB caption of mixed words: +\d+\.\d ms", stdout), stdout
    shard_lines = [line for line in stdout.splitlines() if line.startswith("a ") and "{" in line]
    assert len(shard_lines) == 2, stdout
    for line in shard_lines:  # the oversized member of each shard is skipped and named
        assert "'member_too_large'" in line, line


def test_train_throughput_times_patch_dropout_variants_side_by_side(tmp_path):
    stdout = _run(
        "train_throughput.py",
        "--config.global_batch_size=8",
        "--steps=2",
        "--warmup_steps=1",
        "--patch_dropout=0,0.5",
        tmp_path=tmp_path,
    )
    rounds = re.findall(r"^round p=0\.0: (\S+) s, p=0\.5: (\S+) s$", stdout, re.MULTILINE)
    assert len(rounds) == 2, stdout
    rows = dict(re.findall(r"^\| (0\.0|0\.5) \| (\d+/16) \|", stdout, re.MULTILINE))
    assert rows == {"0.0": "16/16", "0.5": "8/16"}, stdout
    flops = [float(value) for value in re.findall(r"\| (\d\.\d\de\+\d\d) \|$", stdout, re.MULTILINE)]
    assert len(flops) == 2 and flops[1] < flops[0], stdout  # the masked step does less work
