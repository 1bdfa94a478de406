"""encode_image / encode_text throughput, clip_jax vs open_clip, same model config, batch, precision, threads.

    python bench/inference.py --model RN50 --batch-size 16 --tower image
    python bench/inference.py --model ViT-B-32 --batch-size 64

Prints items/s of each framework per tower and ends with `ratio clip_jax/open_clip: X.XX` for the
first tower measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch too

from train_step import _random_inputs, open_clip_model_from_config  # noqa: E402  (bench/ is on sys.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tower", choices=["image", "text", "both"], default="both")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 otherwise")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    return parser.parse_args(argv)


def _median_seconds(run, steps: int) -> float:
    run()  # warm-up (and compile)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import jax
    import torch
    from flax import linen as nn

    from clip_jax.models import create_model

    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    torch.set_num_threads(args.threads)
    model = create_model(args.model, dtype=dtype)
    model_config = model.config
    images, texts = _random_inputs(model_config, args.batch_size)
    variables = jax.jit(lambda: nn.unbox(model.init_variables(jax.random.key(0))))()
    encoders = {
        "image": (jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image)), images),
        "text": (jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text)), texts),
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = open_clip_model_from_config(model_config).to(device).eval()
    torch_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    torch_texts = torch.from_numpy(texts.astype("int64")).to(device)
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    torch_encoders = {"image": (reference.encode_image, torch_images), "text": (reference.encode_text, torch_texts)}

    towers = ["image", "text"] if args.tower == "both" else [args.tower]
    ratios = []
    for tower in towers:
        encode, inputs = encoders[tower]
        start = time.perf_counter()
        compiled = encode.lower(variables, inputs).compile()
        compile_seconds = time.perf_counter() - start
        ours = _median_seconds(
            lambda compiled=compiled, inputs=inputs: jax.block_until_ready(compiled(variables, inputs)), args.steps
        )
        torch_encode, torch_inputs = torch_encoders[tower]

        def run_reference(torch_encode=torch_encode, torch_inputs=torch_inputs):
            with torch.no_grad(), autocast:
                torch_encode(torch_inputs)
            if device == "cuda":
                torch.cuda.synchronize()

        theirs = _median_seconds(run_reference, args.steps)
        print(
            f"encode_{tower} {args.model} batch {args.batch_size} {dtype} on {jax.devices()[0].device_kind}: "
            f"clip_jax {args.batch_size / ours:.1f}/s (compile {compile_seconds:.1f} s), "
            f"open_clip {args.batch_size / theirs:.1f}/s ({args.threads} threads)",
            flush=True,
        )
        ratios.append(theirs / ours)
    print(f"ratio clip_jax/open_clip: {ratios[0]:.2f}")


if __name__ == "__main__":
    main()
