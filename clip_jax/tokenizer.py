"""Text tokenizers: OpenAI CLIP's byte-level BPE, SentencePiece, and training a SentencePiece model.

Both tokenizers turn strings into an int32 array of shape (n, context_length), padded on the right.

Bounded cost: a row of context_length L reads at most `max_text_characters(L)` (64 L) characters of a
text; a text that long or shorter is encoded exactly as open_clip encodes it. With truncate=True a
longer text loses its leading whitespace and is cut to that many characters (at a space when there
is one) before cleaning, and the CLIP tokenizer stops pre-tokenizing once the row is full and
BPE-encodes only a bounded prefix of a word too long to fit, so a row costs a bounded amount of work
whatever the length of its text or of its longest word. Byte-pair merging runs on a heap, O(n log n) in a
word's bytes. Reading the vocabulary files: clip_jax.tokenizer_files; cleaning and bounding the
texts: clip_jax.text_cleaning.
"""

from __future__ import annotations

import argparse
import heapq
import io
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import regex
import sentencepiece
from etils import epath

from clip_jax.text_cleaning import TextBatch, as_text_list, clean_clip_text, collapse_whitespace, readable_text, shorten
from clip_jax.tokenizer_files import (
    BPE_FILENAME,
    END_OF_TEXT,
    END_OF_WORD,
    START_OF_TEXT,
    byte_symbols,
    find_bpe_path,
    hf_tokenizer_files,
    read_clip_bpe,
    read_hf_files,
)

DEFAULT_CONTEXT_LENGTH = 77
# OpenAI's pre-tokenizer: its special tokens, common English contractions, runs of letters,
# single digits, and runs of anything else that is not whitespace.
_CLIP_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

# The per-word BPE cache is cleared when it reaches this size, to bound memory on endless streams;
# only words up to _CACHED_WORD_CHARACTERS are kept, so one entry cannot hold a megabyte-long word.
_BPE_CACHE_LIMIT = 200_000
_CACHED_WORD_CHARACTERS = 64

# When a word is too long to fit in the row, only a prefix of it is BPE-encoded: enough bytes for
# this many tokens beyond the ones kept, so that the cut cannot reach the kept tokens (merges act
# on neighbouring symbols; the kept ids equal those of the whole word in every test).
_PREFIX_MARGIN_TOKENS = 64


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
            f"text {shorten(text)!r} is {len(ids)} tokens long (special tokens included), more than "
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


class _RowTokenizer:
    """What both tokenizers do alike: texts -> padded rows, one a text, each made by the subclass's
    `_row(text, context_length, truncate)` and ended by its end token."""

    min_context_length: int  # the shortest row the tokenizer can make: its special tokens
    context_length: int
    pad_token_id: int

    def _row(self, text: str, context_length: int, truncate: bool) -> list[int]:
        raise NotImplementedError

    def __call__(
        self,
        texts: TextBatch,
        context_length: int | None = None,
        truncate: bool = False,
    ) -> np.ndarray:
        """(n, context_length) int32 ids. A text too long for the context raises ValueError unless
        truncate=True, which cuts it and keeps the end token (end-of-text, end-of-sentence) last."""
        if context_length is None:
            length = self.context_length
        else:
            length = _check_context_length(context_length, self.min_context_length)
        rows = [self._row(text, length, truncate) for text in as_text_list(texts)]
        return _pad_rows(rows, length, self.pad_token_id)


class ClipTokenizer(_RowTokenizer):
    """OpenAI CLIP's byte-level BPE tokenizer (the one every CLIP checkpoint was trained with).

    Rows are [start-of-text, text ids..., end-of-text, 0, 0, ...]. The end-of-text id is the largest
    id in the vocabulary, which is why the text model pools at the argmax of the ids.
    """

    pooling = "argmax"
    pad_token_id = 0
    min_context_length = 2  # start- and end-of-text

    def __init__(self, bpe_path: str | os.PathLike | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if bpe_path is None:
            bpe_path = find_bpe_path()
        bpe_path = os.fspath(bpe_path)
        token_to_id, merges = read_clip_bpe(bpe_path)
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
        token_to_id, merges = read_hf_files(vocab_json, merges_txt)
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
        self.context_length = _check_context_length(context_length, self.min_context_length)
        self._token_to_id = token_to_id
        self._id_to_token = {index: token for token, index in token_to_id.items()}
        self._merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_to_symbol = byte_symbols()
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
        text = readable_text(text, context_length, truncate)
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


class SentencePieceTokenizer(_RowTokenizer):
    """A SentencePiece model, e.g. one trained with `train_sentencepiece` on your captions.

    Text keeps its case (only whitespace is collapsed); rows are [ids..., eos, pad, pad, ...], so
    the text model pools at the last position that is not padding.
    """

    pooling = "last"
    min_context_length = 1  # end-of-sentence

    def __init__(self, model_path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH):
        model_path = os.fspath(model_path)
        if not epath.Path(model_path).is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_path!r}")
        self.model_path = model_path
        self.context_length = _check_context_length(context_length, self.min_context_length)
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
        return self._processor.encode(collapse_whitespace(text), out_type=int)

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

    def _row(self, text: str, context_length: int, truncate: bool) -> list[int]:
        ids = [*self.encode(readable_text(text, context_length, truncate)), self.eot_token_id]
        return _fit_to_context(ids, context_length, truncate, self.eot_token_id, text)

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
        text = collapse_whitespace(text)
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
