"""Train-step throughput of any training config: pairs/s, compile time and MFU.

    python bench/train_throughput.py --config configs/default.py
    python bench/train_throughput.py --config configs/vit_b32.py --config.global_batch_size=16 --steps=3
    python bench/train_throughput.py --config configs/vit_b32.py --config.model.overrides.dtype=float32 \
        --config.global_batch_size=8 --steps=3 --patch_dropout=0,0.5,0.75      # FLIP, side by side

Builds the config's model, sharded state and compiled step exactly as train.py does, feeds random
images and token ids (no data pipeline), and times `--steps` steps after `--warmup_steps`. MFU is
XLA's FLOP count of the compiled step over the step time and the device's peak: the bf16 table of
clip_jax.metrics on TPU/GPU, a float32 matmul measured in the same run on CPU.

`--patch_dropout=P1,P2,...` (FLIP, docs/training.md) compiles one step per value of
`model.vision.patch_dropout` and times them side by side in one process: after the warm-up, each
round runs one step of each variant in turn (one state passes through all of them: patch dropout
has no parameters), so slow phases of a shared machine fall on all alike; step times are medians,
and the table gives each variant's time relative to the first.
"""

from __future__ import annotations

import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from clip_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"),
    "Training config to benchmark.",
)  # fmt: skip
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps run after compiling.")
flags.DEFINE_list("patch_dropout", None, "Compare these model.vision.patch_dropout values (FLIP) side by side.")


def compare_patch_dropout(settings, model_config, mesh, state, shardings, batch, values: list[float]) -> None:
    """Time the step at each patch dropout value in turns, one step each per round; print a table."""
    import statistics

    import jax

    from clip_jax.models import CLIP
    from clip_jax.models.vit import kept_patches
    from clip_jax.training.setup import step_flops_per_device
    from clip_jax.training.step import make_train_step

    steps = {}
    for value in values:
        model = CLIP(model_config.replace(vision={"patch_dropout": value}))
        start = time.perf_counter()
        compiled = make_train_step(model, settings.step, mesh, shardings).lower(state, batch).compile()
        flops = step_flops_per_device(compiled, model, settings, mesh, state.tx)
        steps[value] = (compiled, time.perf_counter() - start, flops)
        print(f"patch_dropout {value}: compiled in {steps[value][1]:.1f} s", flush=True)
    times = {value: [] for value in values}
    for round_index in range(FLAGS.warmup_steps + FLAGS.steps):
        for value in values:
            start = time.perf_counter()
            state, step_metrics = steps[value][0](state, batch)
            jax.block_until_ready((state, step_metrics))
            if round_index >= FLAGS.warmup_steps:
                times[value].append(time.perf_counter() - start)
        if round_index >= FLAGS.warmup_steps:
            print("round " + ", ".join(f"p={value}: {times[value][-1]:.2f} s" for value in values), flush=True)
    patches = (model_config.vision.image_size // model_config.vision.patch_size) ** 2
    batch_size = settings.step.global_batch_size
    print(f"\nconfig: {settings.model.name}, dtype {model_config.dtype}, global batch {batch_size}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}; median of {FLAGS.steps} steps each")  # fmt: skip
    print("| patch_dropout | patches kept | step time | vs first | pairs/s | FLOPs per step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    first = statistics.median(times[values[0]])
    for value in values:
        median, flops = statistics.median(times[value]), steps[value][2]
        flops_text = "unknown" if flops is None else f"{flops * jax.device_count():.3g}"
        print(f"| {value} | {kept_patches(patches, value) if value else patches}/{patches} | {median:.2f} s | "
              f"{median / first:.2f}x | {batch_size / median:.2f} | {flops_text} |")  # fmt: skip


def main(argv: list[str]) -> None:
    del argv
    import dataclasses

    import jax
    import numpy as np

    from clip_jax import metrics, sharding
    from clip_jax.models import CLIP
    from clip_jax.training.config import validate
    from clip_jax.training.optimizer import make_optimizer
    from clip_jax.training.setup import step_flops_per_device
    from clip_jax.training.state import create_train_state
    from clip_jax.training.step import make_train_step

    config = FLAGS.config
    settings = validate(config)
    mesh = sharding.make_mesh(dataclasses.asdict(settings.mesh))
    global_batch_size = settings.step.global_batch_size
    sharding.check_batch_divisible(global_batch_size, mesh, settings.step.accumulation_steps)
    # The text tower's size as the run's tokenizer would set it, without training one.
    tokenizer = settings.tokenizer
    vocab_size = 49408 if tokenizer.kind == "clip" else tokenizer.vocab_size
    tokenizer_shape = types.SimpleNamespace(
        vocab_size=vocab_size,
        context_length=tokenizer.context_length,
        pooling="argmax" if tokenizer.kind == "clip" else "last",
        pad_token_id=0,
    )
    model_config = settings.model.model_config(tokenizer_shape)
    model = CLIP(model_config)
    state, state_shardings = create_train_state(model, make_optimizer(settings.optimizer), settings.seed, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    size, length = model_config.vision.image_size, model_config.text.context_length
    rng = np.random.default_rng(0)
    batch = {
        "images": jax.device_put(
            rng.standard_normal((global_batch_size, size, size, 3), dtype=np.float32), batch_sharding
        ),
        "texts": jax.device_put(
            rng.integers(1, vocab_size, (global_batch_size, length), dtype=np.int32), batch_sharding
        ),
    }
    if FLAGS.patch_dropout:
        compare_patch_dropout(
            settings, model_config, mesh, state, state_shardings, batch, [float(value) for value in FLAGS.patch_dropout]
        )
        return
    start = time.perf_counter()
    compiled = make_train_step(model, settings.step, mesh, state_shardings).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    for _ in range(FLAGS.warmup_steps):
        state, step_metrics = compiled(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, step_metrics = compiled(state, batch)
    jax.block_until_ready((state, step_metrics))
    step_seconds = (time.perf_counter() - start) / FLAGS.steps

    flops_per_device = step_flops_per_device(compiled, model, settings, mesh, state.tx)
    device = jax.devices()[0]
    peak = metrics.device_peak_flops(device)
    peak_source = "bf16 peak table"
    if peak is None and device.platform == "cpu":
        # Virtual CPU devices share the host's cores: each device's share of a measured matmul peak.
        peak = metrics.measure_matmul_peak_flops() / jax.local_device_count()
        peak_source = "float32 matmul measured now, divided over the virtual devices"
    mfu = metrics.model_flops_utilization(flops_per_device, step_seconds, peak)
    parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state.params))
    print(
        f"config: {settings.model.name}, {parameters / 1e6:.1f}M parameters, dtype {model_config.dtype}, "
        f"global batch {global_batch_size}, mesh {dict(mesh.shape)}"
    )
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform})")
    print(f"compile time: {compile_seconds:.1f} s")
    print(f"step time: {step_seconds * 1000:.1f} ms (mean of {FLAGS.steps} steps)")
    print(
        f"pairs/s: {global_batch_size / step_seconds:.1f} ({global_batch_size / step_seconds / jax.device_count():.1f} per device)"
    )
    if flops_per_device:
        print(f"FLOPs per step: {flops_per_device * jax.device_count():.3g} ({flops_per_device:.3g} per device)")
    print(
        f"MFU: {'unavailable' if mfu is None else f'{100 * mfu:.1f}%'}"
        + ("" if peak is None else f" of {peak:.3g} FLOP/s per device ({peak_source})")
    )
    print(f"final loss: {float(step_metrics['loss']):.4f}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
