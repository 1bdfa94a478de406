"""clip_jax vs open_clip train step, side by side: same spec, global batch, precision and threads.

    python bench/train_step.py --model ViT-B-32 --batch-size 16                 # CPU: fp32
    python bench/train_step.py --model ViT-B-16 --batch-size 512,384,256 --dtype bfloat16   # GPU

Each framework runs in its own child process (so neither holds the other's memory); with several
batch sizes, each framework takes the first that fits in memory. Prints pairs/s, compile time and
model-FLOPs utilisation (FLOPs of the compiled clip_jax step from XLA's cost analysis ÷ step time ÷
peak; on CPU the peak is a large fp32 matmul measured in the same run, on accelerators the
device's bf16 peak), and ends with `ratio clip_jax/open_clip: X.XX`.

On Linux both children run with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (`--no-hugepages` to
leave the environment alone): glibc then asks for transparent huge pages for what it allocates, and
a step that allocates gigabytes of activations and gradients stops paying hundreds of thousands of
page faults every step, in either framework (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RESULT_PREFIX = "RESULT "


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
        "--hugepages",
        action=argparse.BooleanOptionalAction,
        default=sys.platform.startswith("linux"),
        help="run both children with glibc's malloc on transparent huge pages (GLIBC_TUNABLES)",
    )
    return parser.parse_args(argv)


def _batch_sizes(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in str(args.batch_size).split(",") if b.strip()]


def _random_inputs(spec, batch: int, seed: int = 0):
    """Random images and token ids, one end-of-text (the largest id) per row."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size, context, vocab = spec.vision.image_size, spec.text.context_length, spec.text.vocab_size
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    texts = rng.integers(1, vocab - 1, size=(batch, context)).astype(np.int32)
    texts[np.arange(batch), rng.integers(2, context, size=batch)] = vocab - 1
    return images, texts


def _minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed_steps(step, steps: int) -> tuple[list[float], float]:
    """Seconds of each of `steps` calls of `step` (which must wait for its results), and the minor
    page faults per call."""
    times = []
    faults = _minor_page_faults()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times, (_minor_page_faults() - faults) / steps


def _is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "outofmemory" in text


# --------------------------------------------------------------------------------------------
# clip_jax
# --------------------------------------------------------------------------------------------


def build_clip_jax_step(model_name: str, model, batch_size: int):
    """The compiled clip_jax train step at `batch_size` (the default recipe), its state and a batch.

    Returns (compiled, state, batch, config, mesh); `bench/profile_step.py` profiles the same step.
    """
    import jax

    from clip_jax import sharding
    from clip_jax.training.loop import base_config
    from clip_jax.training.state import create_train_state
    from clip_jax.training.step import make_train_step

    config = base_config()
    config.model.name = model_name
    config.global_batch_size = batch_size
    config.total_steps = 1_000_000
    config.optimizer.warmup_steps = 100
    mesh = sharding.make_mesh(config.mesh)
    state, state_shardings = create_train_state(config, model, mesh)
    train_step = make_train_step(model, config, mesh, state_shardings)
    images, texts = _random_inputs(model.config, batch_size)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        "images": jax.device_put(images, batch_sharding),
        "texts": jax.device_put(texts, batch_sharding),
    }
    compiled = train_step.lower(state, batch).compile()
    return compiled, state, batch, config, mesh


