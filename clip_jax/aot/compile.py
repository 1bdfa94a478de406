"""Compile a run's train step (and its evaluation's embedding steps) for a target it is not running
on, and report what the compiler says: memory per chip, model FLOPs, collectives, compile time.

The step is built exactly as `train.py` builds it (clip_jax.training.setup): the settings from
`validate`, the mesh of `sharding.make_mesh` over the target's devices, the abstract sharded state
of `abstract_train_state`, `make_train_step` with the run's GradCache, FLIP (and its unmasked
step), EMA and loss, lowered on `abstract_batch`. Nothing is allocated or run: the devices are
libtpu's (or the CUDA plugin's) ahead-of-time topology, so this works on a machine with no
accelerator.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clip_jax import losses, metrics, sharding
from clip_jax import tokenizer as tokenizers
from clip_jax.aot import hlo
from clip_jax.aot.targets import Target
from clip_jax.evaluation import features
from clip_jax.models import CLIP
from clip_jax.training.config import Settings, TokenizerSettings, validate
from clip_jax.training.optimizer import make_optimizer
from clip_jax.training.setup import abstract_batch, step_flops_per_device, unmasked_tuning_model
from clip_jax.training.state import abstract_train_state
from clip_jax.training.step import make_train_step

GB = 1e9
# XLA's message when a program does not fit, e.g. "... the total memory required for HLO
# temporaries (25.14G) exceeds available HBM (15.75G)" or "Used 25.14G of 15.75G hbm".
_SIZE = r"([\d.]+)\s*([KMGT])i?B?"
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class Memory:
    """Bytes per chip of one compiled program (XLA's memory analysis)."""

    arguments: int  # every input: for the train step, the state and the batch
    temporaries: int
    outputs: int  # outputs that do not reuse an input's buffer (donated state is reused)
    generated_code: int

    @property
    def peak(self) -> int:
        return self.arguments + self.temporaries + self.outputs + self.generated_code


@dataclasses.dataclass
class Report:
    """What one compile says about a configuration on a target (`fits` False: `shortfall` says why)."""

    config: str
    target: str
    chips: int
    num_slices: int
    mesh: dict[str, int]
    global_batch_size: int
    pairs_per_chip: int
    accumulation_steps: int
    remat_policy: str
    capacity_bytes: int  # the chip's HBM, or the budget asked for
    state_bytes: int  # the train state's shard on one chip (parameters, optimizer, EMA, statistics)
    fits: bool
    memory: Memory | None = None  # None when the compiler refused the program
    required_bytes: int | None = None  # what the compiler said it needs, when it refused
    available_bytes: int | None = None  # what the compiler said is available, when it refused
    flops_per_chip: float | None = None  # model FLOPs of one step on one chip (as the MFU counts them)
    peak_flops_per_chip: float | None = None
    collectives: list[hlo.Collective] = dataclasses.field(default_factory=list)
    eval_memory: dict[str, Memory] = dataclasses.field(default_factory=dict)  # "images", "texts"
    eval_batch_size: int = 0
    compile_seconds: float = 0.0

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.memory is None else self.capacity_bytes - self.memory.peak

    def shortfall(self) -> str:
        """One line: by how much the step misses the chip's memory."""
        needed = self.memory.peak if self.memory is not None else self.required_bytes
        available = self.available_bytes or self.capacity_bytes
        what = "per chip" if self.memory is not None else "of temporaries per chip"
        return (
            f"does not fit: {self.config} at {self.pairs_per_chip} pairs per chip on {self.target} needs "
            f"{needed / GB:.2f} GB {what}, the chip has {available / GB:.2f} GB: over by "
            f"{(needed - available) / GB:.2f} GB; try --fit"
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["headroom_bytes"] = self.headroom_bytes
        data["peak_bytes"] = None if self.memory is None else self.memory.peak
        data["collectives_by_kind"] = hlo.summarize(self.collectives)
        return data


def tokenizer_shape(settings: TokenizerSettings) -> Any:
    """What the model needs of the run's tokenizer (vocabulary size, context length, pooling, pad id),
    without training a SentencePiece model: the configured vocabulary size is the largest the
    trained one can have, and CLIP's BPE is read from its file."""
    if settings.kind == "clip":
        return tokenizers.ClipTokenizer(context_length=settings.context_length)
    # train_sentencepiece's ids: pad 0, unk 1, eos 2; pooled as SentencePieceTokenizer's rows are.
    return _TokenizerShape(settings.vocab_size, settings.context_length, tokenizers.SentencePieceTokenizer.pooling, 0)


@dataclasses.dataclass(frozen=True)
class _TokenizerShape:
    vocab_size: int
    context_length: int
    pooling: str
    pad_token_id: int


def compile_run(
    config: ml_collections.ConfigDict,
    target: Target,
    num_slices: int = 1,
    name: str = "",
    evaluation: bool = True,
    memory_bytes: int | None = None,
) -> Report:
    """Compile `config`'s train step for `num_slices` slices of `target` and report on it.
    `memory_bytes`: the memory a chip may use, if less than its HBM (a budget of your own)."""
    devices = target.devices(num_slices)
    settings = validate(config, process_count=len({device.process_index for device in devices}))
    mesh = sharding.make_mesh(dataclasses.asdict(settings.mesh), devices)
    sharding.check_batch_divisible(settings.step.global_batch_size, mesh, settings.step.accumulation_steps)
    model_config = settings.model.model_config(tokenizer_shape(settings.tokenizer))
    model = CLIP(model_config)
    report = Report(
        config=name or settings.model.name,
        target=target.describe(num_slices),
        chips=len(devices),
        num_slices=num_slices,
        mesh=dict(mesh.shape),
        global_batch_size=settings.step.global_batch_size,
        pairs_per_chip=settings.step.global_batch_size // len(devices),
        accumulation_steps=settings.step.accumulation_steps,
        remat_policy=model_config.remat_policy,
        capacity_bytes=memory_bytes or target.memory_bytes,
        state_bytes=0,
        fits=False,
        peak_flops_per_chip=metrics.device_peak_flops(devices[0]),
    )
    tx = make_optimizer(settings.optimizer)
    state, state_shardings = abstract_train_state(model, tx, settings.seed, mesh, settings.ema.enabled)
    report.state_bytes = _bytes_per_chip(state)
    batch = abstract_batch(settings, model_config, mesh)
    started = time.perf_counter()
    steps = [model] + [m for m in [unmasked_tuning_model(settings, model)] if m is not None]
    compiled = None
    for step_model in steps:  # FLIP's unmasked step is larger: both must fit
        try:
            compiled_step = (
                make_train_step(step_model, settings.step, mesh, state_shardings).lower(state, batch).compile()
            )
        except jax.errors.JaxRuntimeError as error:
            if not _record_out_of_memory(report, error):
                raise
            report.compile_seconds = time.perf_counter() - started
            return report
        report.memory = _larger(report.memory, _memory(compiled_step))
        compiled = compiled if compiled is not None else compiled_step
        report.collectives = report.collectives or hlo.collectives(
            compiled_step.as_text(), len(devices) // num_slices, num_slices
        )
    report.compile_seconds = time.perf_counter() - started
    one_cpu = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1, "dcn_data": 1}, jax.devices("cpu")[:1])
    report.flops_per_chip = step_flops_per_device(compiled, model, settings, mesh, tx, lowering_mesh=one_cpu)
    report.fits = report.memory.peak <= report.capacity_bytes
    if evaluation:
        report.eval_batch_size, report.eval_memory = _compile_evaluation(settings, model, mesh, state)
    return report


