"""Failures of the command lines are one line (`error: ...`, exit status 1) that names what is wrong,
found before anything is written or loaded; `--verbose` gives the traceback. A full disk during a
training save stops the run with that line, and the run resumes once there is space again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = [
    "--config.global_batch_size=16",
    "--config.eval.num_examples=0",
    "--config.tokenizer.training_captions=2000",
]


def _environment(cache_env: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        **(cache_env or {}),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }


def _run(arguments: list[str], cache_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *arguments], env=_environment(cache_env), cwd=REPO, capture_output=True, text=True, timeout=600
    )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_bad_shard_pattern_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "workdir"
    pattern = str(tmp_path / "missing" / "{00000..00003}.tar")
    result = _run(
        [
            "train.py",
            f"--workdir={workdir}",
            "--config.data.name=webdataset",
            f"--config.data.webdataset.shards={pattern}",
            *QUICK,
        ]
    )
    assert result.returncode == 1
    errors = _error_lines(result)
    assert len(errors) == 1 and "data.webdataset.shards" in errors[0] and "does not exist" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "cannot schedule new futures" not in result.stderr
    assert not workdir.exists()  # validated before the workdir, its lock or a checkpoint manager exist


def test_verbose_shows_the_traceback(tmp_path):
    pattern = str(tmp_path / "missing" / "*.tar")
    result = _run(
        ["train.py", f"--workdir={tmp_path / 'w'}", "--verbose", "--config.data.name=webdataset",
         f"--config.data.webdataset.shards={pattern}", *QUICK]
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "no file matches" in result.stderr


def test_unknown_evaluation_dataset_is_rejected_before_the_model_loads(tmp_path):
    # The checkpoint does not exist either: the dataset name must be the error reported.
    result = _run(
        ["evaluate.py", f"--checkpoint={tmp_path / 'nothing'}", "--datasets=imagenett", f"--output={tmp_path}"]
    )
    assert result.returncode == 1
    errors = _error_lines(result)
    assert len(errors) == 1 and "imagenett" in errors[0] and "unknown dataset" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_evaluation_dataset_in_the_training_config_is_rejected_before_anything_is_written(tmp_path):
    workdir = tmp_path / "workdir"
    result = _run(
        ["train.py", f"--workdir={workdir}", "--config.eval.datasets=synthetic,cifar1O", "--config.total_steps=2",
         "--config.global_batch_size=16", "--config.tokenizer.training_captions=2000"]
    )  # fmt: skip
    assert result.returncode == 1
    assert any("cifar1O" in line for line in _error_lines(result)), result.stderr
    assert not workdir.exists()


def test_config_mistakes_are_one_line_naming_the_field_or_the_file(tmp_path):
    """An unknown field with the default recipe (ml_collections fails while train.py is imported),
    a nested one after --config (it fails in absl's flag parsing) and a --config naming no file:
    one line each, the closest name offered. Other shapes of mistake, in-process."""
    from run_helpers import default_config

    from clip_jax import cli

    missing = tmp_path / "no_such_recipe.py"
    cases = {  # arguments -> what the one line must name
        ("--config.totl_steps=5",): ["--config.totl_steps", "config has no field 'totl_steps'", "total_steps"],
        ("--config=configs/default.py", "--config.data.webdatset.shards=x"): [
            "config.data",
            "'webdatset'",
            "webdataset",
        ],
        (f"--config={missing}",): [str(missing), "does not exist"],
    }
    environment = _environment()
    running = {
        arguments: subprocess.Popen(
            [sys.executable, "train.py", f"--workdir={tmp_path / 'workdir'}", *arguments],
            env=environment,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arguments in cases
    }
    for arguments, expected in cases.items():
        _, stderr = running[arguments].communicate(timeout=300)
        assert running[arguments].returncode == 1, (arguments, stderr[-3000:])
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (arguments, stderr[-3000:])
        assert all(part in lines[0] for part in expected), (arguments, lines[0], expected)
    assert not (tmp_path / "workdir").exists()

    config = default_config()
    message = cli.config_override_error(config, "config", "optimizer.learnig_rate")
    assert "config.optimizer has no field 'learnig_rate'" in message and "--config.optimizer.learning_rate" in message
    message = cli.config_override_error(config, "config", "tokenizer.kind.size")
    assert "config.tokenizer.kind is a str" in message and "not a group" in message
    assert cli.config_override_error(config, "config", "optimizer.learning_rate") is None


READ_ONLY_SCRIPT = textwrap.dedent(
    """
    set -u
    mount -t tmpfs -o ro,size=1m tmpfs "$MOUNT"
    "$PYTHON" evaluate.py --checkpoint="$OUT/no_model" --output="$MOUNT/results" --noplots 2> "$OUT/evaluate.err" &
    "$PYTHON" -m clip_jax.convert "$OUT/no_model.pt" "$MOUNT/converted" 2> "$OUT/convert.err" &
    "$PYTHON" -m clip_jax.experiments supervised --quick --output "$MOUNT/paper" 2> "$OUT/experiments.err" &
    mount -t tmpfs -o size=512k tmpfs "$FULL"                  # half the model's weights
    "$PYTHON" -m clip_jax.convert "$OUT/tiny.safetensors" "$FULL/converted" 2> "$OUT/full.err" &
    wait
    ls -A "$FULL" > "$OUT/full.ls"
    """
)


def _tiny_checkpoint(path: str) -> None:
    """An open_clip-layout safetensors file of the tiny ViT (1.1 MB of random weights)."""
    import jax
    import numpy as np
    from flax import linen as nn
    from safetensors.numpy import save_file

    from clip_jax import convert
    from clip_jax.models import CLIP, get_model_config

    config = get_model_config("tiny-vit")
    shapes = jax.eval_shape(lambda: nn.unbox(CLIP(config).init_variables(jax.random.key(0))))  # no compiling
    generator = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: generator.normal(size=leaf.shape).astype(np.float32), shapes)
    save_file(convert.variables_to_openclip(variables, config), path)


def test_outputs_on_a_read_only_or_full_disk_fail_in_one_line(tmp_path):
    """evaluate.py, the converter and the experiments write their output at the end: on a read-only
    filesystem (a mount namespace of its own, so that root is refused too) each stops at once with
    one line naming the output; the sources do not exist, so a check made after loading would name
    them. A conversion onto a full disk is one line too, without Orbax's logs, and leaves nothing."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "this test needs util-linux's unshare (a private mount namespace)"
    mount, full, out = tmp_path / "mount", tmp_path / "full", tmp_path / "out"
    for directory in (mount, full, out):
        directory.mkdir()
    _tiny_checkpoint(str(out / "tiny.safetensors"))
    script = tmp_path / "read_only.sh"
    script.write_text(READ_ONLY_SCRIPT)
    env = {**_environment(), "MOUNT": str(mount), "FULL": str(full), "OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run(
        [unshare, "--map-root-user", "--mount", "sh", str(script)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for command, output in (("evaluate", "results"), ("convert", "converted"), ("experiments", "paper")):
        lines = (out / f"{command}.err").read_text().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (command, lines)
        assert str(mount / output) in lines[0] and "Read-only file system" in lines[0], (command, lines)
        assert "no_model" not in lines[0], (command, lines)
    lines = (out / "full.err").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[:20]
    assert str(full / "converted") in lines[0] and "No space left on device" in lines[0], lines
    assert (out / "full.ls").read_text().split() == []  # no staging directory left behind


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    set -u
    mount -t tmpfs -o size=10m tmpfs "$MOUNT"
    head -c 3500000 /dev/zero > "$MOUNT/filler"      # leaves room for two checkpoints, not three
    "$PYTHON" train.py --workdir="$MOUNT/workdir" $FLAGS > "$OUT/first.out" 2> "$OUT/first.err"
    echo $? > "$OUT/first.rc"
    ls "$MOUNT/workdir/checkpoints" > "$OUT/first.ls"
    rm "$MOUNT/filler"                               # space again
    "$PYTHON" train.py --workdir="$MOUNT/workdir" $FLAGS > "$OUT/second.out" 2> "$OUT/second.err"
    echo $? > "$OUT/second.rc"
    ls "$MOUNT/workdir/checkpoints" > "$OUT/second.ls"
    """
)


def test_full_disk_during_a_save_stops_in_one_line_and_the_run_resumes(tmp_path, compilation_cache_env):
    """A real full disk: the workdir is on a 10 MB tmpfs in a private mount namespace (`unshare`)."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "this test needs util-linux's unshare (a private mount namespace for a small tmpfs)"
    mount, out = tmp_path / "mount", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    flags = " ".join(
        ["--config.total_steps=20", "--config.log_every_steps=5", "--config.checkpoint.every_steps=5",
         "--config.checkpoint.max_to_keep=2", *QUICK]
    )  # fmt: skip
    env = {
        **_environment(compilation_cache_env),
        "MOUNT": str(mount),
        "OUT": str(out),
        "PYTHON": sys.executable,
        "FLAGS": flags,
    }
    script = tmp_path / "full_disk.sh"
    script.write_text(FULL_DISK_SCRIPT)
    result = subprocess.run(
        [unshare, "--map-root-user", "--mount", "sh", str(script)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and (out / "second.rc").exists(), result.stderr[-3000:]
    first_err = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "1", first_err[-3000:]
    errors = [line for line in first_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, first_err[-3000:]
    assert "could not save the checkpoint of step 15" in errors[0] and "No space left on device" in errors[0]
    assert "newest complete checkpoint is step 10" in errors[0]
    assert "Traceback" not in first_err and len(first_err.splitlines()) < 10, first_err[-3000:]
    # Nothing half-written is listed as a checkpoint; the resumed run starts from 10 and finishes.
    assert [name for name in (out / "first.ls").read_text().split() if name.isdigit()] == ["10", "5"]
    second = (out / "second.out").read_text() + (out / "second.err").read_text()
    assert (out / "second.rc").read_text().strip() == "0", second[-3000:]
    assert "Resumed from the checkpoint of step 10" in second
    assert (out / "second.ls").read_text().split() == ["15", "20"]
