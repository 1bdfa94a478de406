"""Text tokenizers: OpenAI CLIP's byte-level BPE, SentencePiece, and training a SentencePiece model.

Both tokenizers turn strings into an int32 array of shape (n, context_length), padded on the right.

Bounded cost: a row of context_length L reads at most `max_text_characters(L)` (64 L) characters of a
text; a text that long or shorter is encoded exactly as open_clip encodes it. With truncate=True a
longer text loses its leading whitespace and is cut to that many characters (at a space when there
is one) before cleaning, and the CLIP tokenizer stops pre-tokenizing once the row is full and
BPE-encodes only a bounded prefix of a word too long to fit, so a 1 MB caption or a 40,000-letter
word costs a few milliseconds. Byte-pair merging runs on a heap, O(n log n) in a word's bytes.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import html
import importlib.util
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import ftfy
import numpy as np
import regex
import sentencepiece
from etils import epath

from clip_jax import paths

DEFAULT_CONTEXT_LENGTH = 77
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

# OpenAI's pre-tokenizer: its special tokens, common English contractions, runs of letters,
# single digits, and runs of anything else that is not whitespace.
_CLIP_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE_RUN = regex.compile(r"\s+")

# The per-word BPE cache is cleared when it reaches this size, to bound memory on endless streams;
# only words up to _CACHED_WORD_CHARACTERS are kept, so one entry cannot hold a megabyte-long word.
_BPE_CACHE_LIMIT = 200_000
_CACHED_WORD_CHARACTERS = 64

# How many characters of a text one row may read, per position of its context. The longest CLIP
# token is 32 bytes and an ordinary caption needs about 5 characters per token, so a text longer
# than 64 characters per position fits only if most of it vanishes in cleaning (whitespace runs,
# control characters, HTML entities). ftfy costs up to ~15 us per character (a line per character),
# so this also bounds the cleaning of one text (~75 ms at L=77 in the worst case, ~5 ms typically).
TEXT_CHARACTERS_PER_POSITION = 64

# When a word is too long to fit in the row, only a prefix of it is BPE-encoded: enough bytes for
# this many tokens beyond the ones kept, so that the cut cannot reach the kept tokens (merges act
# on neighbouring symbols; the kept ids equal those of the whole word in every test).
_PREFIX_MARGIN_TOKENS = 64

# html.unescape turns a decimal reference into int(digits), which raises for more than 4,300
# digits (Python's limit on int from str); such references are shortened to the same value first.
_LONG_DECIMAL_REFERENCE = regex.compile(r"&#([0-9]{8,})")
_LAST_SPACE = regex.compile(r"\s", flags=regex.REVERSE)  # searches from the end of the window
_LEADING_WHITESPACE = regex.compile(r"\s*")

TextBatch = str | bytes | Sequence[str | bytes]


def _byte_symbols() -> dict[int, str]:
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


def _collapse_whitespace(text: str) -> str:
    return _WHITESPACE_RUN.sub(" ", text).strip()


def _short_decimal_reference(match: regex.Match) -> str:
    # The same code point: leading zeros dropped; any value over 7 digits is above U+10FFFF,
    # which html.unescape turns into U+FFFD whatever its digits, like 9999999.
    digits = match.group(1).lstrip("0") or "0"
    return "&#" + (digits if len(digits) <= 7 else "9999999")


def _unescape_html(text: str) -> str:
    if "&#" in text:
        text = _LONG_DECIMAL_REFERENCE.sub(_short_decimal_reference, text)
    return html.unescape(text)


def clean_clip_text(text: str) -> str:
    """OpenAI's normalisation: repair mojibake, unescape HTML twice (captions are often
    double-escaped), collapse whitespace, lowercase. transformers' CLIPTokenizer does only the last
    two, so texts passed through this first tokenize there as here (docs/conversion.md)."""
    text = ftfy.fix_text(text)
    text = _unescape_html(_unescape_html(text))
    return _collapse_whitespace(text).lower()


def max_text_characters(context_length: int) -> int:
    """The most characters of one text that a row of `context_length` ids is encoded from; texts up
    to this length are encoded exactly, longer ones are cut (truncate=True) or refused."""
    return TEXT_CHARACTERS_PER_POSITION * int(context_length)


def _cut_text(text: str, limit: int) -> str:
    """At most `limit` characters from the start of the text after its leading whitespace, ending
    before a whitespace character in the second half of the window if there is one (so that no
    word is cut)."""
    start = _LEADING_WHITESPACE.match(text).end()
    if len(text) - start <= limit:
        return text[start:]
    end = start + limit
    space = _LAST_SPACE.search(text, start + limit // 2, end + 1)
    return text[start : space.start() if space is not None else end]


def _check_text_characters(text: str, context_length: int, truncate: bool) -> str:
    """The text itself if it is short enough to be read whole; else its cut (truncate) or an error."""
    limit = max_text_characters(context_length)
    if len(text) <= limit:
        return text
    if not truncate:
        raise ValueError(
            f"text {_shorten(text)!r} is {len(text)} characters long, more than the {limit} a row of "
            f"context_length={context_length} reads; shorten it or pass truncate=True"
        )
    return _cut_text(text, limit)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _as_text_list(texts: TextBatch) -> list[str]:
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    result = []
    for index, text in enumerate(texts):
        if isinstance(text, bytes):  # tf.data and grain hand strings over as UTF-8 bytes
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"texts[{index}] is not UTF-8: byte 0x{text[error.start]:02x} at position {error.start} "
                    f"({error.reason}) in {_shorten(repr(text))}"
                ) from None
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is a {type(text).__name__} ({text!r}); expected str")
        result.append(text)
    return result


def _check_context_length(context_length: int, minimum: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise TypeError(f"context_length must be an int, got {context_length!r}")
    if context_length < minimum:
        raise ValueError(f"context_length must be at least {minimum}, got {context_length}")
    return int(context_length)


def _fit_to_context(ids: list[int], context_length: int, truncate: bool, end_id: int, text: str) -> list[int]:
    """Return ids unchanged if they fit; cut them (keeping end_id last) if truncate; else raise."""
    if len(ids) <= context_length:
        return ids
    if not truncate:
        raise ValueError(
            f"text {_shorten(text)!r} is {len(ids)} tokens long (special tokens included), more than "
            f"context_length={context_length}; shorten it or pass truncate=True"
        )
    ids = ids[:context_length]
    ids[-1] = end_id
    return ids


def _pad_rows(rows: list[list[int]], context_length: int, pad_id: int) -> np.ndarray:
    result = np.full((len(rows), context_length), pad_id, dtype=np.int32)  # (n, context_length)
    for row_index, ids in enumerate(rows):
        result[row_index, : len(ids)] = ids
    return result


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


def _read_clip_merges(bpe_path: str) -> list[tuple[str, str]]:
    lines = gzip.decompress(epath.Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    merge_lines = lines[1 : 1 + CLIP_MERGE_COUNT]  # line 0 is a version header
    if len(merge_lines) < CLIP_MERGE_COUNT:
        raise ValueError(f"{bpe_path} holds {len(merge_lines)} merges; a CLIP BPE file needs {CLIP_MERGE_COUNT}")
    return [_parse_merge(line, bpe_path, number) for number, line in enumerate(merge_lines, start=2)]


def _parse_merge(line: str, path: str, line_number: int) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{path}, line {line_number}: expected two symbols, got {line!r}")
    return parts[0], parts[1]


class ClipTokenizer:
    """OpenAI CLIP's byte-level BPE tokenizer (the one every CLIP checkpoint was trained with).

    Rows are [start-of-text, text ids..., end-of-text, 0, 0, ...]. The end-of-text id is the largest
    id in the vocabulary, which is why the text model pools at the argmax of the ids.
    """

    pooling = "argmax"
    pad_token_id = 0

    def __init__(self, bpe_path: str | os.PathLike | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if bpe_path is None:
            bpe_path = find_bpe_path()
        bpe_path = os.fspath(bpe_path)
        if not epath.Path(bpe_path).is_file():
            raise FileNotFoundError(f"CLIP BPE merges file not found: {bpe_path!r}")
        merges = _read_clip_merges(bpe_path)
        byte_symbols = list(_byte_symbols().values())
        vocabulary = [
            *byte_symbols,
            *(symbol + END_OF_WORD for symbol in byte_symbols),
            *(first + second for first, second in merges),
            START_OF_TEXT,
            END_OF_TEXT,
        ]
        token_to_id = {token: index for index, token in enumerate(vocabulary)}
        self._initialise(token_to_id, merges, context_length, {"bpe_file": bpe_path})

    @classmethod
    def from_hf_files(
        cls,
        vocab_json: str | os.PathLike,
        merges_txt: str | os.PathLike,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> ClipTokenizer:
        """Build from a Hugging Face CLIPTokenizer's `vocab.json` (token -> id) and `merges.txt`."""
        vocab_json, merges_txt = os.fspath(vocab_json), os.fspath(merges_txt)
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
        tokenizer = cls.__new__(cls)
        tokenizer._initialise(
            token_to_id, merges, context_length, {"vocab_file": vocab_json, "merges_file": merges_txt}
        )
        return tokenizer

    def _initialise(
        self,
        token_to_id: dict[str, int],
        merges: list[tuple[str, str]],
        context_length: int,
        assets: dict[str, str],
    ) -> None:
        self.context_length = _check_context_length(context_length, minimum=2)
        self._token_to_id = token_to_id
        self._id_to_token = {index: token for token, index in token_to_id.items()}
        self._merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_to_symbol = _byte_symbols()
        self._symbol_to_byte = {symbol: byte for byte, symbol in self._byte_to_symbol.items()}
        self._assets = assets  # config key -> source path
        self.sot_token_id = token_to_id[START_OF_TEXT]
        self.eot_token_id = token_to_id[END_OF_TEXT]
        self.vocab_size = len(token_to_id)
        self._special_ids = {START_OF_TEXT: self.sot_token_id, END_OF_TEXT: self.eot_token_id}
        self._word_cache: dict[str, tuple[int, ...]] = {}
        # Bytes of the longest token: a word of B bytes has at least B / this many tokens.
        self._max_token_bytes = max(
            len(token) - (len(END_OF_WORD) if token.endswith(END_OF_WORD) else 0)
            for token in token_to_id
            if token not in self._special_ids
        )

    def _merge(self, symbols: list[str]) -> list[str]:
        """Byte-pair merging: repeatedly take the lowest-ranked pair of adjacent symbols and merge
        every occurrence of it, left to right without overlap, until no pair has a rank.

        The same result as rescanning the whole word after each merge (OpenAI's loop), in
        O(n log n): symbols form a linked list and candidate pairs wait in a heap keyed by (rank,
        position). All entries of the lowest rank are taken at once and merged in position order,
        which is exactly one left-to-right pass; entries whose pair has changed since are skipped.
        """
        count = len(symbols)
        if count < 2:
            return symbols
        ranks = self._merge_ranks
        following = list(range(1, count + 1))
        following[-1] = -1
        preceding = list(range(-1, count - 1))
        current: list[str | None] = list(symbols)
        heap = []
        for position in range(count - 1):
            rank = ranks.get((symbols[position], symbols[position + 1]))
            if rank is not None:
                heap.append((rank, position))
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            batch = []
            while heap and heap[0][0] == rank:
                batch.append(heapq.heappop(heap)[1])  # pops in position order
            for position in batch:
                first = current[position]
                right = following[position]
                if first is None or right < 0 or ranks.get((first, current[right])) != rank:
                    continue  # merged away, or the pair has changed since it was queued
                merged = first + current[right]
                current[position] = merged
                current[right] = None
                after = following[right]
                following[position] = after
                if after >= 0:
                    preceding[after] = position
                # A merged pair never has the rank it was merged at again, so new pairs wait for a
                # later pass, as in OpenAI's loop.
                before = preceding[position]
                if before >= 0:
                    new_rank = ranks.get((current[before], merged))
                    if new_rank is not None:
                        heapq.heappush(heap, (new_rank, before))
                if after >= 0:
                    new_rank = ranks.get((merged, current[after]))
                    if new_rank is not None:
                        heapq.heappush(heap, (new_rank, position))
        return [symbol for symbol in current if symbol is not None]

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word: its UTF-8 bytes as symbols, the last one marked
        end-of-word, merged by rank."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        symbols = [self._byte_to_symbol[byte] for byte in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        ids = tuple(self._token_to_id[symbol] for symbol in self._merge(symbols))
        if len(word) <= _CACHED_WORD_CHARACTERS:
            if len(self._word_cache) >= _BPE_CACHE_LIMIT:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids

    def _first_word_ids(self, word: str, needed: int) -> tuple[int, ...]:
        """The word's ids, or only its first `needed` ones when it is too long to fit anyway: a word
        of more than max_token_bytes * (needed + margin) bytes has more than `needed` tokens, so
        only a text that cannot fit in its row takes this path."""
        limit = self._max_token_bytes * (needed + _PREFIX_MARGIN_TOKENS)
        if 4 * len(word) <= limit:  # UTF-8 takes at most 4 bytes a character: spares encoding it
            return self._bpe_word(word)
        data = word.encode("utf-8")
        if len(data) <= limit:
            return self._bpe_word(word)
        # Byte-level BPE works on bytes, so a cut inside a multi-byte character is fine; the prefix
        # is not the end of the word, so its last symbol carries no end-of-word mark.
        symbols = [self._byte_to_symbol[byte] for byte in data[:limit]]
        return tuple(self._token_to_id[symbol] for symbol in self._merge(symbols)[:needed])

    def _text_ids(self, text: str, limit: int | None) -> list[int]:
        """Ids of a text (cleaned and lowercased here); with a `limit`, pre-tokenizing stops once
        that many ids are known and the ids beyond it may be missing."""
        ids: list[int] = []
        cache, special_ids = self._word_cache, self._special_ids
        # findall, not finditer: the texts of rows are bounded (max_text_characters), and pulling
        # matches one by one costs more than splitting words that are not used.
        for word in _CLIP_WORD_PATTERN.findall(clean_clip_text(text)):
            word_ids = cache.get(word)  # most words of a caption stream: looked up first
            if word_ids is not None:
                ids.extend(word_ids)
            elif word in special_ids:  # OpenAI's tokenizer maps a literal "<|endoftext|>" to its id
                ids.append(special_ids[word])
            elif limit is None:
                ids.extend(self._bpe_word(word))
            else:
                ids.extend(self._first_word_ids(word, limit - len(ids)))
            if limit is not None and len(ids) >= limit:
                break
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of the cleaned, lowercased text, without start- or end-of-text tokens (all of them:
        no length limit; __call__ reads a bounded part of a text)."""
        return self._text_ids(text, None)

    def _row(self, text: str, context_length: int, truncate: bool) -> list[int]:
        text = _check_text_characters(text, context_length, truncate)
        # One id more than fits tells that the text overflows; the ids after it do not matter.
        ids = self._text_ids(text, context_length - 1)
        if len(ids) > context_length - 2 and not truncate:
            ids = self.encode(text)  # the whole count for the error (a text of bounded length)
        row = [self.sot_token_id, *ids, self.eot_token_id]
        return _fit_to_context(row, context_length, truncate, self.eot_token_id, text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; start-of-text is skipped and decoding stops at the first end-of-text, so a
        padded row from __call__ decodes to its text. Case and spacing of the original are lost."""
        data = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if token_id == self.eot_token_id:
                break
            if token_id == self.sot_token_id:
                continue
            token = self._id_to_token.get(token_id)
            if token is None:
                raise ValueError(f"id {token_id} is outside the vocabulary of {self.vocab_size} tokens")
            ends_word = token.endswith(END_OF_WORD)
            if ends_word:
                token = token[: -len(END_OF_WORD)]
            data.extend(self._symbol_to_byte[symbol] for symbol in token)
            if ends_word:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def __call__(
        self,
        texts: TextBatch,
        context_length: int | None = None,
        truncate: bool = False,
    ) -> np.ndarray:
        """(n, context_length) int32 ids. A text too long for the context raises ValueError unless
        truncate=True, which cuts it and keeps end-of-text as the last token."""
        length = self.context_length if context_length is None else _check_context_length(context_length, 2)
        rows = [self._row(text, length, truncate) for text in _as_text_list(texts)]
        return _pad_rows(rows, length, self.pad_token_id)

    def asset_files(self) -> list[str]:
        """Files an exported model directory needs to rebuild this tokenizer."""
        return list(self._assets.values())

    def bpe_tables(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """(token -> id, merges in rank order): what a Hugging Face vocab.json and merges.txt hold."""
        merges = sorted(self._merge_ranks, key=self._merge_ranks.__getitem__)
        return dict(self._token_to_id), merges

    def to_config(self) -> dict:
        """JSON-able description; file names are relative to the exported model directory."""
        files = {key: epath.Path(path).name for key, path in self._assets.items()}
        return {"type": "clip", **files, "context_length": self.context_length}

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


class SentencePieceTokenizer:
    """A SentencePiece model, e.g. one trained with `train_sentencepiece` on your captions.

    Text keeps its case (only whitespace is collapsed); rows are [ids..., eos, pad, pad, ...], so
    the text model pools at the last position that is not padding.
    """

    pooling = "last"

    def __init__(self, model_path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH):
        model_path = os.fspath(model_path)
        if not epath.Path(model_path).is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_path!r}")
        self.model_path = model_path
        self.context_length = _check_context_length(context_length, minimum=1)
        self._load(epath.Path(model_path).read_bytes())

    def _load(self, model_proto: bytes) -> None:
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.pad_token_id = self._processor.pad_id()
        self.eot_token_id = self._processor.eos_id()
        self.vocab_size = self._processor.get_piece_size()
        if self.pad_token_id < 0 or self.eot_token_id < 0:
            raise ValueError(
                f"SentencePiece model {self.model_path!r} needs both a pad and an end-of-sentence piece "
                f"(pad_id={self.pad_token_id}, eos_id={self.eot_token_id}); train_sentencepiece makes "
                f"models with pad_id=0, unk_id=1, eos_id=2"
            )

    # The processor is a C++ object; pickle its serialised model so tokenizers can travel to
    # data-loading worker processes.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_processor"] = self._processor.serialized_model_proto()
        return state

    def __setstate__(self, state: dict) -> None:
        model_proto = state.pop("_processor")
        self.__dict__.update(state)
        self._load(model_proto)

    def encode(self, text: str) -> list[int]:
        """Piece ids of the whitespace-collapsed text, without the end-of-sentence id."""
        return self._processor.encode(_collapse_whitespace(text), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, stopping at the first end-of-sentence id and skipping padding."""
        kept = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == self.eot_token_id:
                break
            if token_id != self.pad_token_id:
                kept.append(token_id)
        return self._processor.decode(kept)

    def __call__(
        self,
        texts: TextBatch,
        context_length: int | None = None,
        truncate: bool = False,
    ) -> np.ndarray:
        """(n, context_length) int32 ids. A text too long for the context raises ValueError unless
        truncate=True, which cuts it and keeps end-of-sentence as the last token."""
        length = self.context_length if context_length is None else _check_context_length(context_length, 1)
        rows = [
            _fit_to_context(
                [*self.encode(_check_text_characters(text, length, truncate)), self.eot_token_id],
                length,
                truncate,
                self.eot_token_id,
                text,
            )
            for text in _as_text_list(texts)
        ]
        return _pad_rows(rows, length, self.pad_token_id)

    def asset_files(self) -> list[str]:
        """Files an exported model directory needs to rebuild this tokenizer."""
        return [self.model_path]

    def to_config(self) -> dict:
        """JSON-able description; the file name is relative to the exported model directory."""
        return {
            "type": "sentencepiece",
            "model_file": epath.Path(self.model_path).name,
            "context_length": self.context_length,
        }

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length})"
        )


Tokenizer = ClipTokenizer | SentencePieceTokenizer


def tokenizer_from_config(config: dict, directory: str | os.PathLike) -> Tokenizer:
    """Rebuild a tokenizer from `to_config()` output and a directory holding its `asset_files()`."""
    directory = os.fspath(directory)
    kind = config.get("type")
    context_length = config.get("context_length", DEFAULT_CONTEXT_LENGTH)

    def asset(key: str) -> str:
        if key not in config:
            raise ValueError(f"tokenizer config {config} of type {kind!r} lacks {key!r}")
        return os.fspath(epath.Path(directory) / config[key])

    if kind == "clip":
        if "bpe_file" in config:
            return ClipTokenizer(asset("bpe_file"), context_length=context_length)
        return ClipTokenizer.from_hf_files(asset("vocab_file"), asset("merges_file"), context_length=context_length)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(asset("model_file"), context_length=context_length)
    raise ValueError(f"unknown tokenizer type {kind!r} in config {config}; expected 'clip' or 'sentencepiece'")


def hf_tokenizer_files(directory: str | os.PathLike) -> tuple[str, str] | None:
    """(vocab.json, merges.txt) of a Hugging Face CLIP tokenizer in `directory` (as HF checkpoints
    ship them beside the weights), or None unless both are there. The paths are absolute: a
    tokenizer's asset files stay where they are if the working directory changes."""
    directory = paths.absolute(directory)
    vocab_json, merges_txt = directory / HF_VOCAB_FILE, directory / HF_MERGES_FILE
    if vocab_json.is_file() and merges_txt.is_file():
        return os.fspath(vocab_json), os.fspath(merges_txt)
    return None


def get_tokenizer(kind_or_path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """ "clip" -> OpenAI's BPE; a `.model` file -> SentencePiece; a `.txt.gz` file -> BPE from that
    merges file; a directory with vocab.json and merges.txt -> BPE from Hugging Face files."""
    name = os.fspath(kind_or_path)
    if name == "clip":
        return ClipTokenizer(context_length=context_length)
    if name.endswith(".model"):
        return SentencePieceTokenizer(name, context_length=context_length)
    if name.endswith(".txt.gz"):
        return ClipTokenizer(name, context_length=context_length)
    hf_files = hf_tokenizer_files(name)
    if hf_files is not None:
        return ClipTokenizer.from_hf_files(*hf_files, context_length=context_length)
    raise ValueError(
        f"cannot tell which tokenizer {name!r} is: expected 'clip', a SentencePiece '.model' file, "
        f"a '{BPE_FILENAME}'-style '.txt.gz' file, or a directory holding vocab.json and merges.txt"
    )


def _iterate_training_texts(texts: Iterable[str] | str | os.PathLike, counter: list[int]) -> Iterator[str]:
    """Cleaned, non-empty training texts; counts them in counter[0] so errors can report it."""
    if isinstance(texts, (str, os.PathLike)):
        with epath.Path(texts).open("r", encoding="utf-8") as handle:
            yield from _iterate_training_texts(handle, counter)
        return
    for text in texts:
        text = _collapse_whitespace(text)
        if text:
            counter[0] += 1
            yield text


def train_sentencepiece(
    texts: Iterable[str] | str | os.PathLike,
    vocab_size: int,
    output: str | os.PathLike,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    **trainer_options,
) -> str:
    """Train a SentencePiece model for SentencePieceTokenizer and write it to `output`.

    texts: captions in memory, or the path of a UTF-8 text file with one caption per line.
    The model reserves pad=0, unk=1, eos=2 and has no bos. Extra keyword arguments go to
    sentencepiece.SentencePieceTrainer (e.g. input_sentence_size=1_000_000 to subsample a big corpus).
    Returns the path of the written model.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 4:
        raise ValueError(f"vocab_size must be an int of at least 4 (pad, unk, eos and one piece), got {vocab_size!r}")
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"model_type must be 'unigram', 'bpe', 'char' or 'word', got {model_type!r}")
    if isinstance(texts, (str, os.PathLike)) and not epath.Path(texts).is_file():
        raise FileNotFoundError(f"training text file not found: {os.fspath(texts)!r}")
    output = os.fspath(output)
    counter = [0]
    options = dict(
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=0,
        unk_id=1,
        eos_id=2,
        bos_id=-1,
        minloglevel=2,  # the trainer's progress log is thousands of lines
    )
    options.update(trainer_options)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_iterate_training_texts(texts, counter), model_writer=model, **options
        )
    except RuntimeError as error:
        if counter[0] == 0:
            raise ValueError("no non-empty text to train a SentencePiece model on") from error
        # Drop the C++ source location ("INTERNAL: src/trainer_interface.cc(744) [check] ") and keep
        # the trainer's own advice, e.g. "Vocabulary size too high (5000). Please set it to a value <= 93."
        reason = str(error).rsplit("] ", 1)[-1]
        raise ValueError(
            f"SentencePiece training with vocab_size={vocab_size} on {counter[0]} texts failed: {reason}"
        ) from error
    epath.Path(output).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(output).write_bytes(model.getvalue())
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_jax.tokenizer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece model on a text file, one caption per line")
    train.add_argument("--input", required=True, help="UTF-8 text file, one caption per line")
    train.add_argument("--vocab-size", required=True, type=int)
    train.add_argument("--output", required=True, help="path of the model to write, e.g. spm.model")
    train.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    train.add_argument("--character-coverage", default=0.9995, type=float)
    arguments = parser.parse_args(argv)
    try:
        path = train_sentencepiece(
            arguments.input,
            arguments.vocab_size,
            arguments.output,
            model_type=arguments.model_type,
            character_coverage=arguments.character_coverage,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({SentencePieceTokenizer(path).vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
