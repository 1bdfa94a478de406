"""WebDataset tar shards: naming them (brace ranges, globs, local and remote paths, several
patterns at once), opening them, and reading one into its samples under limits.

Shards are streamed (plain, gzip, bzip2 or xz tars), never held whole, and reading one costs
bounded memory whatever it holds: a member over its size cap is skipped unread, a shard stops
after `max_shard_bytes` decompressed bytes, and links, devices and duplicate names are refused;
each case is counted (sources.SKIP_REASONS). clip_jax.data.webdataset makes a training source of
the samples.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob as glob_module
import gzip
import io
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Collection, Sequence
from typing import BinaryIO, NamedTuple

from etils import epath

from clip_jax import paths

DEFAULT_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
DEFAULT_TEXT_EXTENSION = "txt"

# Default caps (config.data.webdataset.*). img2dataset writes images of tens to hundreds of KB and
# captions of at most a few KB; a ViT's text tower reads at most ~5 KB of a caption
# (text_cleaning.max_text_characters).
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20
DEFAULT_MAX_CAPTION_BYTES = 64 * 2**10
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

# tarfile reads a long-name or pax header whole before the member it describes is seen; names and
# attributes take a few hundred bytes, so a larger header is refused.
_MAX_EXTENDED_HEADER_BYTES = 2**20
# Decompressed bytes tarfile asks for at a time: one read of a remote file costs a round trip.
_READ_BUFFER_BYTES = 2**20

_GLOB_CHARACTERS = re.compile(r"[*?\[]")
_NUMERIC_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# --------------------------------------------------------------------------------------------
# Naming shards: brace ranges, globs, local and remote paths.
# --------------------------------------------------------------------------------------------


def _matching_brace(pattern: str, start: int) -> int:
    depth = 0
    for index in range(start, len(pattern)):
        if pattern[index] == "{":
            depth += 1
        elif pattern[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")


def _split_top_level_commas(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for character in text:
        if character == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += character == "{"
        depth -= character == "}"
        current.append(character)
    parts.append("".join(current))
    return parts


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: "a{00..02}b" -> a00b a01b a02b (zero padding kept), "{x,y}",
    several and nested groups. Text without braces is returned as it is."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return [pattern]
    end = _matching_brace(pattern, start)
    prefix, body, suffix = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    numeric = _NUMERIC_RANGE.match(body)
    if numeric:
        first_text, last_text = numeric.groups()
        first, last = int(first_text), int(last_text)
        padded = any(len(text.lstrip("-")) > 1 and text.lstrip("-").startswith("0") for text in (first_text, last_text))
        width = max(len(first_text), len(last_text)) if padded else 0
        step = 1 if last >= first else -1
        choices = [str(value).zfill(width) for value in range(first, last + step, step)]
    elif "," in body:
        choices = [expanded for part in _split_top_level_commas(body) for expanded in expand_braces(part)]
    else:
        raise ValueError(f"cannot expand '{{{body}}}' in shard pattern {pattern!r}: use {{a..b}} or {{x,y}}")
    return [prefix + choice + rest for choice in choices for rest in expand_braces(suffix)]


def _split_directory(path: str) -> tuple[str, str]:
    directory, _, name = path.rpartition("/")
    return directory or ".", name


def _list_directory(directory: str) -> set[str] | None:
    """Names in `directory`, or None if it does not exist."""
    path = epath.Path(directory)
    if not path.is_dir():
        return None
    return {child.name for child in path.iterdir()}


def _glob(pattern: str) -> list[str]:
    if not paths.is_local(pattern):  # an object store's glob matches file names only
        directory, name_pattern = _split_directory(pattern)
        if _GLOB_CHARACTERS.search(directory):
            raise ValueError(f"remote shard pattern {pattern!r}: only the file name may hold * ? [ ]")
        return [str(path) for path in epath.Path(directory).glob(name_pattern)]
    return glob_module.glob(pattern)


SEVERAL_PATTERNS_HINT = (
    "several patterns are written as one string, separated by commas outside braces, "
    "e.g. 'a/*.tar,b/{00000..00009}.tar'"
)


def split_patterns(text: str) -> list[str]:
    """The patterns of a `data.webdataset.shards` string: separated by commas outside braces
    (commas inside braces are brace lists), surrounding whitespace and empty parts dropped."""
    return [part.strip() for part in _split_top_level_commas(text) if part.strip()]


def resolve_shards(patterns: str | Sequence[str]) -> list[str]:
    """The shard files named by glob/brace patterns, sorted, each once; raises ValueError when a
    pattern matches nothing or names a file that does not exist (before any training starts).

    `patterns`: one string holding one or more comma-separated patterns (split_patterns), or a
    sequence of such strings."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = [pattern for text in patterns if text for pattern in split_patterns(text)]
    if not patterns:
        raise ValueError("data.webdataset.shards is empty: give a glob or brace range of .tar files")
    found: set[str] = set()
    for pattern in patterns:
        explicit: list[str] = []
        for expanded in expand_braces(pattern):
            if _GLOB_CHARACTERS.search(expanded):
                matches = _glob(expanded)
                if not matches:
                    raise ValueError(
                        f"data.webdataset.shards: no file matches {expanded!r} (from {pattern!r}); "
                        f"{SEVERAL_PATTERNS_HINT}"
                    )
                found.update(matches)
            else:
                explicit.append(expanded)
        # Existence of explicit names: one directory listing per directory, not one request per
        # shard (thousands of shards on gs:// would take minutes otherwise).
        by_directory: dict[str, list[str]] = {}
        for path in explicit:
            by_directory.setdefault(_split_directory(path)[0], []).append(path)
        for directory, named in by_directory.items():
            names = _list_directory(directory)
            if names is None:
                raise ValueError(
                    f"data.webdataset.shards: directory {directory!r} does not exist (from {pattern!r}); "
                    f"{SEVERAL_PATTERNS_HINT}"
                )
            missing = [path for path in named if _split_directory(path)[1] not in names]
            if missing:
                raise ValueError(
                    f"data.webdataset.shards: {len(missing)} of the {len(named)} shards named by {pattern!r} in "
                    f"{directory!r} do not exist, e.g. {missing[:3]}"
                )
            found.update(named)
    return sorted(found)


