"""`python -m clip_jax.aot --config configs/X.py --topology v5e-256 [--num_slices N] [--fit]
[--json FILE] [--config.FIELD=VALUE ...]`, or `--recipes [--write_docs]`.

Compiles the run's train step and evaluation steps for a TPU slice (or GPU hosts) on any machine,
no accelerator needed, and prints the per-chip memory against the chip's, the model FLOPs, the
collectives and the compile time. A configuration that does not fit exits with status 1 and one
line saying by how much; `--fit` then searches for one that does (docs/tpu.md, "Before you book a
slice").
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging

from clip_jax import cli
from clip_jax.aot import compile as aot_compile
from clip_jax.aot import fit, recipes
from clip_jax.aot.targets import compile_only_environment, parse_target

FLAGS = flags.FLAGS
cli.define_config_flag("config", None, "Training recipe: a Python file with get_config() (configs/).")
flags.DEFINE_string("topology", None, "Target: a TPU slice (v5e-256, v4-512, v4:4x4x4) or GPU hosts (8xh100).")
flags.DEFINE_integer("num_slices", 1, "Slices of a multislice job (the data axis spans them; mesh.dcn_data).")
flags.DEFINE_bool("fit", False, "Search micro-batches, remat policy and fsdp for the cheapest configuration that fits.")
flags.DEFINE_bool("recipes", False, "Compile every recipe in configs/ for the slice its docstring names.")
flags.DEFINE_string("write_docs", None, "With --recipes: write the table into this Markdown file (docs/tpu.md).")
flags.DEFINE_float(
    "memory_gb", None, "Count a configuration as fitting only within this many GB per chip (default: its HBM)."
)
flags.DEFINE_bool("evaluation", True, "Also compile the evaluation's embedding steps.")
flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
flags.DEFINE_bool("verbose", False, "On failure, show the whole traceback, not one line.")


class DoesNotFit(ValueError):
    """The configuration needs more memory than the chip has: its one line, exit status 1."""

    exit_code = 1


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    with cli.one_line_errors(FLAGS.verbose):
        if FLAGS.recipes:
            rows = recipes.compile_recipes(log=_say)
            ring = recipes.ring_claim(log=_say)
            print(recipes.table(rows) + "\n\n" + recipes.ring_table(ring))
            if FLAGS.write_docs:
                recipes.write_table(FLAGS.write_docs, rows, ring)
            _write_json({"recipes": [row.to_json() for row in rows], "ring_claim": ring})
            return
        if FLAGS.config is None or FLAGS.topology is None:
            raise app.UsageError("--config and --topology are required (or --recipes)")
        target = parse_target(FLAGS.topology)
        memory_bytes = None if FLAGS.memory_gb is None else int(FLAGS.memory_gb * 1e9)
        name = os.path.relpath(FLAGS["config"].config_filename) if FLAGS["config"].config_filename else ""
        if FLAGS.fit:
            report, overrides = fit.search(FLAGS.config, target, FLAGS.num_slices, name, _say, memory_bytes)
            print(aot_compile.format_report(report))
            print(f"fits with: {' '.join(overrides) if overrides else '(the configuration as given)'}")
        else:
            report = aot_compile.compile_run(
                FLAGS.config, target, FLAGS.num_slices, name, FLAGS.evaluation, memory_bytes
            )
            print(aot_compile.format_report(report))
        _write_json(report.to_json())
        if not report.fits:
            raise DoesNotFit(report.shortfall())


def _say(line: str) -> None:
    print(line, flush=True)


def _write_json(data: object) -> None:
    if FLAGS.json:
        with open(FLAGS.json, "w") as file:
            json.dump(data, file, indent=2, default=str)


if __name__ == "__main__":
    if not os.environ.get("JAX_PLATFORMS"):  # the target's devices are abstract: nothing runs on them
        jax.config.update("jax_platforms", "cpu")
    compile_only_environment()  # before jax loads libtpu
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
