"""img2dataset / WebDataset shards as a training source: tar files of `{key}.jpg|png|webp` +
`{key}.txt` (+ `.json`), named by a glob or brace range, local or on gs://.

Each epoch the shard list is permuted with the seed and dealt to the processes (shard i of the
permutation goes to process i mod process_count). A process reads its shards in windows of
`shards_per_window`, whole into memory, and emits each window's samples in a seeded permutation,
so a position is just (epoch, window, offset) and resuming re-reads one window.
"""

from __future__ import annotations

import concurrent.futures
import glob as glob_module
import io
import os
import re
import tarfile
from typing import Iterator, Mapping, Sequence

import ml_collections

from clip_jax.data.pipeline import RawExample, check_process_layout, epoch_permutation

DEFAULT_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
DEFAULT_TEXT_EXTENSION = "txt"

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


def _is_remote(path: str) -> bool:
    return "://" in path


def _split_directory(path: str) -> tuple[str, str]:
    directory, _, name = path.rpartition("/")
    return directory or ".", name


def _list_directory(directory: str) -> set[str] | None:
    """Names in `directory`, or None if it does not exist."""
    if _is_remote(directory):
        from etils import epath

        path = epath.Path(directory)
        if not path.exists():
            return None
        return {child.name for child in path.iterdir()}
    if not os.path.isdir(directory):
        return None
    return set(os.listdir(directory))


def _glob(pattern: str) -> list[str]:
    if _is_remote(pattern):
        from etils import epath

        directory, name_pattern = _split_directory(pattern)
        if _GLOB_CHARACTERS.search(directory):
            raise ValueError(f"remote shard pattern {pattern!r}: only the file name may hold * ? [ ]")
        return [str(path) for path in epath.Path(directory).glob(name_pattern)]
    return glob_module.glob(pattern)


def resolve_shards(patterns: str | Sequence[str]) -> list[str]:
    """The shard files named by glob/brace patterns, sorted, each once; raises ValueError when a
    pattern matches nothing or names a file that does not exist (before any training starts)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = [pattern.strip() for pattern in patterns if pattern and pattern.strip()]
    if not patterns:
        raise ValueError("data.webdataset.shards is empty: give a glob or brace range of .tar files")
    found: set[str] = set()
    for pattern in patterns:
        explicit: list[str] = []
        for expanded in expand_braces(pattern):
            if _GLOB_CHARACTERS.search(expanded):
                matches = _glob(expanded)
                if not matches:
                    raise ValueError(f"data.webdataset.shards: no file matches {expanded!r} (from {pattern!r})")
                found.update(matches)
            else:
                explicit.append(expanded)
        # Existence of explicit names: one directory listing per directory, not one request per
        # shard (thousands of shards on gs:// would take minutes otherwise).
        by_directory: dict[str, list[str]] = {}
        for path in explicit:
            by_directory.setdefault(_split_directory(path)[0], []).append(path)
        for directory, paths in by_directory.items():
            names = _list_directory(directory)
            if names is None:
                raise ValueError(f"data.webdataset.shards: directory {directory!r} does not exist (from {pattern!r})")
            missing = [path for path in paths if _split_directory(path)[1] not in names]
            if missing:
                raise ValueError(
                    f"data.webdataset.shards: {len(missing)} of the {len(paths)} shards named by {pattern!r} in "
                    f"{directory!r} do not exist, e.g. {missing[:3]}"
                )
            found.update(paths)
    return sorted(found)


def read_shard_bytes(path: str) -> bytes:
    if _is_remote(path):
        from etils import epath

        return epath.Path(path).read_bytes()
    with open(path, "rb") as file:
        return file.read()


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


def read_tar_samples(data: bytes) -> tuple[list[tuple[str, dict[str, bytes]]], bool]:
    """([(key, {extension: bytes})] in archive order, truncated). Files of one sample are consecutive
    members sharing a key. A tar that breaks off keeps the complete samples before the break; the
    sample being read when it broke is dropped (it may be missing files)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    current_key: str | None = None
    current_files: dict[str, bytes] = {}
    truncated = False
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = split_member_name(member.name)
                if os.path.basename(key).startswith("."):  # macOS resource forks and the like
                    continue
                if key != current_key:
                    if current_key is not None:
                        samples.append((current_key, current_files))
                    current_key, current_files = key, {}
                handle = archive.extractfile(member)
                content = handle.read() if handle is not None else b""
                if len(content) != member.size:
                    raise tarfile.ReadError(f"member {member.name!r} is cut short")
                current_files[extension] = content
    except (tarfile.TarError, EOFError, OSError, ValueError):
        truncated = True
        current_key = None  # the sample being read when the archive broke off
    if current_key is not None:
        samples.append((current_key, current_files))
    return samples, truncated