def _memory(compiled: Any) -> Memory:
    analysis = compiled.memory_analysis()
    return Memory(
        arguments=int(analysis.argument_size_in_bytes),
        temporaries=int(analysis.temp_size_in_bytes),
        outputs=int(analysis.output_size_in_bytes - analysis.alias_size_in_bytes),
        generated_code=int(analysis.generated_code_size_in_bytes),
    )


def _larger(first: Memory | None, second: Memory) -> Memory:
    return second if first is None or second.peak > first.peak else first


def _bytes_per_chip(tree: Any) -> int:
    """Bytes of the shard of `tree` (ShapeDtypeStructs with shardings) that the first device holds."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _record_out_of_memory(report: Report, error: Exception) -> bool:
    """Fill `report` from the compiler's out-of-memory error; False if `error` is another failure."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return False
    sizes = [float(value) * _UNITS[unit] for value, unit in re.findall(_SIZE, text)]
    required = re.search(r"required for [^(]*\(" + _SIZE + r"\)", text) or re.search(r"Used " + _SIZE, text)
    available = re.search(r"available [^(]*\(" + _SIZE + r"\)", text) or re.search(r"of " + _SIZE + r" hbm", text)
    report.required_bytes = int(float(required.group(1)) * _UNITS[required.group(2)]) if required else None
    report.available_bytes = int(float(available.group(1)) * _UNITS[available.group(2)]) if available else None
    if report.required_bytes is None and sizes:
        report.required_bytes = int(max(sizes))
    report.fits = False
    return True


