"""`python -m clip_jax.experiments {efficiency,supervised,shift,prompts,few_shot,all} --output DIR
[--quick] [--tasks a,b]`: the CLIP paper's findings on the built-in dataset (docs/paper.md).

Each command writes DIR/NAME.md, DIR/NAME.json and PNG figures and prints the minutes it took;
models are trained into DIR/models/ and reused from there. `--quick` is a smoke-test size (a
16-step CLIP, tiny supervised runs, 128 test images): its numbers mean nothing. A failure is one
line (`error: ...`, exit status 1).
"""

from __future__ import annotations

import argparse
import sys

from clip_jax import paths
from clip_jax.cli import one_line_errors
from clip_jax.data.synthetic_tasks import DOWNSTREAM_TASKS
from clip_jax.experiments.commands import COMMANDS, DEFAULT_TASKS
from clip_jax.experiments.common import Context, Sizes, timed

ORDER: tuple[str, ...] = ("supervised", "shift", "prompts", "few_shot", "efficiency")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clip_jax.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument("--output", default="results/paper", help="directory for tables, figures and models")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (minutes; numbers mean nothing)")
    parser.add_argument(
        "--tasks",
        default="",
        help=f"comma-separated tasks instead of each command's default: {', '.join(DOWNSTREAM_TASKS)}",
    )
    parser.add_argument("--verbose", action="store_true", help="on failure, show the whole traceback")
    return parser.parse_args(argv)


def run(command: str, output: str, quick: bool = False, tasks: tuple[str, ...] = ()) -> list[str]:
    """Runs one command (or all, efficiency last) and returns the Markdown files written."""
    unknown = [task for task in tasks if task not in DOWNSTREAM_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {list(DOWNSTREAM_TASKS)}")
    # Before any model trains: results and models are written into it (and reused from it).
    paths.check_output(output, directory=True, replace=True, setting="--output")
    context = Context(output, Sizes.make(quick))
    written = []
    for name in ORDER if command == "all" else (command,):
        stop = timed(print, f"{name} took")
        path = COMMANDS[name](context, tasks or DEFAULT_TASKS[name])
        stop()
        print(f"wrote {path}")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    arguments = parse(sys.argv[1:] if argv is None else argv)
    tasks = tuple(task for task in arguments.tasks.split(",") if task)
    with one_line_errors(arguments.verbose):
        run(arguments.command, arguments.output, arguments.quick, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
