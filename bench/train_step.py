"""clip_jax vs open_clip train step, side by side: same model config, global batch, precision and threads.

    python bench/train_step.py --model ViT-B-32 --batch-size 16                 # CPU: fp32
    python bench/train_step.py --model ViT-B-16 --batch-size 512,384,256 --dtype bfloat16   # GPU

Each framework runs in its own child process; with several batch sizes, each framework takes the
first that fits in memory. On CPU the two children are alive together and take turns, one step each
(`--no-interleave`: one after the other, as on accelerators, where neither may hold the other's
memory). Step times are medians. Prints pairs/s, compile time and model-FLOPs utilisation (FLOPs of
the compiled clip_jax step from XLA's cost analysis ÷ step time ÷ peak; on accelerators the device's
bf16 peak; on CPU the sustained throughput of large fp32 matmuls, measured before and after the
steps, the higher of the two, with the fastest single matmul call printed for reference), and ends
with `ratio clip_jax/open_clip: X.XX`.

On Linux both children run with glibc's malloc tuned (`MALLOC_TUNABLES` in `GLIBC_TUNABLES`;
`--no-tune-malloc` leaves the environment alone): transparent huge pages, one arena, large blocks
from the heap and never given back to the kernel. A step that allocates gigabytes of activations and
gradients then stops paying page faults for them every step, in either framework, and a process that
waits (for the other framework's step) does not find its memory given back to the host when it
resumes (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

RESULT_PREFIX = "RESULT "
READY = "READY "
STEP = "STEP "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="a clip_jax.available_models() name")
    parser.add_argument("--batch-size", default="16", help="global batch; a comma list tries each until one fits")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 otherwise)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="scan the layers")
    parser.add_argument("--remat", default="none", help="clip_jax remat policy")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both frameworks")
    parser.add_argument("--framework", choices=["both", "clip_jax", "open_clip"], default="both")
    parser.add_argument("--json-out", default=None, help="also write the results here")
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CPU, run both frameworks' steps in turns (both processes alive) instead of one after the other",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="with --framework clip_jax or open_clip: seconds to sleep before each timed step",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # a child driven by the parent
    parser.add_argument(
        "--tune-malloc",
        action=argparse.BooleanOptionalAction,
        default=sys.platform.startswith("linux"),
        help="run both children with MALLOC_TUNABLES added to GLIBC_TUNABLES",
    )
    return parser.parse_args(argv)


def _batch_sizes(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in str(args.batch_size).split(",") if b.strip()]


def _random_inputs(model_config, batch: int, seed: int = 0):
    """Random images and token ids, one end-of-text (the largest id) per row."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size, context, vocab = (
        model_config.vision.image_size,
        model_config.text.context_length,
        model_config.text.vocab_size,
    )
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    texts = rng.integers(1, vocab - 1, size=(batch, context)).astype(np.int32)
    texts[np.arange(batch), rng.integers(2, context, size=batch)] = vocab - 1
    return images, texts


