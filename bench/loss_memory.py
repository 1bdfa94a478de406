"""Compiled per-device memory of the contrastive loss plus its gradient: all_gather vs ring.

    python bench/loss_memory.py                          # 32k, 256k, 1M pairs over 8, 64, 256 devices
    python bench/loss_memory.py --devices 8 --global-batches 32768 --embed-dim 512

Nothing is allocated: each configuration is lowered on abstract inputs over virtual CPU devices and
compiled, and XLA's memory analysis gives the per-device temporary bytes (the loss's working set)
and the total (temporaries + inputs + gradients). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="8,64,256", help="virtual device counts")
    parser.add_argument("--global-batches", default="32768,262144,1048576")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--losses", default="softmax,sigmoid")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device_counts = [int(n) for n in args.devices.split(",")]
    # Virtual devices must be requested before jax is imported.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(device_counts)}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from clip_jax import losses

    def gib(n: float) -> str:
        return f"{n / 2**30:,.3f}"

    print(f"embed dim {args.embed_dim}, float32; per-device bytes from XLA's memory analysis, in GiB\n")
    print("| loss | devices | global batch | local batch | impl | temp GiB | total GiB |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    ratios = []
    for loss in args.losses.split(","):
        for devices in device_counts:
            mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices], axis_types=(AxisType.Auto,))
            for global_batch in [int(b) for b in args.global_batches.split(",")]:
                if global_batch % devices:
                    continue
                sharded = NamedSharding(mesh, P("data"))
                replicated = NamedSharding(mesh, P())
                embeds = jax.ShapeDtypeStruct((global_batch, args.embed_dim), jnp.float32, sharding=sharded)
                scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
                totals = {}
                for impl in losses.IMPLEMENTATIONS:
                    loss_fn = losses.make_sharded_loss_fn(mesh, ("data",), loss, impl)
                    gradient = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2, 3)))
                    compiled = gradient.lower(embeds, embeds, scalar, scalar).compile()
                    memory = compiled.memory_analysis()
                    temp = memory.temp_size_in_bytes
                    total = temp + memory.argument_size_in_bytes + memory.output_size_in_bytes
                    totals[impl] = total
                    print(
                        f"| {loss} | {devices} | {global_batch:,} | {global_batch // devices:,} | {impl} | "
                        f"{gib(temp)} | {gib(total)} |",
                        flush=True,
                    )
                ratios.append((loss, devices, global_batch, totals["all_gather"] / totals["ring"]))
    print("\nall_gather / ring total memory:")
    for loss, devices, global_batch, ratio in ratios:
        print(f"  {loss} {devices} devices, {global_batch:,} pairs: {ratio:,.1f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
