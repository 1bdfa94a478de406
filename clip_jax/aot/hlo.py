"""The collectives of a compiled program, read from its HLO text: which kind, how many run per
step, how many bytes they move, and whether their device groups cross slices (the data-centre
network of a multislice job) or stay inside one (the chips' own interconnect).

A collective inside a loop body (scanned layers, GradCache's micro-batches) runs once per
iteration: the count multiplies each computation by the trip counts of the loops that call it
(`known_trip_count` where XLA records one, else the bound that the loop's condition compares its
counter with: the loops jax emits for scan and fori_loop count from 0 in steps of 1). Both
branches of a conditional are counted, as if both ran. Async pairs (`all-gather-start` /
`-done`) are counted once. Bytes are those of the arrays a collective gathers, reduces or sends:
the sum over a combined collective's tuple, the larger of its operands and results.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable

import numpy as np

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_BYTES.update({"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1})

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(
    r"\b(body|condition|to_apply|calls|branch_computations|called_computations)=\{?([^}]*?)\}?(?:,\s|$)"
)
_MEGASCALE = re.compile(
    r'_xla_host_transfer_handler_name="xla_megascale_runtime".*?_xla_host_transfer_rendezvous="([^"]+)"'
)
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Collective:
    """One kind of collective with one kind of device group, summed over the program."""

    kind: str  # e.g. "all-gather"
    group_size: int  # devices in each of its groups
    crosses_slices: bool  # over the data-centre network between slices
    count: int = 0  # executions per step
    bytes: int = 0  # per step: the largest buffer of each execution (gathered, reduced or sent)


def _split_computations(text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines}, plus "__entry__" naming the entry computation."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)  # a header is not indented; instructions are
            if match:
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    computations["__entry__"] = [current]
        elif line.strip() == "}":
            current = None
        else:
            computations[current].append(line)
    return computations


def _opcode(instruction: str) -> tuple[str, str]:
    """(opcode, the text before it: the result's type) of `instruction` (what follows '=')."""
    depth = 0
    for index, character in enumerate(instruction):
        if character in "([{":
            depth += 1
        elif character in ")]}":
            depth -= 1
        elif character == " " and depth == 0:
            rest = instruction[index + 1 :]
            return rest.split("(", 1)[0].strip(), instruction[:index]
    return "", instruction


def _trip_count(line: str, computations: dict[str, list[str]]) -> int:
    """Iterations of the `while` instruction `line`."""
    known = _TRIP_COUNT.search(line)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", line)
    bounds = [
        int(value)
        for body_line in computations.get(condition.group(1) if condition else "", [])
        for value in re.findall(r"[su](?:32|64)\[\]\S*\s+constant\((\d+)\)", body_line)
    ]
    return max(bounds, default=1)


def _multipliers(computations: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation."""
    times: dict[str, int] = collections.defaultdict(int)
    entry = computations.get("__entry__", [None])[0]
    pending = [(entry, 1)] if entry else []
    while pending:
        name, multiplier = pending.pop()
        times[name] += multiplier
        for line in computations.get(name, []):
            calls = _CALLS.findall(line)
            trips = _trip_count(line, computations) if calls and " while(" in line else 1
            for attribute, names in calls:
                factor = trips if attribute == "body" else 1
                for callee in re.findall(r"%?([\w.\-]+)", names):
                    if callee in computations:
                        pending.append((callee, multiplier * factor))
    return times


def _groups(line: str) -> list[list[int]]:
    """The device groups of a collective: explicit `{{0,1},{2,3}}`, iota `[2,4]<=[4,2]T(1,0)`, or a
    permutation's source-target pairs; [] when the instruction names none (all devices)."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if named:  # the devices of a mesh (major axis first) grouped along the listed axes
        axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
        names, sizes = [axis for axis, _ in axes], [int(size) for _, size in axes]
        grouped = [names.index(axis) for axis in re.findall(r"'(\w+)'", named.group(2))]
        order = [axis for axis in range(len(names)) if axis not in grouped] + grouped
        size = math.prod(sizes[axis] for axis in grouped)
        return np.arange(math.prod(sizes)).reshape(sizes).transpose(order).reshape(-1, size).tolist()
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        shape = [int(size) for size in iota.group(1).split(",")]
        dims = [int(size) for size in iota.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(axis) for axis in iota.group(3).split(",")])
        return ids.reshape(shape).tolist()
    explicit = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,\s]*\}(?:,\s*\{[\d,\s]*\})*)\}", line)
    if explicit:
        return [
            [int(i) for i in group.split(",") if i.strip()]
            for group in re.findall(r"\{([\d,\s]*)\}", explicit.group(1))
        ]
    return []


