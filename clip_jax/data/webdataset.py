"""img2dataset / WebDataset shards as a training source: tar files of `{key}.jpg|png|webp` +
`{key}.txt` (+ `.json`), named by a glob or brace range, local or on gs://.

Each epoch the shard list is permuted with the seed and dealt to the processes (shard i of the
permutation goes to process i mod process_count). A process reads its shards in windows of
`shards_per_window` into memory, and emits each window's samples in a seeded permutation, so a
position is just (epoch, window, offset) and resuming re-reads one window.

Shards are streamed (plain, gzip, bzip2 or xz tars), never held whole, and reading one costs
bounded memory whatever it holds: a member over its size cap is skipped unread, a shard stops
after `max_shard_bytes` decompressed bytes, and links, devices and duplicate names are refused;
each case is counted (sources.SKIP_REASONS).
"""

from __future__ import annotations

import bz2
import concurrent.futures
import dataclasses
import glob as glob_module
import gzip
import io
import logging
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, NamedTuple

import ml_collections
from etils import epath

from clip_jax import paths
from clip_jax.data.sources import RawExample, check_process_layout, epoch_permutation, even_share

logger = logging.getLogger(__name__)

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
    limits: ShardLimits = ShardLimits(),
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


def _pick_image(files: Mapping[str, bytes], image_extensions: Sequence[str]) -> bytes | None:
    for extension in image_extensions:
        if extension in files:
            return files[extension]
    return None


# --------------------------------------------------------------------------------------------
# The source.
# --------------------------------------------------------------------------------------------


def remaining_windows(
    saved_positions: Sequence[Mapping[str, Any]], shards_per_window: int, window_count: Any
) -> tuple[list[list[int]], int]:
    """(the windows a run saved by `len(saved_positions)` processes had not finished, as plan
    ranges [epoch, process count, process index, shards per window, first, end, offset]; the last
    epoch any saved process had begun). `window_count(epoch, count, index, size)` counts a
    process's windows. Each saved process contributes the rest of its own plan (if it was itself
    resumed elsewhere), then its windows from its position to the end of that last epoch."""
    count = len(saved_positions)
    pending: list[tuple[list[list[int]], int, int, int]] = []  # (plan rest, epoch, window, offset)
    for position in saved_positions:
        plan = [[int(value) for value in entry] for entry in position.get("plan", [])]
        if plan:
            pending.append((plan, int(position["epoch"]), 0, 0))
        else:
            pending.append(([], int(position["epoch"]), int(position["window"]), int(position["offset"])))
    begun = [epoch for plan, epoch, _, _ in pending if not plan] + [entry[0] for plan, *_ in pending for entry in plan]
    last_epoch = max(begun) if begun else max(epoch for _, epoch, _, _ in pending) - 1
    ranges: list[list[int]] = []
    for index, (plan, epoch, window, offset) in enumerate(pending):
        ranges.extend(entry for entry in plan if entry[4] < entry[5])
        for each_epoch in range(epoch, last_epoch + 1):
            end = window_count(each_epoch, count, index, shards_per_window)
            start, start_offset = (window, offset) if each_epoch == epoch else (0, 0)
            if start < end:
                ranges.append([each_epoch, count, index, shards_per_window, start, end, start_offset])
    return ranges, last_epoch


def cut_windows(ranges: Sequence[Sequence[int]], begin: int, stop: int) -> list[list[int]]:
    """Windows number [begin, stop) of the ranges laid end to end, as ranges (the offset stays
    with a range's first window only)."""
    result: list[list[int]] = []
    seen = 0
    for epoch, count, index, size, first, end, offset in ranges:
        low, high = max(first, first + begin - seen), min(end, first + stop - seen)
        if low < high:
            result.append([epoch, count, index, size, low, high, offset if low == first else 0])
        seen += end - first
    return result