def _compile_evaluation(settings: Settings, model: CLIP, mesh: jax.sharding.Mesh, state: Any) -> tuple[int, dict]:
    """(batch size, {"images", "texts": Memory}) of the embedding steps that evaluation during
    training runs (clip_jax.evaluation.features.Encoder on the training mesh)."""
    requested = settings.eval.suite.batch_size if settings.eval.suite is not None else features.DEFAULT_BATCH_SIZE
    shards = sharding.batch_axis_size(mesh)
    batch_size = -(-requested // shards) * shards  # as Encoder rounds it
    batch_sharding = sharding.batch_sharding(mesh)
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    size, length = model.config.vision.image_size, model.config.text.context_length
    inputs = {
        "images": (
            features.embed_images,
            jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32, sharding=batch_sharding),
        ),
        "texts": (features.embed_texts, jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=batch_sharding)),
    }
    memory = {}
    for name, (function, batch) in inputs.items():
        compiled = function.lower(model, variables, batch).compile()
        memory[name] = _memory(compiled)
    return batch_size, memory


def format_report(report: Report) -> str:
    """The report as a person reads it: a line a subject."""
    mesh = " ".join(f"{axis}={size}" for axis, size in report.mesh.items())
    if report.num_slices > 1:
        mesh += f" (data spans {report.num_slices} slices over the data-centre network)"
    lines = [
        f"{report.config} on {report.target}",
        f"  mesh          {mesh}",
        f"  batch         {report.global_batch_size:,} global, {report.pairs_per_chip} pairs per chip, "
        f"{report.accumulation_steps} micro-batch(es), remat {report.remat_policy}",
    ]
    capacity = format_bytes(report.capacity_bytes)
    if report.memory is None:
        lines.append(
            f"  memory/chip   the compiler refused: {format_bytes(report.required_bytes)} of temporaries needed, "
            f"{format_bytes(report.available_bytes or report.capacity_bytes)} available of {capacity}"
        )
    else:
        memory = report.memory
        lines += [
            f"  memory/chip   state {format_bytes(report.state_bytes)} | arguments {format_bytes(memory.arguments)} | temporaries "
            f"{format_bytes(memory.temporaries)} | outputs {format_bytes(memory.outputs)} | code {format_bytes(memory.generated_code)}",
            f"                peak {format_bytes(memory.peak)} of {capacity}: {100 * memory.peak / report.capacity_bytes:.0f}% "
            f"used, headroom {format_bytes(report.headroom_bytes)}",
        ]
    for name, memory in report.eval_memory.items():
        lines.append(f"  eval {name:<8} {format_bytes(memory.peak)} per chip at batch {report.eval_batch_size}")
    if report.flops_per_chip is not None:
        line = f"  model FLOPs   {report.flops_per_chip:.3g} per chip per step"
        if report.peak_flops_per_chip:
            line += f"; {report.flops_per_chip / report.peak_flops_per_chip:.3g} s per step at 100% MFU"
        lines.append(line)
    if report.collectives:
        lines.append("  collectives   kind                 group  slices   per step   bytes per step")
        for entry in report.collectives:
            network = "across" if entry.crosses_slices else "within"
            lines.append(
                f"                {entry.kind:<20} {entry.group_size:>5}  {network:<7}  {entry.count:>8}   {format_bytes(entry.bytes)}"
            )
    lines.append(f"  compiled in   {report.compile_seconds:.1f} s")
    return "\n".join(lines)


def format_bytes(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1e6:.1f} MB" if abs(value) < GB else f"{value / GB:.2f} GB"


def compile_loss(target: Target, global_batch_size: int, embed_dim: int, loss: str, impl: str) -> Memory:
    """Per-chip memory of the contrastive loss and its gradient alone, the batch split over every
    chip of `target`: float32 (global_batch_size, embed_dim) embeddings, as the step hands them over."""
    devices = target.devices()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1}, devices)
    loss_fn = losses.make_sharded_loss_fn(mesh, sharding.BATCH_AXES, loss=loss, impl=impl)
    rows = jax.ShapeDtypeStruct((global_batch_size, embed_dim), jnp.float32, sharding=sharding.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    gradient = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
    return _memory(gradient.lower(rows, rows, scalar, scalar).compile())
