"""Where the time of a clip_jax train step goes: a jax.profiler trace, summed by kind of work.

    python bench/profile_step.py --model ViT-B-32 --batch-size 16 --trace-dir /tmp/clip_jax_trace

Runs the step `bench/train_step.py` measures (same model, recipe and batch), records one step with
`jax.profiler`, and sums the time of every XLA operation in the trace by phase (forward, backward,
loss/optimizer) and kind (matrix multiplies, scan bookkeeping, layout copies, other element-wise and
reduction work). Times are thread-seconds: the host's operations can overlap on several threads, and
a library call (YNNPACK/oneDNN matmuls) that parallelises internally counts once. The trace directory
opens in TensorBoard's or Perfetto's profile viewers for the timeline.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import time

from train_step import _minor_page_faults, build_clip_jax_step  # noqa: E402  (bench/ is on sys.path)

PHASES = ("forward", "backward", "loss, optimizer, other")
KINDS = ("matmul", "scan bookkeeping", "layout copy", "element-wise / reduce")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 otherwise")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--trace-dir", default="/tmp/clip_jax_trace")
    parser.add_argument("--top", type=int, default=12, help="also list this many most expensive operations")
    return parser.parse_args(argv)


def operation_metadata(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its `op_name` metadata (the JAX operation it came from)."""
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", re.MULTILINE)
    return {name: op_name for name, op_name in pattern.findall(hlo_text)}


def classify(name: str, op_name: str) -> tuple[str, str]:
    if "transpose(jvp(" in op_name:
        phase = PHASES[1]
    elif "jvp(" in op_name:
        phase = PHASES[0]
    else:
        phase = PHASES[2]
    last = op_name.rsplit("/", 1)[-1]
    if "dot_general" in last or "conv_general" in last or name.startswith(("dot", "convolution")):
        kind = KINDS[0]
    elif re.match(r"(wrapped_broadcast|[\w\-]*dynamic-(update-)?slice)", name):
        kind = KINDS[1]
    elif name.startswith(("copy", "transpose")):
        kind = KINDS[2]
    else:
        kind = KINDS[3]
    return phase, kind


def part(phase: str, op_name: str) -> str:
    """Which tower (or the rest) and which pass an operation belongs to, for the timeline."""
    tower = "image tower" if "encode_image" in op_name else "text tower" if "encode_text" in op_name else ""
    return f"{tower} {phase}" if tower and phase != PHASES[2] else "loss, optimizer, other"


def covered(intervals: list[tuple[int, int]]) -> int:
    """Nanoseconds covered by the union of (start, end) intervals."""
    total, current_start, current_end = 0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    return total + (current_end - current_start if current_end is not None else 0)


def print_timeline(spans: list[tuple[int, int, str]], wall: float) -> None:
    """Wall-clock stretches of the step in order, one per tower pass (forward/backward) and the rest,
    then how much of the step no traced operation covers."""
    if not spans:
        return
    spans.sort()
    origin = spans[0][0]
    stretches: list[list] = []
    for start, end, name in spans:
        if stretches and stretches[-1][0] == name:
            stretches[-1][2] = max(stretches[-1][2], end)
            stretches[-1][3] += 1
        else:
            stretches.append([name, start, end, 1])
    # Short stretches (the loop counter, a reshape between two loops) would split a tower's pass.
    merged: list[list] = []
    for name, start, end, count in (stretch for stretch in stretches if stretch[2] - stretch[1] >= 20_000_000):
        if merged and merged[-1][0] == name:
            merged[-1][2], merged[-1][3] = end, merged[-1][3] + count
        else:
            merged.append([name, start, end, count])
    print("\ntimeline (wall clock from the first operation; stretches of one part, interruptions under 20 ms ignored):")
    for name, start, end, count in merged:
        print(f"  {(start - origin) / 1e9:6.2f} s -> {(end - origin) / 1e9:6.2f} s  {name} ({count} operations)")
    busy = covered([(start, end) for start, end, _ in spans])
    print(
        f"  some operation traced on some thread for {busy / 1e9:.3f} s of the {wall:.3f} s step; the rest is "
        f"untraced work (e.g. XLA's own dot kernels, which it traces only as a launch) and waiting"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import jax

    from clip_jax.models import create_model

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model = create_model(args.model, dtype=dtype, scan_layers=args.scan, remat_policy=args.remat)
    compiled, state, batch, _, _ = build_clip_jax_step(args.model, model, args.batch_size)
    metadata = operation_metadata(compiled.as_text())
    for _ in range(2):  # warm-up
        state, step_metrics = compiled(state, batch)
        jax.block_until_ready(step_metrics)
    faults = _minor_page_faults()
    jax.profiler.start_trace(args.trace_dir)
    start = time.perf_counter()
    state, step_metrics = compiled(state, batch)
    jax.block_until_ready(step_metrics)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    faults = _minor_page_faults() - faults
    paths = sorted(glob.glob(os.path.join(args.trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    profile = jax.profiler.ProfileData.from_file(paths[-1])

    totals: collections.Counter = collections.Counter()
    by_operation: collections.Counter = collections.Counter()
    spans: list[tuple[int, int, str]] = []  # (start, end, part) of every counted operation
    for plane in profile.planes:
        for line in plane.lines:
            # Operations run on XLA's worker threads; their events are the HLO instruction names.
            # A while loop's own event spans its body's: only the body's operations are counted.
            events = sorted((event.start_ns, event.duration_ns, event.name) for event in line.events)
            end = -1
            for start_ns, duration, name in events:
                base = re.sub(r"\.\d+$", "", name)
                if base == "while" or (name not in metadata and base not in ("wrapped_broadcast", "copy", "dot")):
                    continue  # the loop itself, or runtime bookkeeping (executor, thread-pool waits)
                if start_ns < end:
                    continue  # nested in an operation already counted
                end = start_ns + duration
                phase, kind = classify(name, metadata.get(name, ""))
                totals[phase, kind] += duration
                by_operation[name] += duration
                spans.append((start_ns, start_ns + duration, part(phase, metadata.get(name, ""))))
    grand = sum(totals.values())
    print(
        f"{args.model} batch {args.batch_size} {dtype} scan={args.scan} on {jax.devices()[0].device_kind}: "
        f"step {wall:.2f} s wall, {faults:,} minor page faults; operations {grand / 1e9:.2f} thread-s"
    )
    print(f"| phase | {' | '.join(KINDS)} | total |")
    print("| --- |" + " ---: |" * (len(KINDS) + 1))
    for phase in PHASES:
        row = [totals[phase, kind] for kind in KINDS]
        cells = " | ".join(f"{value / 1e9:.2f} s ({100 * value / grand:.0f}%)" for value in row)
        print(f"| {phase} | {cells} | {sum(row) / 1e9:.2f} s ({100 * sum(row) / grand:.0f}%) |")
    kind_totals = [sum(totals[phase, kind] for phase in PHASES) for kind in KINDS]
    print(
        "| all | "
        + " | ".join(f"{v / 1e9:.2f} s ({100 * v / grand:.0f}%)" for v in kind_totals)
        + f" | {grand / 1e9:.2f} s |"
    )
    print_timeline(spans, wall)
    print("\nmost expensive operations (thread-s, summed over loop iterations):")
    for name, duration in by_operation.most_common(args.top):
        print(f"  {duration / 1e9:6.3f} s  {name:40s} {metadata.get(name, '')[:110]}")
    print(f"\ntrace: {args.trace_dir}")


if __name__ == "__main__":
    sys.exit(main())