def _usage() -> tuple[int, float]:
    """(minor page faults, CPU-seconds in the kernel) of this process so far; zeros where the
    platform does not count them."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def _minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    return _usage()[0]


def _timed_call(call) -> tuple[float, int, float]:
    """Seconds of one call of `call` (which must wait for its results), its minor page faults and
    the CPU-seconds this process spent in the kernel meanwhile (0 where the platform does not say)."""
    faults, kernel = _usage()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    faults_after, kernel_after = _usage()
    return seconds, faults_after - faults, kernel_after - kernel


def _is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "outofmemory" in text


# --------------------------------------------------------------------------------------------
# clip_jax
# --------------------------------------------------------------------------------------------


def build_clip_jax_step(model_name: str, model, batch_size: int):
    """The compiled clip_jax train step at `batch_size` (the default recipe), its state and a batch.

    Returns (compiled, state, batch, settings, mesh); `bench/profile_step.py` profiles the same step.
    """
    import jax

    from clip_jax import sharding
    from clip_jax.training.config import base_config, validate
    from clip_jax.training.optimizer import make_optimizer
    from clip_jax.training.state import create_train_state
    from clip_jax.training.step import make_train_step

    config = base_config()
    config.model.name = model_name
    config.global_batch_size = batch_size
    config.total_steps = 1_000_000
    config.optimizer.warmup_steps = 100
    settings = validate(config)
    mesh = sharding.make_mesh(config.mesh)
    state, state_shardings = create_train_state(model, make_optimizer(settings.optimizer), settings.seed, mesh)
    train_step = make_train_step(model, settings.step, mesh, state_shardings)
    images, texts = _random_inputs(model.config, batch_size)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        "images": jax.device_put(images, batch_sharding),
        "texts": jax.device_put(texts, batch_sharding),
    }
    compiled = train_step.lower(state, batch).compile()
    return compiled, state, batch, settings, mesh


class _Runner:
    """What both frameworks' sides share: timed steps, one at a time, and their statistics.
    A subclass sets `framework`, `batch_size` and `_run` (one step that waits for its results)."""

    framework = ""
    batch_size = 0

    def __init__(self, args: argparse.Namespace):
        self.args, self.times, self.faults, self.kernel_seconds = args, [], [], []

    def _run(self) -> None:
        raise NotImplementedError

    def _first_batch_that_fits(self, setup: Callable[[int], None], release: Callable[[], None]) -> None:
        """For each `--batch-size` in turn, `setup(batch_size)` and a warm-up step, until one fits in
        memory; `release()` frees a failed attempt before the next."""
        sizes = _batch_sizes(self.args)
        for batch_size in sizes:
            try:
                setup(batch_size)
                self.batch_size = batch_size
                self._run()  # warm-up
                return
            except Exception as error:  # noqa: BLE001 - an out-of-memory batch: try the next size
                if not _is_out_of_memory(error) or batch_size == sizes[-1]:
                    raise
                print(
                    f"{self.framework}: batch {batch_size} does not fit ({type(error).__name__}); trying the next",
                    flush=True,
                )
                release()
        raise RuntimeError("no batch size given")

    def step(self) -> float:
        seconds, faults, kernel = _timed_call(self._run)
        self.times.append(seconds)
        self.faults.append(faults)
        self.kernel_seconds.append(kernel)
        return seconds

    def timing(self) -> dict:
        """The median step and what goes with it, for the result."""
        step_seconds = statistics.median(self.times)
        return {
            "step_seconds": step_seconds,
            "step_seconds_all": self.times,
            "pairs_per_second": self.batch_size / step_seconds,
            "page_faults_per_step": statistics.mean(self.faults),
            "kernel_seconds_per_step": statistics.mean(self.kernel_seconds),
        }


class ClipJaxRunner(_Runner):
    """The clip_jax side: compiles the step (first batch size that fits), runs one warm-up step.

    On CPU the matmul peak is measured twice, before compiling and after the timed steps, and the
    higher of the two is used: the MFU is then the lower of the two it could be.
    """

    framework = "clip_jax"

    def __init__(self, args: argparse.Namespace):
        import jax

        from clip_jax import metrics
        from clip_jax.models import create_model

        super().__init__(args)
        self.backend = jax.default_backend()
        self.dtype = args.dtype or ("float32" if self.backend == "cpu" else "bfloat16")
        self.model = create_model(args.model, dtype=self.dtype, scan_layers=args.scan, remat_policy=args.remat)
        self.peaks = [metrics.measure_matmul_peak()] if self.backend == "cpu" else []

        def setup(batch_size: int) -> None:
            start = time.perf_counter()
            self.compiled, self.state, self.batch, self.settings, self.mesh = build_clip_jax_step(
                args.model, self.model, batch_size
            )
            self.compile_seconds = time.perf_counter() - start

        def release() -> None:
            self.state = self.batch = self.compiled = None
            jax.clear_caches()

        self._first_batch_that_fits(setup, release)

    def _run(self) -> None:
        import jax

        self.state, self.step_metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.step_metrics)

    def result(self) -> dict:
        import jax
        import numpy as np

        from clip_jax import metrics
        from clip_jax.training.setup import step_flops_per_device

        if self.backend == "cpu":
            self.peaks.append(metrics.measure_matmul_peak())
            peak = max(measured.sustained for measured in self.peaks)
            peak_source = "sustained fp32 matmul, measured before and after the steps (the higher)"
        else:
            peak, peak_source = metrics.device_peak_flops(), "device bf16 peak table"
        timing = self.timing()
        step_seconds = timing["step_seconds"]
        # Model FLOPs: XLA counts a scanned layer once, so scanned/rematted steps are counted on
        # their unrolled twin (see step_flops_per_device).
        flops = step_flops_per_device(self.compiled, self.model, self.settings, self.mesh, self.state.tx)
        result = {
            "framework": "clip_jax",
            "model": self.args.model,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(),
            "compile_seconds": self.compile_seconds,
            **timing,
            "flops_per_step_per_device": flops,
            "peak_flops_per_device": peak,
            "peak_source": peak_source,
            "mfu": metrics.model_flops_utilization(flops, step_seconds, peak),
            "loss": float(np.asarray(self.step_metrics["loss"])),
            "scan": self.args.scan,
            "remat": self.args.remat,
        }
        if self.peaks:
            result["matmul_peaks"] = [measured._asdict() for measured in self.peaks]
            best_single = max(measured.best_single for measured in self.peaks)
            result["mfu_against_best_single_matmul"] = metrics.model_flops_utilization(flops, step_seconds, best_single)
        return result


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------


def open_clip_model_from_config(model_config):
    """An open_clip CLIP with exactly the clip_jax model config's architecture (heads and activation too)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = model_config.vision
    width_per_head = (vision.width if vision.is_vit else vision.width * 32) // vision.num_heads
    vision_cfg = CLIPVisionCfg(
        layers=vision.layers if vision.is_vit else list(vision.layers),
        width=vision.width,
        head_width=width_per_head,
        mlp_ratio=vision.mlp_ratio,
        patch_size=vision.patch_size or 16,
        image_size=vision.image_size,
    )
    text = model_config.text
    text_cfg = CLIPTextCfg(
        context_length=text.context_length,
        vocab_size=text.vocab_size,
        width=text.width,
        heads=text.heads,
        layers=text.layers,
        mlp_ratio=text.mlp_ratio,
    )
    return CLIP(model_config.embed_dim, vision_cfg, text_cfg, quick_gelu=model_config.activation == "quick_gelu")