def open_shard(path: str) -> BinaryIO:
    """The shard's bytes as a file object, read as they are needed (local or remote)."""
    return epath.Path(path).open("rb")


# --------------------------------------------------------------------------------------------
# Reading a tar shard into samples.
# --------------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first "." of the file name, the extension
    (lower-cased) the rest: "dir/000123.seg.png" -> ("dir/000123", "seg.png")."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension.lower() if dot else ""


@dataclasses.dataclass(frozen=True)
class ShardLimits:
    """What reading one shard may cost; see config.data.webdataset.max_*_bytes."""

    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # any member but the caption
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES  # a member with the text extension
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES  # decompressed tar bytes, headers included

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.webdataset.{field.name} must be a positive number of bytes, got {value!r}")


# The caps config.data.webdataset sets by default.
DEFAULT_SHARD_LIMITS = ShardLimits()


class TarSample(NamedTuple):
    """One sample of a tar: its key, {extension: bytes} of the members read, and a
    sources.SKIP_REASONS entry when a member made it unusable (its files are then not kept)."""

    key: str
    files: dict[str, bytes]
    problem: str | None = None


class _HeaderTooLarge(Exception):
    """Raised inside tarfile when a header alone is over _MAX_EXTENDED_HEADER_BYTES."""


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses a long-name or pax header larger than _MAX_EXTENDED_HEADER_BYTES,
    which tarfile would read whole into memory. `_proc_member` is tarfile's private dispatch (the
    same since Python 2.6); should it change, the check is skipped and nothing else breaks."""

    _EXTENDED_TYPES = (
        tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE
    )  # fmt: skip

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self._EXTENDED_TYPES and self.size > _MAX_EXTENDED_HEADER_BYTES:
            raise _HeaderTooLarge(f"{self.size}-byte extended header at offset {self.offset}")
        return super()._proc_member(archive)


class _Rejoined(io.RawIOBase):
    """The bytes already read from the start of a file, then the rest of the file."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _decompressed(file: BinaryIO) -> BinaryIO:
    """The file's tar bytes, decompressed by its magic number (gzip, bzip2, xz; else as it is).

    The decompressors' read(n) returns at most n bytes however well the input compresses;
    tarfile's own ("r|*") calls decompress() without that limit, so one 10 KB chunk of a bzip2
    bomb could become gigabytes."""
    head = file.read(6)
    stream = io.BufferedReader(_Rejoined(head, file), buffer_size=_READ_BUFFER_BYTES)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream, mode="rb")
    return stream


