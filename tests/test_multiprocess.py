"""A 2-process run of train.py (jax.distributed on localhost, gloo collectives, 2 CPU devices each)
ends with the parameters of a 1-process run on 4 devices, and stops cleanly on a preemption notice
sent to one of its processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from run_helpers import finish, free_port

from clip_jax.io import training_workdir
from clip_jax.metrics import read_jsonl
from clip_jax.training import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--config.total_steps=4",
    "--config.global_batch_size=16",
    "--config.log_every_steps=1",
    "--config.eval.num_examples=16",  # the zero-shot evaluation gathers embeddings across processes
    "--config.tokenizer.training_captions=2000",
]


def _start(workdir: str, device_count: int, cache: dict[str, str], *extra: str) -> subprocess.Popen:
    env = {**os.environ, **cache}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "train.py", f"--workdir={workdir}", *FLAGS, *extra]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_equal_one_process_with_four_devices(tmp_path, compilation_cache_env):
    cache = compilation_cache_env
    multi_workdir, single_workdir = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
    address = f"127.0.0.1:{free_port()}"
    processes = [
        _start(
            multi_workdir, 2, cache, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={index}"
        )
        for index in range(2)
    ]
    single = _start(single_workdir, 4, cache)
    outputs = [finish(process) for process in processes]
    finish(single)
    # Only process 0 reports.
    assert "Done: step 4" in outputs[0] and "Done: step 4" not in outputs[1]
    assert "in 2 process(es)" in outputs[0]

    _, multi, _ = training_workdir.load_training_workdir(multi_workdir)
    _, reference, _ = training_workdir.load_training_workdir(single_workdir)
    leaves_multi, leaves_reference = jax.tree.leaves(multi), jax.tree.leaves(reference)
    assert len(leaves_multi) == len(leaves_reference) > 10
    # Gloo sums across processes in another order than one process sums across its devices; Adam
    # turns such last-bit differences into parameter differences of ~1e-6, a thousandth of a step's
    # update (learning rate 2e-3). Feeding the wrong rows would change every value by ~1e-3.
    for got, want in zip(leaves_multi, leaves_reference):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
    # Training moved the parameters: the comparison is not between two initialisations (the
    # temperature starts at ln(1 / 0.07), CLIP's initial value).
    assert abs(float(multi["params"]["logit_scale"]) - np.log(1 / 0.07)) > 1e-4
    records_multi = read_jsonl(os.path.join(multi_workdir, "metrics.jsonl"))
    records_single = read_jsonl(os.path.join(single_workdir, "metrics.jsonl"))
    losses_multi = [r["loss"] for r in records_multi if "loss" in r]
    losses_single = [r["loss"] for r in records_single if "loss" in r]
    assert len(losses_multi) == 4
    np.testing.assert_allclose(losses_multi, losses_single, rtol=1e-5)
    zero_shot = [r for r in records_multi if "zero_shot/synthetic/ensemble/top1" in r]
    zero_shot_single = [r for r in records_single if "zero_shot/synthetic/ensemble/top1" in r]
    assert zero_shot[0]["zero_shot/synthetic/ensemble/top1"] == zero_shot_single[0]["zero_shot/synthetic/ensemble/top1"]
    # (Process 1 tokenizes with the SentencePiece model process 0 trained and sent it: had it
    # tokenized differently, its half of every batch, and so the parameters, would differ.)


def test_sigterm_to_one_process_stops_both_at_one_checkpoint(tmp_path, compilation_cache_env):
    """A preemption notice reaching one host: all processes agree on a step, save it and exit 0."""
    cache = compilation_cache_env  # the program of the test above: no compile here
    workdir = str(tmp_path / "preempted")
    address = f"127.0.0.1:{free_port()}"
    processes = [
        _start(workdir, 2, cache, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={index}")
        for index in range(2)
    ]
    # The tokenizer file appears once both processes have started jax.distributed (process 0
    # trains it and sends it to process 1), i.e. once JAX's preemption service listens.
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(workdir, "tokenizer.model")) and time.monotonic() < deadline:
        assert all(process.poll() is None for process in processes), "a process ended early"
        time.sleep(0.1)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [finish(process) for process in processes]
    assert "Preemption notice" in outputs[0]
    checkpointer = checkpointing.TrainingCheckpointer(workdir, read_only=True)
    steps = checkpointer.all_steps()
    checkpointer.close()
    assert len(steps) == 1 and steps[0] < 4, steps  # stopped early, at one agreed step
    losses = [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert len(losses) == steps[0]