class WebDatasetSource:
    """This process's endless stream of raw examples from WebDataset shards (see the module doc).

    Position: {"epoch", "window", "offset"}: the next example is number `offset` of window `window`
    of epoch `epoch` of this process. The next window is read in the background.
    """

    ready_sized = False  # stored images of any size: decoded, cropped and resized

    def __init__(
        self,
        shards: Sequence[str],
        process_index: int,
        process_count: int,
        seed: int,
        shards_per_window: int = 4,
        image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
        text_extension: str = DEFAULT_TEXT_EXTENSION,
        limits: ShardLimits = ShardLimits(),
    ) -> None:
        check_process_layout(process_index, process_count)
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("no shards given")
        if len(self.shards) < process_count:
            raise ValueError(
                f"{len(self.shards)} shards cannot be shared by {process_count} processes: every process "
                "needs at least one shard (write smaller shards, e.g. img2dataset --number_sample_per_shard)"
            )
        if shards_per_window < 1:
            raise ValueError(f"data.webdataset.shards_per_window must be >= 1, got {shards_per_window}")
        self.process_index = process_index
        self.process_count = process_count
        self.seed = seed
        self.shards_per_window = shards_per_window
        self.image_extensions = tuple(extension.lower().lstrip(".") for extension in image_extensions)
        self.text_extension = text_extension.lower().lstrip(".")
        if not self.image_extensions or not self.text_extension:
            raise ValueError(f"image extensions {image_extensions!r} and text extension {text_extension!r} must be set")
        self.limits = limits
        self._windows_cache: tuple[tuple[int, ...], list[list[int]]] = ((), [])
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, shards_per_window), thread_name_prefix="clip_jax-shards"
        )

    def fingerprint(self) -> str:
        return f"webdataset: {len(self.shards)} shards {self.shards[0]} .. {self.shards[-1]}"

    def initial_position(self) -> dict[str, int]:
        return {"epoch": 0, "window": 0, "offset": 0}

    def record_reader(self) -> None:
        return None  # examples carry their bytes

    def process_shards(self, epoch: int) -> list[int]:
        """Indices (into `shards`) of this process's shards in epoch `epoch`, in reading order."""
        return self._layout_shards(epoch, self.process_count, self.process_index)

    def _layout_shards(self, epoch: int, process_count: int, process_index: int) -> list[int]:
        """Process `process_index`'s shards of epoch `epoch` when `process_count` processes read."""
        order = epoch_permutation(len(self.shards), self.seed, epoch)
        return [int(index) for index in order[process_index::process_count]]

    def _windows(self, epoch: int) -> list[list[int]]:
        return self._layout_windows((epoch, self.process_count, self.process_index, self.shards_per_window))

    def _layout_windows(self, layout: tuple[int, int, int, int]) -> list[list[int]]:
        """The windows of a layout (epoch, process count, process index, shards per window)."""
        if self._windows_cache[0] == layout:
            return self._windows_cache[1]
        epoch, process_count, process_index, size = layout
        shards = self._layout_shards(epoch, process_count, process_index)
        windows = [shards[start : start + size] for start in range(0, len(shards), size)]
        self._windows_cache = (layout, windows)
        return windows

    def _read_shard(self, shard_index: int) -> tuple[list[TarSample], str | None]:
        path = self.shards[shard_index]
        try:
            file = open_shard(path)
        except Exception:  # OSError locally; remote file systems raise their own kinds
            return [], "unreadable_shard"
        # Only the files a sample is made of are read: the rest (.json, ...) are skipped unread.
        extensions = (*self.image_extensions, self.text_extension)
        try:
            with file:
                return read_tar_samples(file, self.limits, self.text_extension, extensions)
        except Exception as error:  # noqa: BLE001 - remote file systems raise their own kinds mid-stream
            # read_tar_samples handles what a broken tar raises; anything else (a network error
            # of a remote file system) must not stop training either.
            logger.warning("Cannot read shard %s: %s: %s", path, type(error).__name__, error)
            return [], "unreadable_shard"

    def _start_window(self, epoch: int, window: int, layout: tuple[int, int, int] | None = None) -> list:
        """Starts reading a window's shards; `layout` (process count, index, shards per window)
        names another topology's window (a resume's plan), this process's by default."""
        windows = self._layout_windows((epoch, *(layout or self._own_layout())))
        if window >= len(windows):
            return []
        return [self._reader.submit(self._read_shard, shard) for shard in windows[window]]

    def _own_layout(self) -> tuple[int, int, int]:
        return (self.process_count, self.process_index, self.shards_per_window)

    def _window_examples(
        self,
        epoch: int,
        window: int,
        futures: Sequence[concurrent.futures.Future],
        layout: tuple[int, int, int] | None = None,
    ) -> list[RawExample]:
        """The window's examples in emitting order: shard-level problems first (so each is counted
        exactly once, resumed or not), then every sample of its shards in a seeded permutation."""
        layout = layout or self._own_layout()
        shard_indices = self._layout_windows((epoch, *layout))[window]
        problems: list[RawExample] = []
        samples: list[RawExample] = []
        for shard_index, future in zip(shard_indices, futures):
            shard_samples, problem = future.result()
            path = self.shards[shard_index]
            if problem is not None:
                problems.append(
                    RawExample(None, None, (shard_index, -1), epoch, problem=problem, description=f"shard {path}")
                )
            for member_index, (key, files, problem) in enumerate(shard_samples):
                image = _pick_image(files, self.image_extensions)
                text = files.get(self.text_extension)
                if problem is not None:
                    image = text = None
                elif image is None:
                    problem = "missing_image"
                elif text is None:
                    problem = "missing_caption"
                samples.append(
                    RawExample(image, text, (shard_index, member_index), epoch, problem, description=f"{path}:{key}")
                )
        order = epoch_permutation(len(samples), self.seed, epoch, layout[1], window) if samples else []
        return problems + [samples[index] for index in order]

    def examples(
        self, position: Mapping[str, Any], text_only: bool = False
    ) -> Iterator[tuple[RawExample, dict[str, Any]]]:
        del text_only  # a tar is read whole either way, and images stay undecoded bytes
        epoch, window, offset = int(position["epoch"]), int(position["window"]), int(position["offset"])
        if min(epoch, window, offset) < 0:
            raise ValueError(f"invalid webdataset position {dict(position)!r}")
        plan = [[int(value) for value in entry] for entry in position.get("plan", [])]
        if plan:  # the rest of a run saved on another topology first
            yield from self._plan_examples(plan, epoch)
            window, offset = 0, 0
        yield from self._epoch_examples(epoch, window, offset)

    def _epoch_examples(self, epoch: int, window: int, offset: int) -> Iterator[tuple[RawExample, dict[str, Any]]]:
        futures = self._start_window(epoch, window)
        # Only an epoch read from its first window can prove that this process has no sample.
        whole_epoch_seen, examples_this_epoch = window == 0, 0
        while True:
            windows_this_epoch = len(self._windows(epoch))
            if window < windows_this_epoch:
                examples = self._window_examples(epoch, window, futures)
                examples_this_epoch += len(examples)
                # Read the next window while this one is consumed.
                if window + 1 < windows_this_epoch:
                    futures = self._start_window(epoch, window + 1)
                else:
                    futures = self._start_window(epoch + 1, 0)
                for index in range(offset, len(examples)):
                    yield examples[index], {"epoch": epoch, "window": window, "offset": index + 1}
                window, offset = window + 1, 0
            if window >= windows_this_epoch:
                if whole_epoch_seen and examples_this_epoch == 0:
                    raise RuntimeError(f"process {self.process_index}'s shards of epoch {epoch} hold no sample at all")
                epoch, window, offset = epoch + 1, 0, 0
                whole_epoch_seen, examples_this_epoch = True, 0
                if not futures:
                    futures = self._start_window(epoch, 0)

    def _plan_examples(self, plan: list[list[int]], next_epoch: int) -> Iterator[tuple[RawExample, dict[str, Any]]]:
        """The examples of a resume plan: ranges [epoch, process count, process index, shards per
        window, first window, end window, offset in the first window] of windows of the saved
        topology, each read as the saved process would have; positions carry the rest of the plan."""
        windows = [(number, window) for number, entry in enumerate(plan) for window in range(entry[4], entry[5])]
        futures = self._start_plan_window(plan, windows[0]) if windows else []
        for step, (number, window) in enumerate(windows):
            epoch, count, index, size, first, end, offset = plan[number]
            examples = self._window_examples(epoch, window, futures, (count, index, size))
            # Read the next window while this one is consumed.
            futures = self._start_plan_window(plan, windows[step + 1]) if step + 1 < len(windows) else []
            for place in range(offset if window == first else 0, len(examples)):
                rest = [[epoch, count, index, size, window, end, place + 1], *plan[number + 1 :]]
                yield examples[place], {"epoch": next_epoch, "window": 0, "offset": 0, "plan": rest}

    def _start_plan_window(self, plan: list[list[int]], where: tuple[int, int]) -> list:
        epoch, count, index, size, *_ = plan[where[0]]
        return self._start_window(epoch, where[1], (count, index, size))

    def resume_position(self, saved_positions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """This process's position continuing a run saved by `len(saved_positions)` processes: the
        windows the saved processes had not finished, up to the last epoch any of them had begun,
        are cut into `process_count` runs of consecutive windows; this process reads its run (the
        plan), skipping what was read of a started window, then epochs go on in this topology."""
        ranges, last_epoch = remaining_windows(saved_positions, self.shards_per_window, self._window_count)
        total = sum(end - first for _, _, _, _, first, end, _ in ranges)
        begin, stop = even_share(total, self.process_index, self.process_count)
        return {"epoch": last_epoch + 1, "window": 0, "offset": 0, "plan": cut_windows(ranges, begin, stop)}

    def _window_count(self, epoch: int, process_count: int, process_index: int, size: int) -> int:
        return len(self._layout_windows((epoch, process_count, process_index, size)))

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)


def source_from_config(
    data_config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> WebDatasetSource:
    """The shards source of `config.data` (`data.webdataset.*`), shards resolved and checked now."""
    settings = data_config.webdataset
    extensions = [extension.strip() for extension in str(settings.image_extensions).split(",") if extension.strip()]
    return WebDatasetSource(
        resolve_shards(settings.shards),
        process_index,
        process_count,
        seed=int(data_config.seed),
        shards_per_window=int(settings.shards_per_window),
        image_extensions=extensions,
        text_extension=str(settings.text_extension),
        limits=ShardLimits(
            max_member_bytes=int(settings.max_member_bytes),
            max_caption_bytes=int(settings.max_caption_bytes),
            max_shard_bytes=int(settings.max_shard_bytes),
        ),
    )