# What a shard that breaks off mid-way raises, from tarfile or from the decompressors.
_BROKEN_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


class _SampleGrouper:
    """Groups consecutive tar members sharing a key into TarSamples, reading only the wanted ones
    and marking (dropping the files of) a sample whose members break a rule (read_tar_samples)."""

    def __init__(self, limits: ShardLimits, text_extension: str, wanted: Collection[str] | None) -> None:
        self.limits, self.text_extension, self.wanted = limits, text_extension, wanted
        self.samples: list[TarSample] = []
        self.key: str | None = None
        self.files: dict[str, bytes] = {}
        self.seen: set[str] = set()
        self.problem: str | None = None

    def finish(self) -> None:
        """Ends the sample being read (if any), keeping its files only when it has no problem."""
        if self.key is not None:
            self.samples.append(TarSample(self.key, {} if self.problem else self.files, self.problem))

    def _mark(self, problem: str) -> None:
        self.problem = self.problem or problem  # the first problem names the sample's

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Takes the next member of the archive: starts a new sample on a new key, reads it or
        marks the sample."""
        if member.isdir():
            return
        member_key, extension = split_member_name(member.name)
        if os.path.basename(member_key).startswith("."):  # macOS resource forks and the like
            return
        if member_key != self.key:
            self.finish()
            self.key, self.files, self.seen, self.problem = member_key, {}, set(), None
        if self.wanted is not None and extension not in self.wanted:
            return
        if extension in self.seen:
            self._mark("duplicate_member")
            return
        self.seen.add(extension)
        if not member.isfile():
            self._mark("link_member")
            return
        cap = self.limits.max_caption_bytes if extension == self.text_extension else self.limits.max_member_bytes
        if member.size > cap:
            self._mark("member_too_large")
        if self.problem is not None:
            return  # a sample already lost is not read on
        handle = archive.extractfile(member)
        content = handle.read() if handle is not None else b""
        if len(content) != member.size:
            raise tarfile.ReadError(f"member {member.name!r} is cut short")
        self.files[extension] = content


def read_tar_samples(
    source: bytes | BinaryIO,
    limits: ShardLimits = DEFAULT_SHARD_LIMITS,
    text_extension: str = DEFAULT_TEXT_EXTENSION,
    extensions: Collection[str] | None = None,
) -> tuple[list[TarSample], str | None]:
    """(samples in archive order, shard problem or None), streaming `source` (bytes or a binary
    file object, plain or gzip/bzip2/xz-compressed).

    Files of one sample are consecutive members sharing a key. Only members whose extension is in
    `extensions` (all if None) are read or checked. A sample is marked (its files dropped) when one
    of its members is over its cap (`max_caption_bytes` for `text_extension`, else
    `max_member_bytes`; never read), is not a regular file (symbolic or hard link, device, FIFO;
    never followed), or repeats a name. The shard problem: "truncated_shard" when the tar breaks
    off, "shard_too_large" when the next member would end past `max_shard_bytes` decompressed
    bytes, "member_too_large" when a header alone is too large; the samples before are kept, the
    one being read is dropped (it may be missing files)."""
    file = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    wanted = None if extensions is None else {extension.lower() for extension in extensions}
    grouper = _SampleGrouper(limits, text_extension.lower().lstrip("."), wanted)
    shard_problem: str | None = None
    try:
        with tarfile.open(
            fileobj=_decompressed(file), mode="r|", tarinfo=_BoundedTarInfo, bufsize=_READ_BUFFER_BYTES
        ) as archive:
            for member in archive:
                # Everything after the header, whether read or skipped, is decompressed.
                if member.offset_data + member.size > limits.max_shard_bytes:
                    shard_problem = "shard_too_large"
                    if split_member_name(member.name)[0] != grouper.key:
                        grouper.finish()  # the sample before this member is whole
                    break
                grouper.add(archive, member)
    except _HeaderTooLarge:
        shard_problem = "member_too_large"
    except _BROKEN_SHARD_ERRORS:
        shard_problem = "truncated_shard"
    if shard_problem is None:
        grouper.finish()
    return grouper.samples, shard_problem
