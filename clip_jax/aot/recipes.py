"""`--recipes`: every recipe in configs/ compiled for the TPU slice its docstring names ("sized for
a Cloud TPU v4-512 slice (256 chips, 128 pairs per chip ...)"), and the table of what the compiler
says, written into docs/tpu.md between two marker lines."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from collections.abc import Callable

from clip_jax.aot.compile import GB, Memory, Report, compile_loss, compile_run, format_bytes
from clip_jax.aot.targets import parse_target

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
BEGIN, END = (
    "<!-- recipes table: python -m clip_jax.aot --recipes --write_docs docs/tpu.md -->",
    "<!-- end of recipes table -->",
)


@dataclasses.dataclass
class Claim:
    """What a recipe's docstring says it is sized for."""

    recipe: str  # file name, e.g. vit_b16.py
    slice: str | None  # e.g. v4-512; None: not a TPU recipe (the laptop default)
    pairs_per_chip: int | None


def load_recipe(path: str):  # -> (module, config)
    spec = importlib.util.spec_from_file_location(f"recipe_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config()


def claim(path: str) -> Claim:
    """The slice and pairs per chip `path`'s docstring names; "as vit_b16.py" follows that recipe."""
    module, _ = load_recipe(path)
    text = " ".join((module.__doc__ or "").split())
    hardware = text.split("Hardware:", 1)[-1]
    named = re.search(r"Cloud TPU (v\d+[a-z]?-\d+) slice", hardware)
    pairs = re.search(r"(\d[\d,]*) pairs per chip", hardware)
    if named:
        return Claim(os.path.basename(path), named.group(1), int(pairs.group(1).replace(",", "")) if pairs else None)
    same_as = re.search(r"\bas (?:configs/)?(\w+\.py)", hardware)
    if same_as:
        inherited = claim(os.path.join(os.path.dirname(path), same_as.group(1)))
        return dataclasses.replace(inherited, recipe=os.path.basename(path))
    return Claim(os.path.basename(path), None, None)


def compile_recipes(directory: str = CONFIGS, log: Callable[[str], None] = print) -> list[Report]:
    """A report for each recipe that names a TPU slice, compiled at the batch the recipe sets."""
    reports = []
    for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
        stated = claim(path)
        if stated.slice is None:
            log(f"recipes: {stated.recipe}: names no TPU slice, not compiled")
            continue
        _, config = load_recipe(path)
        target = parse_target(stated.slice)
        if stated.pairs_per_chip is not None and stated.pairs_per_chip * target.chips != config.global_batch_size:
            raise ValueError(
                f"{stated.recipe}: its docstring says {stated.pairs_per_chip} pairs per chip on {stated.slice} "
                f"({target.chips} chips) but global_batch_size is {config.global_batch_size}"
            )
        report = compile_run(config, target, name=stated.recipe)
        log(
            f"recipes: {stated.recipe} on {stated.slice}: {'fits' if report.fits else 'DOES NOT FIT'} ({report.compile_seconds:.0f} s)"
        )
        reports.append(report)
    return reports


def table(reports: list[Report]) -> str:
    lines = [
        "| recipe | slice | mesh | pairs per chip | micro-batches | state | temporaries | peak per chip | chip | headroom | model TFLOPs per chip and step | compile |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for report in reports:
        mesh = " x ".join(f"{axis} {size}" for axis, size in report.mesh.items() if size > 1) or "1 chip"
        memory = report.memory
        cells = (
            [f"{report.state_bytes / GB:.2f} GB", f"{memory.temporaries / GB:.2f} GB", f"{memory.peak / GB:.2f} GB"]
            if memory is not None
            else ["?", f"{(report.required_bytes or 0) / GB:.2f} GB (refused)", "does not fit"]
        )
        headroom = "—" if report.headroom_bytes is None else f"{report.headroom_bytes / GB:.2f} GB"
        flops = "—" if report.flops_per_chip is None else f"{report.flops_per_chip / 1e12:.1f}"
        lines.append(
            f"| {report.config} | {report.target.split(' (')[0].removeprefix('TPU ')} | {mesh} | {report.pairs_per_chip} | "
            f"{report.accumulation_steps} | {' | '.join(cells)} | {report.capacity_bytes / GB:.1f} GB | {headroom} | "
            f"{flops} | {report.compile_seconds:.0f} s |"
        )
    return "\n".join(lines)


def write_table(path: str, reports: list[Report], ring: dict[str, Memory] | None = None) -> None:
    """Replace the tables between BEGIN and END in `path` (appended at the end the first time)."""
    with open(path) as file:
        text = file.read()
    tables = table(reports) + (f"\n\n{ring_table(ring)}" if ring else "")
    block = f"{BEGIN}\n\n{tables}\n\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path + ".partial", "w") as file:
        file.write(text)
    os.replace(path + ".partial", path)


# The ring loss's claim (docs/performance.md, "Contrastive-loss memory"): at a million pairs the
# all_gather loss cannot fit a chip and the ring's working set stays that of the local batch.
RING_CLAIM = {"target": "v4-2048", "global_batch_size": 1_048_576, "embed_dim": 512, "loss": "softmax"}


def ring_claim(log: Callable[[str], None] = print) -> dict[str, Memory]:
    """{impl: per-chip memory of the softmax loss and its gradient} at RING_CLAIM's size."""
    target = parse_target(RING_CLAIM["target"])
    results = {}
    for impl in ("all_gather", "ring"):
        results[impl] = compile_loss(
            target, RING_CLAIM["global_batch_size"], RING_CLAIM["embed_dim"], RING_CLAIM["loss"], impl
        )
        log(
            f"recipes: {RING_CLAIM['loss']} loss, {impl}: {format_bytes(results[impl].temporaries)} of temporaries per chip"
        )
    return results


def ring_table(results: dict[str, Memory]) -> str:
    target = parse_target(RING_CLAIM["target"])
    local = RING_CLAIM["global_batch_size"] // target.chips
    lines = [
        f"Softmax loss and gradient alone, {RING_CLAIM['global_batch_size']:,} pairs over the {target.chips} chips of a "
        f"{RING_CLAIM['target']} ({local:,} per chip), embed dim {RING_CLAIM['embed_dim']}, float32:",
        "",
        "| impl | temporaries per chip | peak per chip |",
        "| --- | ---: | ---: |",
    ]
    for impl, memory in results.items():
        lines.append(f"| {impl} | {format_bytes(memory.temporaries)} | {format_bytes(memory.peak)} |")
    return "\n".join(lines)
