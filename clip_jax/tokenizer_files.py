"""The files a CLIP byte-level BPE tokenizer is built from, read into (token -> id, merges):
OpenAI's merges file `bpe_simple_vocab_16e6.txt.gz` (given, named by $CLIP_JAX_BPE, or found beside
an installed open_clip or OpenAI clip package without importing it), or a Hugging Face
CLIPTokenizer's `vocab.json` and `merges.txt`. clip_jax.tokenizer.ClipTokenizer encodes with them."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

from etils import epath

from clip_jax import paths

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_ENVIRONMENT_VARIABLE = "CLIP_JAX_BPE"
# The files of a Hugging Face CLIP tokenizer (a directory `get_tokenizer` and HF checkpoints name).
HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

# OpenAI's merges file lists about 262k merges but CLIP keeps only the first 48,894, so that
# 256 byte symbols + 256 end-of-word byte symbols + merges + 2 special tokens = 49,408 ids.
CLIP_MERGE_COUNT = 49152 - 256 - 2

Vocabulary = tuple[dict[str, int], list[tuple[str, str]]]  # (token -> id, merges in rank order)


def byte_symbols() -> dict[int, str]:
    """Byte value -> the printable character that stands for it in the BPE vocabulary.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, soft
    hyphen) are shifted to code points from 256 up, so that no symbol is whitespace. The dict's
    insertion order is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in symbols)
    for offset, byte in enumerate(shifted):
        symbols[byte] = chr(256 + offset)
    return symbols


def _file_beside_package(package: str, filename: str) -> str | None:
    """Path of `filename` inside an installed top-level package, found without importing it
    (importing open_clip or clip would import torch)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    directories = list(spec.submodule_search_locations or [])
    if not directories and spec.origin:
        directories = [os.fspath(epath.Path(spec.origin).parent)]
    for directory in directories:
        candidate = epath.Path(directory) / filename
        if candidate.is_file():
            return os.fspath(candidate)
    return None


def find_bpe_path() -> str:
    """Path of OpenAI's `bpe_simple_vocab_16e6.txt.gz`: from $CLIP_JAX_BPE, else from an installed
    open_clip or OpenAI clip package (located without importing it)."""
    from_environment = os.environ.get(BPE_ENVIRONMENT_VARIABLE)
    if from_environment:
        if not epath.Path(from_environment).is_file():
            raise FileNotFoundError(
                f"{BPE_ENVIRONMENT_VARIABLE}={from_environment!r} does not name a file; point it at {BPE_FILENAME}"
            )
        return from_environment
    for package in ("open_clip", "clip"):
        candidate = _file_beside_package(package, BPE_FILENAME)
        if candidate is not None:
            return candidate
    raise FileNotFoundError(
        f"Cannot find the CLIP BPE merges file {BPE_FILENAME}: no bpe_path was given, "
        f"{BPE_ENVIRONMENT_VARIABLE} is not set, and neither open_clip nor OpenAI's clip package is "
        f"installed. Run `pip install open_clip_torch` (it ships the file), or set "
        f"{BPE_ENVIRONMENT_VARIABLE} to the path of {BPE_FILENAME}."
    )


def read_clip_bpe(bpe_path: str) -> Vocabulary:
    """The vocabulary of OpenAI's merges file: the byte symbols, the same with end-of-word, one
    token per merge (the first CLIP_MERGE_COUNT), then start- and end-of-text."""
    if not epath.Path(bpe_path).is_file():
        raise FileNotFoundError(f"CLIP BPE merges file not found: {bpe_path!r}")
    lines = gzip.decompress(epath.Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    merge_lines = lines[1 : 1 + CLIP_MERGE_COUNT]  # line 0 is a version header
    if len(merge_lines) < CLIP_MERGE_COUNT:
        raise ValueError(f"{bpe_path} holds {len(merge_lines)} merges; a CLIP BPE file needs {CLIP_MERGE_COUNT}")
    merges = [_parse_merge(line, bpe_path, number) for number, line in enumerate(merge_lines, start=2)]
    symbols = list(byte_symbols().values())
    vocabulary = [
        *symbols,
        *(symbol + END_OF_WORD for symbol in symbols),
        *(first + second for first, second in merges),
        START_OF_TEXT,
        END_OF_TEXT,
    ]
    return {token: index for index, token in enumerate(vocabulary)}, merges


def read_hf_files(vocab_json: str, merges_txt: str) -> Vocabulary:
    """The vocabulary of a Hugging Face CLIPTokenizer's `vocab.json` (token -> id) and `merges.txt`."""
    for path in (vocab_json, merges_txt):
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"Hugging Face tokenizer file not found: {path!r}")
    vocabulary = json.loads(epath.Path(vocab_json).read_text(encoding="utf-8"))
    token_to_id = {token: int(index) for token, index in vocabulary.items()}
    for special in (START_OF_TEXT, END_OF_TEXT):
        if special not in token_to_id:
            raise ValueError(f"{vocab_json} has no {special!r} token; it is not a CLIP vocabulary")
    lines = epath.Path(merges_txt).read_text(encoding="utf-8").split("\n")
    merges = [
        _parse_merge(line, merges_txt, number)
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.startswith("#version")
    ]
    # Like Hugging Face, use only as many merges as the vocabulary has merged tokens: a
    # merges file may list more than the vocabulary was cut to.
    merged_token_count = len(token_to_id) - 2 * 256 - 2
    if len(merges) < merged_token_count:
        raise ValueError(
            f"{merges_txt} holds {len(merges)} merges but {vocab_json} has {merged_token_count} merged tokens"
        )
    merges = merges[:merged_token_count]
    for first, second in merges:
        if first + second not in token_to_id:
            raise ValueError(f"merge {first!r} {second!r} of {merges_txt} makes a token missing from {vocab_json}")
    return token_to_id, merges


def _parse_merge(line: str, path: str, line_number: int) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{path}, line {line_number}: expected two symbols, got {line!r}")
    return parts[0], parts[1]


def hf_tokenizer_files(directory: str | os.PathLike) -> tuple[str, str] | None:
    """(vocab.json, merges.txt) of a Hugging Face CLIP tokenizer in `directory` (as HF checkpoints
    ship them beside the weights), or None unless both are there. The paths are absolute: a
    tokenizer's asset files stay where they are if the working directory changes."""
    directory = paths.absolute(directory)
    vocab_json, merges_txt = directory / HF_VOCAB_FILE, directory / HF_MERGES_FILE
    if vocab_json.is_file() and merges_txt.is_file():
        return os.fspath(vocab_json), os.fspath(merges_txt)
    return None