def run_clip_jax(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from clip_jax import metrics
    from clip_jax.models import create_model
    from clip_jax.training.loop import train_step_flops_per_device

    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    model = create_model(args.model, dtype=dtype, scan_layers=args.scan, remat_policy=args.remat)
    if backend == "cpu":
        peak, peak_source = metrics.measure_matmul_peak_flops(), "measured fp32 matmul"
    else:
        peak, peak_source = metrics.device_peak_flops(), "device bf16 peak table"
    for batch_size in _batch_sizes(args):
        try:
            start = time.perf_counter()
            compiled, state, batch, config, mesh = build_clip_jax_step(args.model, model, batch_size)
            compile_seconds = time.perf_counter() - start
            state, step_metrics = compiled(state, batch)  # warm-up
            jax.block_until_ready(step_metrics)

            def step():
                nonlocal state, step_metrics
                state, step_metrics = compiled(state, batch)
                jax.block_until_ready(step_metrics)

            times, faults = _timed_steps(step, args.steps)
        except Exception as error:  # noqa: BLE001 - an out-of-memory batch: try the next size
            if _is_out_of_memory(error) and batch_size != _batch_sizes(args)[-1]:
                print(f"clip_jax: batch {batch_size} does not fit ({type(error).__name__}); trying the next", flush=True)
                state = batch = compiled = step_metrics = None  # free the failed attempt
                jax.clear_caches()
                continue
            raise
        step_seconds = statistics.median(times)
        # Model FLOPs: XLA counts a scanned layer once, so scanned/rematted steps are counted on
        # their unrolled twin (see train_step_flops_per_device).
        abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
        flops = train_step_flops_per_device(compiled, model, config, mesh, abstract_batch)
        devices = jax.device_count()
        return {
            "framework": "clip_jax",
            "model": args.model,
            "batch_size": batch_size,
            "dtype": dtype,
            "device": jax.devices()[0].device_kind,
            "devices": devices,
            "compile_seconds": compile_seconds,
            "step_seconds": step_seconds,
            "pairs_per_second": batch_size / step_seconds,
            "flops_per_step_per_device": flops,
            "peak_flops_per_device": peak,
            "peak_source": peak_source,
            "mfu": metrics.model_flops_utilization(flops, step_seconds, peak),
            "loss": float(np.asarray(step_metrics["loss"])),
            "page_faults_per_step": faults,
            "scan": args.scan,
            "remat": args.remat,
        }
    raise RuntimeError("no batch size given")


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------


def open_clip_model_from_spec(spec):
    """An open_clip CLIP with exactly the clip_jax spec's architecture (heads and activation too)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = spec.vision
    width_per_head = (vision.width if vision.is_vit else vision.width * 32) // vision.num_heads
    vision_cfg = CLIPVisionCfg(
        layers=vision.layers if vision.is_vit else list(vision.layers),
        width=vision.width,
        head_width=width_per_head,
        mlp_ratio=vision.mlp_ratio,
        patch_size=vision.patch_size or 16,
        image_size=vision.image_size,
    )
    text = spec.text
    text_cfg = CLIPTextCfg(
        context_length=text.context_length, vocab_size=text.vocab_size, width=text.width, heads=text.heads,
        layers=text.layers, mlp_ratio=text.mlp_ratio,
    )
    return CLIP(spec.embed_dim, vision_cfg, text_cfg, quick_gelu=spec.activation == "quick_gelu")


def run_open_clip(args: argparse.Namespace) -> dict:
    import torch
    from open_clip.loss import ClipLoss

    from clip_jax.models import get_model_config

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    spec = get_model_config(args.model)
    for batch_size in _batch_sizes(args):
        try:
            model = open_clip_model_from_spec(spec).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
            loss_fn = ClipLoss()
            images, texts = _random_inputs(spec, batch_size)
            images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
            texts = torch.from_numpy(texts.astype("int64")).to(device)
            autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

            def step():
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    image_features, text_features, logit_scale = model(images, texts)
                    loss = loss_fn(image_features, text_features, logit_scale)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, 4.6052)
                return loss

            def synchronize():
                if device == "cuda":
                    torch.cuda.synchronize()

            step()  # warm-up
            synchronize()

            def step_and_wait():
                nonlocal loss
                loss = step()
                synchronize()

            loss = None
            times, faults = _timed_steps(step_and_wait, args.steps)
        except Exception as error:  # noqa: BLE001
            if _is_out_of_memory(error) and batch_size != _batch_sizes(args)[-1]:
                print(f"open_clip: batch {batch_size} does not fit; trying the next", flush=True)
                model = optimizer = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            raise
        step_seconds = statistics.median(times)
        return {
            "framework": "open_clip",
            "model": args.model,
            "batch_size": batch_size,
            "dtype": dtype,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": args.threads,
            "step_seconds": step_seconds,
            "pairs_per_second": batch_size / step_seconds,
            "loss": float(loss.detach().float().cpu()),
            "page_faults_per_step": faults,
        }
    raise RuntimeError("no batch size given")


# --------------------------------------------------------------------------------------------
# The parent: both children, then the comparison
# --------------------------------------------------------------------------------------------


HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def child_environment(hugepages: bool) -> dict[str, str]:
    """The environment of both children: the same for each framework, so the comparison is fair."""
    env = dict(os.environ)
    if hugepages:
        tunables = [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item and not item.startswith("glibc.malloc.hugetlb=")]
        env["GLIBC_TUNABLES"] = ":".join([*tunables, HUGEPAGES_TUNABLE])
    return env


def _run_child(framework: str, argv: list[str], env: dict[str, str]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--framework", framework]
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    results = [line[len(RESULT_PREFIX):] for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    for line in process.stdout.splitlines():
        if not line.startswith(RESULT_PREFIX):
            print(line, flush=True)
    if process.returncode != 0 or not results:
        raise SystemExit(f"{framework} run failed (exit {process.returncode})")
    return json.loads(results[-1])


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
    return line


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.framework != "both":
        result = run_clip_jax(args) if args.framework == "clip_jax" else run_open_clip(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    child_argv = _strip_framework(argv)
    env = child_environment(args.hugepages)
    print(f"both children run with GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r}", flush=True)
    ours = _run_child("clip_jax", child_argv, env)
    print(_describe(ours), flush=True)
    reference = _run_child("open_clip", child_argv, env)
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
    if flops:
        print(f"FLOPs per step per device (XLA cost analysis): {flops:.3e}")
    ratio = ours["pairs_per_second"] / reference["pairs_per_second"]
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump({"clip_jax": ours, "open_clip": reference, "ratio": ratio}, file, indent=2)
    print(f"ratio clip_jax/open_clip: {ratio:.2f}")


if __name__ == "__main__":
    main()
