"""img2dataset / WebDataset shards as a training source: tar files of `{key}.jpg|png|webp` +
`{key}.txt` (+ `.json`), named by a glob or brace range, local or on gs://.

Each epoch the shard list is permuted with the seed and dealt to the processes (shard i of the
permutation goes to process i mod process_count). A process reads its shards in windows of
`shards_per_window` into memory, and emits each window's samples in a seeded permutation, so a
position is just (epoch, window, offset) and resuming re-reads one window.

Naming, opening and reading the shards (streamed, under limits) is clip_jax.data.shards' job.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from clip_jax.data.config import DataSettings
from clip_jax.data.shards import (
    DEFAULT_IMAGE_EXTENSIONS,
    DEFAULT_SHARD_LIMITS,
    DEFAULT_TEXT_EXTENSION,
    ShardLimits,
    TarSample,
    open_shard,
    read_tar_samples,
    resolve_shards,
)
from clip_jax.data.sources import RawExample, check_process_layout, epoch_permutation, even_share

logger = logging.getLogger(__name__)


def _pick_image(files: Mapping[str, bytes], image_extensions: Sequence[str]) -> bytes | None:
    for extension in image_extensions:
        if extension in files:
            return files[extension]
    return None


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
        limits: ShardLimits = DEFAULT_SHARD_LIMITS,
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


def source_from_config(data_config: DataSettings, process_index: int, process_count: int) -> WebDatasetSource:
    """The shards source of `config.data` (`data.webdataset.*`), shards resolved and checked now."""
    settings = data_config.webdataset
    return WebDatasetSource(
        resolve_shards(settings.shards),
        process_index,
        process_count,
        seed=data_config.seed,
        shards_per_window=settings.shards_per_window,
        image_extensions=list(settings.image_extensions),
        text_extension=settings.text_extension,
        limits=ShardLimits(
            max_member_bytes=settings.max_member_bytes,
            max_caption_bytes=settings.max_caption_bytes,
            max_shard_bytes=settings.max_shard_bytes,
        ),
    )