class OpenClipRunner(_Runner):
    """The open_clip side: the same architecture, AdamW hyper-parameters, clipping and loss."""

    framework = "open_clip"

    def __init__(self, args: argparse.Namespace):
        import torch
        from open_clip.loss import ClipLoss

        from clip_jax.models import get_model_config

        super().__init__(args)
        torch.set_num_threads(args.threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend = self.device
        self.dtype = args.dtype or ("float32" if self.device == "cpu" else "bfloat16")
        model_config = get_model_config(args.model)

        def setup(batch_size: int) -> None:
            self.model = open_clip_model_from_config(model_config).to(self.device).train()
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2
            )
            self.loss_fn = ClipLoss()
            images, texts = _random_inputs(model_config, batch_size)
            self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)
            self.texts = torch.from_numpy(texts.astype("int64")).to(self.device)
            self.autocast = torch.autocast(
                self.device, dtype=getattr(torch, self.dtype), enabled=self.dtype != "float32"
            )

        def release() -> None:
            self.model = self.optimizer = None
            if self.device == "cuda":
                torch.cuda.empty_cache()

        self._first_batch_that_fits(setup, release)

    def _run(self) -> None:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            image_features, text_features, logit_scale = self.model(self.images, self.texts)
            self.loss = self.loss_fn(image_features, text_features, logit_scale)
        self.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, 4.6052)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def result(self) -> dict:
        import torch

        return {
            "framework": "open_clip",
            "model": self.args.model,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "threads": self.args.threads,
            **self.timing(),
            "loss": float(self.loss.detach().float().cpu()),
        }


