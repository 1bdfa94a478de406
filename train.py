"""Train a CLIP: `python train.py --config configs/NAME.py --workdir DIR [--config.FIELD=VALUE ...]`.

Only parses flags and starts JAX's distributed runtime; the work is
`clip_jax.training.loop.train_and_evaluate`. With no flags it trains the tiny default model on the
built-in synthetic dataset into ./workdir. Running the same command again resumes from the newest
checkpoint in the workdir. A failure is reported in one line (`error: ...`, exit status 1); pass
--verbose for the traceback.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """A Ctrl-C before training starts (imports take seconds): one line, not the traceback of
    whatever was being imported; nothing is trained yet, so nothing is lost. While it trains, the
    loop's own handler saves and stops (clip_jax.training.checkpointing.PreemptionWatcher)."""
    os.write(2, b"\nInterrupted (Ctrl-C) before training started: nothing to save\n")
    os._exit(128 + signal.SIGINT)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from absl import app, flags, logging  # noqa: E402  (after the handler: these imports take seconds)

from clip_jax import cli  # noqa: E402
from clip_jax.training.config import model_override_placeholders  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

FLAGS = flags.FLAGS
cli.define_config_flag(
    "config",
    _DEFAULT_CONFIG,
    "Training recipe: a Python file with get_config() (see configs/); any model field can be set, e.g. "
    "--config.model.overrides.decoder.layers=2.",
    complete=model_override_placeholders,
)
flags.DEFINE_string("workdir", "./workdir", "Directory (or gs:// path) for checkpoints, logs and the tokenizer.")
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (not needed on Cloud TPU or SLURM)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (with --coordinator_address).")
flags.DEFINE_bool("verbose", False, "On failure, show the whole traceback (and Orbax's logs), not one line.")


def _detected_cluster() -> str | None:
    """The name of a cluster whose environment jax.distributed.initialize() reads by itself."""
    if all(name in os.environ for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")):
        if int(os.environ["SLURM_NTASKS"]) > 1:
            return "SLURM"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU"
    if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "Cloud TPU VM"
    return None


def initialize_distributed() -> None:
    """Start jax.distributed from the flags, or by auto-detection on Cloud TPU and SLURM; a
    single-process run on one host starts nothing."""
    import jax

    explicit = {
        "coordinator_address": FLAGS.coordinator_address,
        "num_processes": FLAGS.num_processes,
        "process_id": FLAGS.process_id,
    }
    given = {name for name, value in explicit.items() if value is not None}
    if given and given != set(explicit):
        missing = sorted(set(explicit) - given)
        raise app.UsageError(f"--{' --'.join(sorted(given))} also need --{' --'.join(missing)}")
    if given:
        if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
            # Collectives between CPU processes (tests, debugging) go through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**explicit)
    else:
        cluster = _detected_cluster()
        if cluster is None:
            return
        logging.info("Detected %s: starting jax.distributed from the environment", cluster)
        jax.distributed.initialize()
    logging.info(
        "Process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count()
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # Orbax and JAX log every checkpoint write at INFO; the loop prints what matters.
        logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors(FLAGS.verbose):
        initialize_distributed()
        from clip_jax.training.loop import train_and_evaluate

        train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