def _array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (an array or a tuple of them)."""
    return sum(
        _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _SHAPE.findall(type_text)
        if dtype in _BYTES
    )


def _operands(rest: str) -> list[str]:
    """The names of the operands in `rest`, the text after the opcode: `(%a, %b), attributes`."""
    depth, end = 0, len(rest)
    for index, character in enumerate(rest):
        depth += character == "("
        depth -= character == ")"
        if depth == 0:
            end = index
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def _moved_bytes(opcode: str, result_type: str, operand_types: list[str]) -> int:
    """Bytes a collective gathers, reduces or sends (see the module docstring)."""
    results, operands = _array_bytes(result_type), sum(_array_bytes(text) for text in operand_types)
    if opcode.endswith("-start"):  # its result holds the operands beside the outputs
        results = max(results - operands, 0)
    return max(results, operands)


def collectives(hlo_text: str, device_count: int, num_slices: int = 1) -> list[Collective]:
    """Every collective of `hlo_text` (a program over `device_count` devices of each of `num_slices`
    slices), grouped by (kind, group size, crosses slices), most bytes first.

    On a multislice target libtpu compiles one program per slice: its collectives over the chips'
    interconnect name device groups inside the slice, and each part of a collective that crosses
    slices becomes a send and a recv to the host (the "megascale" runtime of the data-centre
    network), named after the collective it belongs to. Those are counted once per collective, as
    crossing slices, with the larger of their two buffers."""
    computations = _split_computations(hlo_text)
    times = _multipliers(computations)
    types = {}  # instruction name -> its result type
    for name, lines in computations.items():
        for line in lines if name != "__entry__" else []:
            match = _INSTRUCTION.match(line)
            if match:
                types[match.group(1)] = _opcode(match.group(2))[1]
    found: dict[tuple[str, int, bool], Collective] = {}
    crossing: dict[str, tuple[str, int, int]] = {}  # rendezvous name -> (kind, runs per step, bytes)
    for name, lines in computations.items():
        if name == "__entry__" or not times.get(name):
            continue
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            opcode, result_type = _opcode(match.group(2))
            rest = match.group(2).split(opcode, 1)[1] if opcode else ""
            moved = _moved_bytes(opcode, result_type, [types.get(name, "") for name in _operands(rest)])
            rendezvous = _MEGASCALE.search(line) if opcode in ("send", "recv") else None
            if rendezvous:
                kind = re.match(r"[a-z\-]+", rendezvous.group(1)).group(0).strip("-")
                _, _, size = crossing.get(rendezvous.group(1), (kind, 0, 0))
                crossing[rendezvous.group(1)] = (kind, times[name], max(size, moved))
                continue
            kind = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
            if kind not in COLLECTIVES:
                continue
            groups = _groups(line) or [list(range(device_count))]
            key = (kind, max(len(group) for group in groups), False)
            entry = found.setdefault(key, Collective(*key))
            entry.count += times[name]
            entry.bytes += times[name] * moved
    for kind, runs, size in crossing.values():
        entry = found.setdefault((kind, num_slices, True), Collective(kind, num_slices, True))
        entry.count += runs
        entry.bytes += runs * size
    return sorted(found.values(), key=lambda c: (-c.bytes, c.kind))


def summarize(entries: Iterable[Collective]) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes", "cross_slice_count", "cross_slice_bytes"}} over `entries`."""
    totals: dict[str, dict[str, int]] = {}
    for entry in entries:
        total = totals.setdefault(entry.kind, {"count": 0, "bytes": 0, "cross_slice_count": 0, "cross_slice_bytes": 0})
        total["count"] += entry.count
        total["bytes"] += entry.bytes
        if entry.crosses_slices:
            total["cross_slice_count"] += entry.count
            total["cross_slice_bytes"] += entry.bytes
    return totals
