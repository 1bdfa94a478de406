"""`--fit`: the cheapest configuration that fits the target, found by compiling candidates.

Candidates vary the remat policy, GradCache's micro-batches (`accumulation_steps`, exact for every
objective) and the fsdp axis. "Cheapest" is the least recomputation first, then the fewest
micro-batches, then the smallest fsdp axis; a configuration that fits as given is the answer only
when nothing cheaper does. Every compile is one line of the log.

A candidate is skipped without compiling when a lower bound of what it needs, from a refused one
that recomputes no less, is over the chip's memory: the state shrinks in proportion to the fsdp
axis, everything else at most in proportion to the micro-batch. It holds for the steps here (activations and gradients grow with the
micro-batch and the unsharded parameters); a skipped candidate is never the answer unless XLA
finds memory savings larger than these proportions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import ml_collections

from clip_jax.aot.compile import Report, compile_run, format_bytes
from clip_jax.aot.targets import Target

# Least recomputation first: nothing, the non-matmul work, the matmuls that carry the batch too,
# the whole block.
REMAT_BY_RECOMPUTE = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")


def candidates(config: ml_collections.ConfigDict, chips_per_slice: int, shards: int) -> Iterator[tuple[str, int, int]]:
    """(remat policy, accumulation steps, fsdp) in the order of their cost: the fsdp axis from 1 to
    64 (or the chips of a slice that the model axis leaves), micro-batches while each holds a whole
    number of pairs per chip."""
    room = chips_per_slice // int(config.mesh.model)
    fsdp_sizes = [2**i for i in range(7) if 2**i <= room and room % 2**i == 0]
    batch = int(config.global_batch_size)
    steps = [2**i for i in range(int(math.log2(batch)) + 1) if batch % (shards * 2**i) == 0]
    for policy in REMAT_BY_RECOMPUTE:
        for accumulation in steps:
            for size in fsdp_sizes:
                yield policy, accumulation, size


def changes(config: ml_collections.ConfigDict, policy: str, accumulation: int, fsdp: int) -> dict[str, object]:
    """{dotted config field: value} that turn `config` into the candidate."""
    changed: dict[str, object] = {}
    if policy != config.model.overrides.remat_policy:
        changed["model.overrides.remat_policy"] = policy
    if accumulation != int(config.accumulation_steps):
        changed["accumulation_steps"] = accumulation
    if fsdp != int(config.mesh.fsdp):
        changed["mesh.fsdp"] = fsdp
        changed["mesh.data"] = -1  # the data axis takes the devices fsdp leaves
    return changed


def with_candidate(
    config: ml_collections.ConfigDict, policy: str, accumulation: int, fsdp: int
) -> ml_collections.ConfigDict:
    changed = copy.deepcopy(config)
    for field, value in changes(config, policy, accumulation, fsdp).items():
        *groups, name = field.split(".")
        node = changed
        for group in groups:
            node = node[group]
        node[name] = value
    return changed


def flag_line(config: ml_collections.ConfigDict, policy: str, accumulation: int, fsdp: int) -> list[str]:
    """The command-line flags that turn `config` into the candidate."""
    return [f"--config.{field}={value}" for field, value in changes(config, policy, accumulation, fsdp).items()]


def search(
    config: ml_collections.ConfigDict,
    target: Target,
    num_slices: int = 1,
    name: str = "",
    log: Callable[[str], None] = print,
    memory_bytes: int | None = None,
) -> tuple[Report, list[str]]:
    """(the report of the cheapest candidate that fits, its flags: none when it is the configuration
    as given); ValueError when none fits. Candidates cheaper than the configuration as given are
    tried even when it fits. The candidates' evaluation steps are not compiled: the train step is
    what grows with them."""
    refused: list[Refusal] = []
    given_report = compile_run(config, target, num_slices, name, evaluation=False, memory_bytes=memory_bytes)
    log(_line("as given", given_report))
    given = (config.model.overrides.remat_policy, int(config.accumulation_steps), int(config.mesh.fsdp))
    given_cost = (_rank(given[0]), *given[1:])
    if not given_report.fits:
        refused.append(_refusal(*given, given_report))
    shards = given_report.mesh["data"] * given_report.mesh["fsdp"]  # data x fsdp stays the same as fsdp grows
    for policy, accumulation, fsdp in candidates(config, given_report.chips // num_slices, shards):
        if given_report.fits and (_rank(policy), accumulation, fsdp) >= given_cost:
            return given_report, []  # nothing cheaper fits
        if (policy, accumulation, fsdp) == given or _ruled_out(refused, _rank(policy), accumulation, fsdp):
            continue
        report = compile_run(
            with_candidate(config, policy, accumulation, fsdp), target, num_slices, name, False, memory_bytes
        )
        log(_line(f"remat_policy={policy} accumulation_steps={accumulation} fsdp={fsdp}", report))
        if report.fits:
            return report, flag_line(config, policy, accumulation, fsdp)
        refused.append(_refusal(policy, accumulation, fsdp, report))
    if given_report.fits:
        return given_report, []
    raise ValueError(
        f"no configuration fits {given_report.target}: even full remat at one pair per micro-batch per chip"
    )


# (recompute rank, micro-batches, fsdp, bytes needed, bytes available, state bytes per chip)
Refusal = tuple[int, int, int, int, int, int]


def _refusal(policy: str, accumulation: int, fsdp: int, report: Report) -> Refusal:
    needed = report.memory.peak if report.memory is not None else report.required_bytes or 0
    available = report.available_bytes or report.capacity_bytes
    return _rank(policy), accumulation, fsdp, needed, available, report.state_bytes


def _rank(policy: str) -> int:
    """How much `policy` recomputes; nothing_saveable recomputes as much as full."""
    return REMAT_BY_RECOMPUTE.index("full" if policy == "nothing_saveable" else policy)


def _ruled_out(refused: list[Refusal], rank: int, accumulation: int, fsdp: int) -> bool:
    """True when a refused candidate that recomputes no less says this one cannot fit either."""
    for refused_rank, refused_accumulation, refused_fsdp, needed, available, state in refused:
        if rank > refused_rank:
            continue
        state_part = min(state, needed)
        bound = state_part * refused_fsdp / fsdp + (needed - state_part) * min(1.0, refused_accumulation / accumulation)
        if bound > available:
            return True
    return False


def _line(label: str, report: Report) -> str:
    seconds = f"({report.compile_seconds:.0f} s)"
    if report.memory is not None:
        verdict = "fits" if report.fits else "does not fit"
        return f"fit: {label}: {verdict}, peak {format_bytes(report.memory.peak)} of {format_bytes(report.capacity_bytes)} {seconds}"
    available = report.available_bytes or report.capacity_bytes
    return (
        f"fit: {label}: does not fit, {format_bytes(report.required_bytes)} of temporaries needed, "
        f"{format_bytes(available)} available {seconds}"
    )
