"""Ahead-of-time compilation for accelerators this machine does not have: a run's train step
compiled for any TPU slice (libtpu's topologies) or GPU host (the CUDA plugin's), with the memory,
FLOPs and collectives the compiler reports (docs/tpu.md, "Before you book a slice").

    python -m clip_jax.aot --config configs/vit_b16.py --topology v4-512

targets.py names the hardware, compile.py builds and compiles the step as train.py does, hlo.py
reads the collectives, fit.py searches for a configuration that fits, recipes.py checks every
recipe against the slice it names. A tool on top of training/, as experiments/ is.
"""