RUNNERS = {"clip_jax": ClipJaxRunner, "open_clip": OpenClipRunner}


# --------------------------------------------------------------------------------------------
# The parent: both children, then the comparison
# --------------------------------------------------------------------------------------------


# glibc malloc settings for both children (docs/performance.md, "Page faults"):
MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",  # madvise(MADV_HUGEPAGE): 2 MiB pages for what malloc maps
    "glibc.malloc.arena_max=1",  # one arena, so no thread's big block falls back to its own mmap
    "glibc.malloc.mmap_max=0",  # big blocks come from the heap, not from mmap/munmap per call
    "glibc.malloc.trim_threshold=68719476736",  # and freed heap memory stays mapped (64 GiB)
)


def child_environment(tune_malloc: bool) -> dict[str, str]:
    """The environment of both children: the same for each framework, so the comparison is fair.
    With `tune_malloc`, MALLOC_TUNABLES replace any setting of the same name already there."""
    env = dict(os.environ)
    if tune_malloc:
        ours = {item.split("=", 1)[0] for item in MALLOC_TUNABLES}
        kept = [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item and item.split("=", 1)[0] not in ours]
        env["GLIBC_TUNABLES"] = ":".join([*kept, *MALLOC_TUNABLES])
    return env


class Child:
    """One framework's child process, driven one step at a time over its stdin/stdout.

    Protocol: the child prints `READY <backend>` once compiled and warmed up; each `step` line it answers with
    `STEP <seconds>`; `result` makes it print `RESULT <json>` and exit. Other output is echoed.
    """

    def __init__(self, framework: str, argv: list[str], env: dict[str, str]):
        self.framework = framework
        command = [sys.executable, os.path.abspath(__file__), *argv, "--framework", framework, "--serve"]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1, env=env
        )
        self.backend = self._expect(READY)  # the child's platform: cpu, gpu/cuda, tpu

    def _expect(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            print(line, end="", flush=True)
        code = self.process.wait()
        raise SystemExit(f"{self.framework} run failed (exit {code}) before printing {prefix.strip()!r}")

    def _send(self, command: str) -> None:
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            code = self.process.wait()
            raise SystemExit(f"{self.framework} run failed (exit {code})") from None

    def step(self) -> float:
        self._send("step")
        return float(self._expect(STEP))

    def result(self) -> dict:
        self._send("result")
        result = json.loads(self._expect(RESULT_PREFIX))
        self.process.stdin.close()
        if self.process.wait() != 0:
            raise SystemExit(f"{self.framework} run failed (exit {self.process.returncode})")
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def serve(runner) -> None:
    """The child's side of `Child`'s protocol."""
    print(READY + runner.backend, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            print(f"{STEP}{runner.step():.6f}", flush=True)
        elif command == "result":
            print(RESULT_PREFIX + json.dumps(runner.result()), flush=True)
            return
        else:
            raise SystemExit(f"unknown command {command!r} from the parent")


def run_children(args: argparse.Namespace, argv: list[str], env: dict[str, str]) -> tuple[dict, dict]:
    """Both frameworks' results. On CPU with `--interleave` both children are alive at once and take
    turns, step by step (alternating which goes first), so slow drifts of a shared host (other
    tenants, clock changes) fall on both; elsewhere one runs to the end before the other starts, so
    neither holds device memory the other needs."""
    children = []
    try:
        ours = Child("clip_jax", argv, env)
        children.append(ours)
        if not args.interleave or ours.backend != "cpu":
            for _ in range(args.steps):
                ours.step()
            our_result = ours.result()
            reference = Child("open_clip", argv, env)
            children.append(reference)
            for _ in range(args.steps):
                reference.step()
            return our_result, reference.result()
        reference = Child("open_clip", argv, env)
        children.append(reference)
        for index in range(args.steps):
            order = (ours, reference) if index % 2 == 0 else (reference, ours)
            seconds = {child.framework: child.step() for child in order}
            print(
                f"step {index + 1}/{args.steps}: clip_jax {seconds['clip_jax']:.3f} s, "
                f"open_clip {seconds['open_clip']:.3f} s",
                flush=True,
            )
        return ours.result(), reference.result()
    finally:
        for child in children:
            child.kill()


def _strip_framework(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--framework":
            skip = True
            continue
        if item.startswith("--framework="):
            continue
        out.append(item)
    return out


def _describe(result: dict) -> str:
    line = (
        f"{result['framework']:9s} {result['model']} batch {result['batch_size']} {result['dtype']} on "
        f"{result['device']}: step {result['step_seconds'] * 1e3:.1f} ms, {result['pairs_per_second']:.1f} pairs/s"
    )
    if "compile_seconds" in result:
        line += f", compile {result['compile_seconds']:.1f} s"
    if result.get("mfu") is not None:
        line += f", MFU {100 * result['mfu']:.1f}%"
    if result.get("page_faults_per_step"):
        line += f", {result['page_faults_per_step']:,.0f} page faults/step"
    if result.get("kernel_seconds_per_step"):
        line += f", {result['kernel_seconds_per_step']:.2f} CPU-s/step in the kernel"
    return line


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.framework != "both":
        runner = RUNNERS[args.framework](args)
        if args.serve:
            serve(runner)
            return
        for _ in range(args.steps):
            time.sleep(args.pause)
            runner.step()
        result = runner.result()
        print(_describe(result), flush=True)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    child_argv = _strip_framework(argv)
    env = child_environment(args.tune_malloc)
    print(f"both children run with GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r}", flush=True)
    ours, reference = run_children(args, child_argv, env)
    print(_describe(ours), flush=True)
    # The same model maths: its FLOPs per pair are those XLA counted for the clip_jax step.
    flops = ours.get("flops_per_step_per_device")
    if flops and ours.get("peak_flops_per_device"):
        flops_per_pair = flops * ours["devices"] / ours["batch_size"]
        reference["mfu"] = (
            flops_per_pair * reference["pairs_per_second"] / ours["devices"] / ours["peak_flops_per_device"]
        )
    print(_describe(reference), flush=True)
    if ours.get("peak_flops_per_device"):
        print(f"peak: {ours['peak_flops_per_device'] / 1e12:.3f} TFLOP/s per device ({ours['peak_source']})")
    for when, measured in zip(("before", "after"), ours.get("matmul_peaks", [])):
        print(
            f"  matmul peak {when} the steps: sustained {measured['sustained'] / 1e9:.0f} GFLOP/s "
            f"(size {measured['size']}), fastest single call {measured['best_single'] / 1e9:.0f} GFLOP/s"
        )
    if ours.get("mfu_against_best_single_matmul") is not None:
        print(
            f"  clip_jax MFU against the fastest single matmul call instead: "
            f"{100 * ours['mfu_against_best_single_matmul']:.1f}%"
        )
    if flops:
        print(f"FLOPs per step per device (XLA cost analysis): {flops:.3e}")
    ratio = ours["pairs_per_second"] / reference["pairs_per_second"]
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump({"clip_jax": ours, "open_clip": reference, "ratio": ratio}, file, indent=2)
    print(f"ratio clip_jax/open_clip: {ratio:.2f}")


if __name__ == "__main__":
    main()
