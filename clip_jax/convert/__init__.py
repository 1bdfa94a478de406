"""The conversion command line and the exporters: PyTorch checkpoints into clip_jax model
directories, and clip_jax models out to open_clip state dicts and transformers directories.

    python -m clip_jax.convert ViT-B-32.pt converted/vit_b32    (clip_jax/convert/__main__.py runs `main`)

Reading is `clip_jax.io`'s: every source goes through `clip_jax.io.load_any` (the readers of
PyTorch files and the renaming rules are in `clip_jax.io.torch_checkpoint`,
`clip_jax.io.openclip_layout` and `clip_jax.io.hf_layout`). Output files are written where they lie
on a local (or mounted) filesystem.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from clip_jax import paths
from clip_jax.cli import one_line_errors
from clip_jax.convert import hf
from clip_jax.io import is_training_workdir, load_any, model_directory
from clip_jax.io.openclip_layout import ConversionError, StateDict, variables_to_openclip
from clip_jax.io.torch_checkpoint import ActivationChoice, checkpoint_tokenizer, import_torch, load_checkpoint
from clip_jax.models import CLIPConfig

__all__ = [
    "ActivationChoice",
    "ConversionError",
    "convert_checkpoint",
    "export_to_hf",
    "load_checkpoint",
    "main",
    "save_state_dict",
    "variables_to_openclip",
]


def save_state_dict(state_dict: StateDict, path: str) -> None:
    """Write an open_clip-layout state dict: safetensors by extension, a torch pickle otherwise."""
    if path.endswith(".safetensors"):
        save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, path)
        return
    torch = import_torch(path)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)


def convert_checkpoint(
    source: str,
    output_dir: str,
    model: str | None = None,
    activation: str | None = None,
    bpe_path: str | None = None,
    overwrite: bool = False,
    *,
    trust_torchscript: bool = False,
    announce: Callable[[ActivationChoice], None] | None = None,
) -> CLIPConfig:
    """Convert a PyTorch checkpoint into a self-contained clip_jax model directory (see `checkpoint`).

    `trust_torchscript` and `announce`: see `load_checkpoint`."""
    paths.check_output(output_dir, directory=True, replace=overwrite)  # before the (slow) conversion
    config, variables = load_checkpoint(
        source, model, activation, trust_torchscript=trust_torchscript, announce=announce
    )
    text_tokenizer = checkpoint_tokenizer(source, config.text.context_length, bpe_path)
    model_directory.save_model_directory(output_dir, config, variables, text_tokenizer, overwrite=overwrite)
    return config


def export_to_hf(
    output_dir: str, config: CLIPConfig, variables: dict[str, Any], tokenizer: Any, overwrite: bool = False
) -> str:
    """Write a transformers `CLIPModel` directory (see `clip_jax.convert.hf`); atomic, like
    `convert_checkpoint`. Raises `hf.ExportError` in one line, before writing anything, for what
    transformers cannot represent. `python -m clip_jax.convert SRC OUT --to-hf` calls it.

        model, variables, _, tokenizer = clip_jax.load(SRC)
        convert.export_to_hf(OUT, model.config, variables, tokenizer)
    """
    hf.check_exportable(config, tokenizer)  # before the (slow) gathering of the weights
    state_dict = variables_to_openclip(variables, config)
    return hf.write_hf_directory(output_dir, config, state_dict, tokenizer, overwrite)


# (path, model, activation, trust_torchscript) -> (model_config, variables, tokenizer) of anything clip_jax loads.


def main(argv: list[str] | None = None) -> None:
    """The command line; errors are one `error: ...` line on stderr (exit 1), tracebacks with --verbose.
    The source of --to-hf and --to-open-clip is anything `clip_jax.io.load_any` reads."""
    parser = argparse.ArgumentParser(
        prog="python -m clip_jax.convert",
        description="Convert an OpenAI / open_clip / Hugging Face CLIP checkpoint into a clip_jax directory, "
        "or (--to-open-clip) a clip_jax directory back into an open_clip state dict.",
    )
    parser.add_argument(
        "source",
        help="a .pt/.bin/.safetensors checkpoint, or a clip_jax directory or train.py workdir with --to-hf / --to-open-clip",
    )
    parser.add_argument("output", help="the directory to create (or the state-dict file with --to-open-clip)")
    parser.add_argument("--model", help="a registered model name (default: read off the tensor shapes)")
    parser.add_argument("--activation", choices=["quick_gelu", "gelu"], help="override the MLP activation")
    parser.add_argument("--bpe", help="path of bpe_simple_vocab_16e6.txt.gz (default: CLIP_JAX_BPE or open_clip's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--to-open-clip",
        action="store_true",
        help="export SOURCE (a clip_jax directory or workdir, or a checkpoint file) as an open_clip state dict",
    )
    parser.add_argument(
        "--to-hf",
        action="store_true",
        help="export SOURCE (a clip_jax directory or workdir, or a checkpoint file) as a transformers CLIPModel directory",
    )
    parser.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="if a TorchScript archive cannot be read safely, load it with torch.jit.load, which RUNS ITS CODE: "
        "only for files you trust (OpenAI's usual .pt files need no such consent)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.to_hf and args.to_open_clip:
        parser.error("--to-hf and --to-open-clip exclude each other")
    with one_line_errors(args.verbose):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    # Before the (slow) loading, and naming the command line's flag rather than the keyword.
    paths.check_output(
        args.output, directory=not args.to_open_clip, replace=args.overwrite, overwrite_hint="pass --overwrite"
    )
    if args.to_hf or args.to_open_clip:
        config, variables, text_tokenizer = load_any(
            args.source, args.model, args.activation, trust_torchscript=args.trust_torchscript
        )
    if args.to_hf:
        export_to_hf(args.output, config, variables, text_tokenizer, args.overwrite)
        print(
            f"wrote {args.output}: transformers CLIPModel, ViT-{config.vision.patch_size}, activation {config.activation}"
        )
        if config.logit_bias_init is not None:
            print("note: CLIPModel has no logit_bias; its logits omit it (embeddings are exact); kept in config.json")
        return
    if args.to_open_clip:
        paths.absolute(args.output).parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(variables_to_openclip(variables, config), args.output)
        print(f"wrote {args.output}")
        return
    if is_training_workdir(args.source):
        raise ConversionError(
            f"{args.source!r} is a train.py workdir, not a PyTorch checkpoint: clip_jax.load and evaluate.py "
            "--checkpoint read it as it is; to export its newest checkpoint add --to-hf (a transformers CLIPModel "
            "directory) or --to-open-clip with an output file such as model.safetensors (an open_clip state dict)"
        )
    config = convert_checkpoint(
        args.source, args.output, args.model, args.activation, args.bpe, args.overwrite,
        trust_torchscript=args.trust_torchscript, announce=lambda choice: print(choice.describe(cli=True), flush=True),
    )  # fmt: skip
    kind = f"ViT-{config.vision.patch_size}" if config.vision.is_vit else f"ResNet {config.vision.layers}"
    print(f"wrote {args.output}: {kind}, image {config.vision.image_size}px, embed {config.embed_dim}")
