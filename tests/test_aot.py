"""clip_jax.aot: a run's train step compiled for TPU slices by libtpu on this CPU-only machine.

Tiny models only: a compile for v5e:2x2, for v4:2x2x1 (megacore: one JAX device per chip) and for
two v5e:2x2 slices; the HLO reader on hand-written programs; the command line's exit status for a
configuration that fits, one that does not, and `--fit`, whose answer is then compiled again to
check that it fits; and every recipe's docstring against its own batch size."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from clip_jax.aot import hlo, recipes
from clip_jax.aot.compile import compile_run
from clip_jax.aot.targets import default_grid, parse_target
from clip_jax.models import CLIP
from clip_jax.training.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
    config = base_config()
    config.model.name = "tiny-vit"
    config.global_batch_size = 64
    config.optimizer.warmup_steps = 10
    config.tokenizer.vocab_size = 256
    return config


@functools.cache
def tiny_report(topology: str, num_slices: int):
    return compile_run(tiny_config(), parse_target(topology), num_slices)


@pytest.mark.parametrize(("topology", "num_slices"), [("v5e:2x2", 1), ("v4:2x2x1", 1), ("v5e:2x2", 2)])
def test_a_tiny_model_compiles_for_tpu_slices(topology, num_slices):
    report = tiny_report(topology, num_slices)
    chips = 4 * num_slices
    assert report.fits and report.chips == chips and report.pairs_per_chip == 64 // chips
    assert report.mesh == {"data": chips, "fsdp": 1, "model": 1}
    # Pure data parallelism: every chip holds the whole state, parameters and Adam's two moments.
    params = jax.eval_shape(CLIP(parse_model()).init_variables, jax.random.key(0))["params"]
    param_bytes = sum(math.prod(leaf.shape) * 4 for leaf in jax.tree.leaves(params))
    assert 3 * param_bytes <= report.state_bytes <= 3 * param_bytes + 4096
    memory = report.memory
    assert memory.arguments >= report.state_bytes and memory.temporaries > 0
    assert 0 < memory.peak < report.capacity_bytes == {"v5e": 16, "v4": 32}[topology[:3].rstrip(":")] * 2**30
    assert set(report.eval_memory) == {"images", "texts"} and report.eval_batch_size % chips == 0
    assert report.flops_per_chip > 0
    inside = [entry for entry in report.collectives if not entry.crosses_slices]
    crossing = [entry for entry in report.collectives if entry.crosses_slices]
    # The gradients are reduced over the slice's 4 chips; the loss gathers the embeddings.
    assert any(entry.kind == "all-reduce" and entry.group_size == 4 for entry in inside)
    if num_slices == 1:
        assert not crossing
    else:  # the data axis spans the slices: gradients and embeddings cross the data-centre network
        assert {entry.kind for entry in crossing} >= {"all-reduce", "all-gather"}
        assert all(entry.group_size == 2 and entry.count > 0 and entry.bytes > 0 for entry in crossing)


def parse_model():
    from clip_jax.aot.compile import tokenizer_shape
    from clip_jax.training.config import validate

    settings = validate(tiny_config(), process_count=1)
    return settings.model.model_config(tokenizer_shape(settings.tokenizer))


def test_model_flops_per_chip_are_the_whole_steps_divided_by_the_chips():
    """Counted on the TPU program, against the same step compiled for one CPU device."""
    from clip_jax import metrics, sharding
    from clip_jax.training.config import validate
    from clip_jax.training.optimizer import make_optimizer
    from clip_jax.training.setup import abstract_batch
    from clip_jax.training.state import abstract_train_state
    from clip_jax.training.step import make_train_step

    report = tiny_report("v5e:2x2", 1)
    settings = validate(tiny_config(), process_count=1)
    model = CLIP(parse_model())
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    state, shardings = abstract_train_state(model, make_optimizer(settings.optimizer), 0, mesh)
    compiled = (
        make_train_step(model, settings.step, mesh, shardings)
        .lower(state, abstract_batch(settings, model.config, mesh))
        .compile()
    )
    whole = metrics.compiled_flops(compiled)
    assert report.flops_per_chip == pytest.approx(whole / 4, rel=0.05)


# ---- the HLO reader, on programs written by hand in XLA's text format -------------------------

LOOP_PROGRAM = """HloModule m, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[], f32[256]{0}) parameter(0)
  %limit = s32[]{:T(128)} constant(5)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %r = f32[256]{0} all-reduce(%x), channel_id=1, replica_groups=[1,4]<=[4], use_global_device_ids=true, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[256]{0}) tuple(%i, %r)
}