def _pick_image(files: Mapping[str, bytes], image_extensions: Sequence[str]) -> bytes | None:
    for extension in image_extensions:
        if extension in files:
            return files[extension]
    return None


# --------------------------------------------------------------------------------------------
# The source.
# --------------------------------------------------------------------------------------------


class WebDatasetSource:
    """This process's endless stream of raw examples from WebDataset shards (see the module doc).

    Position: {"epoch", "window", "offset"}: the next example is number `offset` of window `window`
    of epoch `epoch` of this process. The next window is read in the background.
    """

    def __init__(
        self,
        shards: Sequence[str],
        process_index: int,
        process_count: int,
        seed: int,
        shards_per_window: int = 4,
        image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
        text_extension: str = DEFAULT_TEXT_EXTENSION,
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
        self._windows_cache: tuple[int, list[list[int]]] = (-1, [])
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
        order = epoch_permutation(len(self.shards), self.seed, epoch)
        return [int(index) for index in order[self.process_index :: self.process_count]]

    def _windows(self, epoch: int) -> list[list[int]]:
        if self._windows_cache[0] == epoch:
            return self._windows_cache[1]
        shards = self.process_shards(epoch)
        size = self.shards_per_window
        windows = [shards[start : start + size] for start in range(0, len(shards), size)]
        self._windows_cache = (epoch, windows)
        return windows

    def _read_shard(self, shard_index: int) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
        path = self.shards[shard_index]
        try:
            data = read_shard_bytes(path)
        except Exception:  # OSError locally; remote file systems raise their own kinds
            return [], "unreadable_shard"
        samples, truncated = read_tar_samples(data)
        return samples, "truncated_shard" if truncated else None

    def _start_window(self, epoch: int, window: int) -> list[concurrent.futures.Future]:
        windows = self._windows(epoch)
        if window >= len(windows):
            return []
        return [self._reader.submit(self._read_shard, shard) for shard in windows[window]]

    def _window_examples(
        self, epoch: int, window: int, futures: Sequence[concurrent.futures.Future]
    ) -> list[RawExample]:
        """The window's examples in emitting order: shard-level problems first (so each is counted
        exactly once, resumed or not), then every sample of its shards in a seeded permutation."""
        shard_indices = self._windows(epoch)[window]
        problems: list[RawExample] = []
        samples: list[RawExample] = []
        for shard_index, future in zip(shard_indices, futures):
            shard_samples, problem = future.result()
            path = self.shards[shard_index]
            if problem is not None:
                problems.append(
                    RawExample(None, None, (shard_index, -1), epoch, problem=problem, description=f"shard {path}")
                )
            for member_index, (key, files) in enumerate(shard_samples):
                image = _pick_image(files, self.image_extensions)
                text = files.get(self.text_extension)
                problem = None
                if image is None:
                    problem = "missing_image"
                elif text is None:
                    problem = "missing_caption"
                samples.append(
                    RawExample(image, text, (shard_index, member_index), epoch, problem, description=f"{path}:{key}")
                )
        order = epoch_permutation(len(samples), self.seed, epoch, self.process_index, window) if samples else []
        return problems + [samples[index] for index in order]

    def examples(self, position: Mapping[str, int]) -> Iterator[tuple[RawExample, dict[str, int]]]:
        epoch, window, offset = int(position["epoch"]), int(position["window"]), int(position["offset"])
        if min(epoch, window, offset) < 0:
            raise ValueError(f"invalid webdataset position {dict(position)!r}")
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

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)


def source_from_config(data_config: ml_collections.ConfigDict, process_index: int, process_count: int) -> WebDatasetSource:
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
    )
