"""FLIP on the built-in data: held-out zero-shot accuracy and wall time, unmasked vs patch dropout.

    python bench/flip_accuracy.py --seeds 0,1,2                       # the default recipe, 1,500 steps
    python bench/flip_accuracy.py --seeds 0,1,2 --total-steps 750     # both arms shortened alike

Runs configs/default.py (the run `python train.py` does) over each seed twice: unmasked, and with
`model.overrides.vision.patch_dropout` (default 0.5) plus `unmasked_tuning_steps` (default a tenth
of the steps). The arms alternate seed by seed, so that slow phases of a shared machine fall on
both. Each run is a fresh `python train.py` process in its own workdir, timed from start to exit
(compiles, the tokenizer's training and the final evaluation included: the FLIP arm compiles two
steps), and its training loop alone from the metrics' timestamps (after compiling, before the
final evaluation). Both arms evaluate only at the end
(`eval_every_steps` = `total_steps`) and save only there. `config.seed` and `data.seed` are both
the seed. Prints each run as it ends and then a table: zero-shot top-1 (ensemble and class-name
prompts, on the 16 held-out colour x shape combinations) as mean ± sample std, and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("zero_shot/synthetic/ensemble/top1", "zero_shot/synthetic/class_name/top1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--total-steps", type=int, default=1500, help="steps of both arms (default: the recipe's)")
    parser.add_argument("--patch-dropout", type=float, default=0.5)
    parser.add_argument("--tuning-steps", type=int, default=None, help="unmasked tuning steps (default: total / 10)")
    parser.add_argument("--json-out", default=None, help="also write every run's figures here")
    return parser.parse_args(argv)


def run_once(seed: int, total_steps: int, patch_dropout: float, tuning_steps: int) -> dict:
    """One `python train.py` run; its final zero-shot accuracies and wall seconds."""
    workdir = tempfile.mkdtemp(prefix=f"flip_{patch_dropout}_{seed}_")
    flags = [
        f"--config.seed={seed}",
        f"--config.data.seed={seed}",
        f"--config.total_steps={total_steps}",
        f"--config.eval_every_steps={total_steps}",
        f"--config.checkpoint.every_steps={total_steps}",
        f"--config.log_every_steps={max(1, total_steps // 10)}",
        f"--config.model.overrides.vision.patch_dropout={patch_dropout}",
        f"--config.unmasked_tuning_steps={tuning_steps if patch_dropout else 0}",
    ]
    command = [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *flags]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if finished.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    return {"seed": seed, "patch_dropout": patch_dropout, "wall_seconds": wall, **read_workdir(workdir)}


def read_workdir(workdir: str) -> dict:
    """The final zero-shot accuracies and the training loop's seconds: from the first record
    (written once the steps are compiled) to the last training log (before the final evaluation)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as lines:
        records = [json.loads(line) for line in lines]
    final = [record for record in records if METRICS[0] in record][-1]
    last_training = [record for record in records if "loss" in record][-1]
    return {"workdir": workdir, "loop_seconds": last_training["time"] - records[0]["time"]} | {
        name: final[name] for name in METRICS
    }


def _mean_std(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    tuning = args.total_steps // 10 if args.tuning_steps is None else args.tuning_steps
    arms = {"unmasked": 0.0, f"patch_dropout {args.patch_dropout} + {tuning} unmasked": args.patch_dropout}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for index, seed in enumerate(seeds):
        # Alternate which arm goes first, so neither always runs in the same phase of the machine's load.
        order = list(arms.items()) if index % 2 == 0 else list(reversed(arms.items()))
        for name, patch_dropout in order:
            result = run_once(seed, args.total_steps, patch_dropout, tuning)
            results[name].append(result)
            print(
                f"seed {seed} {name}: ensemble top-1 {result[METRICS[0]]:.3f}, class-name top-1 "
                f"{result[METRICS[1]]:.3f}, wall {result['wall_seconds']:.0f} s, loop {result['loop_seconds']:.0f} s",
                flush=True,
            )
    print(f"\n{args.total_steps} steps, seeds {seeds}")
    print("| arm | zero-shot top-1 (ensemble) | top-1 (class name) | wall time (s) | training loop (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        print(
            f"| {name} | {_mean_std([run[METRICS[0]] for run in runs])} | "
            f"{_mean_std([run[METRICS[1]] for run in runs])} | {_mean_std([run['wall_seconds'] for run in runs], 0)} | "
            f"{_mean_std([run['loop_seconds'] for run in runs], 0)} |"
        )
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