ENTRY %main (x: f32[256], y: bf16[64,8]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  %y = bf16[64,8]{1,0} parameter(1)
  %z = f32[16]{0} parameter(2)
  %both = (bf16[64,8]{1,0}, f32[16]{0}) all-reduce(%y, %z), channel_id=2, replica_groups={{0,1},{2,3}}, to_apply=%add
  %g = bf16[256,8]{1,0} all-gather(%y), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, dimensions={0}
  %token = token[] after-all()
  %s = (f32[256]{0}, u32[], token[]) send(%x, %token), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.7_0"}
  %c = s32[] constant(0)
  %init = (s32[], f32[256]{0}) tuple(%c, %x)
  %w = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[256]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_iterations_combined_buffers_and_slice_crossings():
    found = {
        (entry.kind, entry.group_size, entry.crosses_slices): entry for entry in hlo.collectives(LOOP_PROGRAM, 4, 2)
    }
    loop = found[("all-reduce", 4, False)]
    assert (loop.count, loop.bytes) == (5, 5 * 256 * 4)  # once per iteration of the 5-step loop
    combined = found[("all-reduce", 2, False)]
    assert (combined.count, combined.bytes) == (1, 64 * 8 * 2 + 16 * 4)  # the tuple's arrays summed
    gathered = found[("all-gather", 4, False)]
    assert (gathered.count, gathered.bytes) == (1, 256 * 8 * 2)  # the gathered result
    crossing = found[("all-reduce", 2, True)]
    assert (crossing.count, crossing.bytes) == (1, 256 * 4 + 4)  # the send to the other slice
    totals = hlo.summarize(found.values())
    assert totals["all-reduce"]["count"] == 7 and totals["all-reduce"]["cross_slice_count"] == 1


def test_device_groups_in_every_format_xla_writes():
    assert hlo._groups("replica_groups={{0,2},{1,3}}, x") == [[0, 2], [1, 3]]
    assert hlo._groups("replica_groups=[2,2]<=[4]") == [[0, 1], [2, 3]]
    assert hlo._groups("replica_groups=[2,2]<=[2,2]T(1,0)") == [[0, 2], [1, 3]]
    assert hlo._groups("replica_groups=mesh['a'=2,'b'=2] {'a'}") == [[0, 2], [1, 3]]
    assert hlo._groups("replica_groups=mesh['a'=2,'b'=2] {'b'}") == [[0, 1], [2, 3]]
    assert hlo._groups("source_target_pairs={{0,1},{1,0}}") == [[0, 1], [1, 0]]


# ---- targets ---------------------------------------------------------------------------------


def test_targets_follow_cloud_tpu_accelerator_types():
    # Cloud TPU's documented slice shapes; v4 and v5p name TensorCores (2 per chip).
    expected = {"v4-8": (2, 2, 1), "v4-32": (2, 2, 4), "v4-128": (4, 4, 4), "v4-512": (4, 8, 8), "v5p-1024": (8, 8, 8),
                "v5e-8": (2, 4), "v5e-16": (4, 4), "v5e-32": (4, 8), "v5e-256": (16, 16), "v6e-64": (8, 8)}  # fmt: skip
    for name, grid in expected.items():
        target = parse_target(name)
        assert target.grid == grid and target.chips == math.prod(grid), name
    assert parse_target("v4:4x4x4").chips == 64 and parse_target("8xh100").chips == 8
    assert default_grid(2048, 3) == (8, 16, 16)
    for bad, message in [("v9-8", "unknown target"), ("v4-12", "power of two"), ("v5e:4x4x4", "2-D chip grid")]:
        with pytest.raises(ValueError, match=message):
            parse_target(bad)


# ---- the command line ------------------------------------------------------------------------

# 784 patches per image: activations, not weights, fill the chip. At 2,048 pairs per chip the
# compiler refuses the step (about 47 GB of temporaries on a 16 GiB v5e chip); at 32 it fits in
# about 0.7 GB, which --fit is asked to bring under a 0.6 GB budget (--memory_gb).
WIDE_CONFIG = """
from clip_jax.training.config import base_config


def get_config():
    config = base_config()
    config.model.name = "tiny-vit"
    config.model.overrides.vision.image_size = 224
    config.global_batch_size = 128
    config.optimizer.warmup_steps = 10
    return config
"""


def run_aot(*args: str, cache: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(cache or {})}
    env["XLA_FLAGS"] = ""  # one CPU device is all the tool uses
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.aot", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "wide.py"
    path.write_text(WIDE_CONFIG)
    return str(path)


def test_a_configuration_that_fits_exits_0_with_its_report(tmp_path):
    json_path = tmp_path / "report.json"
    result = run_aot("--config=configs/default.py", "--topology=v5e:2x2", "--config.global_batch_size=64",
                     f"--json={json_path}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for part in ("4 chips", "16 pairs per chip", "peak", "headroom", "model FLOPs", "all-reduce", "eval images"):
        assert part in result.stdout, part
    report = json.loads(json_path.read_text())
    assert report["fits"] and report["peak_bytes"] < report["capacity_bytes"] and report["collectives_by_kind"]
    assert not result.stderr.strip(), result.stderr[-2000:]  # libtpu's warnings quieted, nothing else said


def test_the_compilers_out_of_memory_is_one_line_and_exit_1(wide_config):
    refused = run_aot(
        f"--config={wide_config}", "--topology=v5e:2x2", "--noevaluation", "--config.global_batch_size=8192"
    )
    assert refused.returncode == 1
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, refused.stderr[-3000:]
    assert "does not fit" in lines[0] and "2048 pairs per chip" in lines[0] and "over by" in lines[0]
    needed, available = (float(value) for value in re.findall(r"([\d.]+) GB", lines[0])[:2])
    # What the compiler said: more than it can give, which is a little under the chip's 16 GiB.
    assert needed > 17.18 > available > 16


def test_fit_finds_a_configuration_that_fits_and_prints_its_flags(wide_config):
    searched = run_aot(f"--config={wide_config}", "--topology=v5e:2x2", "--memory_gb=0.6", "--fit")
    assert searched.returncode == 0, searched.stderr[-3000:]
    steps = [line for line in searched.stdout.splitlines() if line.startswith("fit: ")]
    assert steps[0].startswith("fit: as given: does not fit, peak") and steps[-1].split(": ")[2].startswith("fits")
    assert all("does not fit" in step for step in steps[:-1])
    peak, budget = (float(value) for value in re.findall(r"peak ([\d.]+) MB of ([\d.]+) MB", steps[-1])[0])
    assert peak <= budget == 600.0
    answer = [line for line in searched.stdout.splitlines() if line.startswith("fits with: ")]
    assert len(answer) == 1 and "--config." in answer[0]
    # Each flag names a field of the recipe and sets it to what the report of the answer says.
    found = re.search(r"(\d+) micro-batch\(es\), remat (\w+)", searched.stdout)
    fsdp = re.search(r"mesh +data=\d+ fsdp=(\d+)", searched.stdout).group(1)
    reported = {"accumulation_steps": found.group(1), "model.overrides.remat_policy": found.group(2),
                "mesh.fsdp": fsdp, "mesh.data": "-1"}  # fmt: skip
    _, config = recipes.load_recipe(wide_config)
    for flag in answer[0].removeprefix("fits with: ").split():
        field, value = flag.removeprefix("--config.").split("=")
        node = config
        for part in field.split(".")[:-1]:
            node = node[part]
        assert field.split(".")[-1] in node and reported[field] == value, flag


# ---- the recipes -----------------------------------------------------------------------------


def test_every_recipe_names_a_slice_that_matches_its_batch(tmp_path):
    claims = {
        os.path.basename(path): recipes.claim(path)
        for path in sorted(os.listdir(recipes.CONFIGS))
        for path in [os.path.join(recipes.CONFIGS, path)]
        if path.endswith(".py")
    }
    assert claims.pop("default.py").slice is None  # the laptop recipe
    assert claims and all(claim.slice for claim in claims.values())
    for name, claim in claims.items():
        _, config = recipes.load_recipe(os.path.join(recipes.CONFIGS, name))
        chips = parse_target(claim.slice).chips
        if claim.pairs_per_chip is not None:
            assert claim.pairs_per_chip * chips == config.global_batch_size, name
        assert config.global_batch_size % chips == 0, name
    page = tmp_path / "tpu.md"
    page.write_text(f"# title\n\n{recipes.BEGIN}\nold table\n{recipes.END}\n\nafter\n")
    report = tiny_report("v5e:2x2", 1)
    recipes.write_table(str(page), [report])
    text = page.read_text()
    assert "old table" not in text and "| recipe | slice |" in text and text.endswith("after\n")
    row = next(line for line in text.splitlines() if line.startswith("| tiny-vit |"))
    assert f"| {report.pairs_per_chip} | 1 | {report.state_bytes / 1e9:.2f} GB |" in row
    assert np.all([text.count(marker) == 1 for marker in (recipes.BEGIN, recipes.END)])
