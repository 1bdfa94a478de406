"""What the command lines (`train.py`, `evaluate.py`, `python -m clip_jax.convert`) share: a failure
is reported as one line on stderr, `error: <what went wrong and what to do>`, and exit status 1;
the traceback only with `--verbose`.

Library code raises exceptions whose message is that line (naming the file, field or value);
this module only decides how much of it the person at the terminal sees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from types import TracebackType

from absl import logging as absl_logging

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


def one_line(error: BaseException, limit: int = 1000) -> str:
    """The message of `error` on one line: its own text when it has one (our errors are written
    for this), else its type; multi-line texts (Orbax, TensorStore) keep their first line."""
    text = str(error).strip()
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) adds quotes
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    if not isinstance(error, (ValueError, RuntimeError, OSError, LookupError)) or not lines:
        message = f"{type(error).__name__}: {message}" if lines else message
    return message if len(message) <= limit else message[: limit - 3] + "..."


class _DropLibraryErrors(logging.Filter):
    """Orbax logs every failure of a background save with its traceback, and asyncio each of its
    failed write tasks (hundreds of lines for a full disk), before the loop reports the failure
    in one line; without --verbose, those records go."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":  # "Task exception was never retrieved" of Orbax's writes
            return False
        return "/orbax/" not in record.pathname.replace("\\", "/")


def quiet_library_logs() -> None:
    """Drop Orbax's own error logs from absl's handler (see `_DropLibraryErrors`), and the
    unraisable exceptions (`sys.unraisablehook`) left by Orbax's failed reads and writes: the
    "Event loop is closed" of TensorStore's callbacks once a failed write has closed Orbax's event
    loop, and the coroutines of reads of a checkpoint already reported unreadable."""
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(existing, _DropLibraryErrors) for existing in handler.filters):
        handler.addFilter(_DropLibraryErrors())
    if not getattr(sys.unraisablehook, "_clip_jax_quiet", False):
        previous = sys.unraisablehook

        def unraisablehook(unraisable):  # type: ignore[no-untyped-def]
            value = unraisable.exc_value
            if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
                return
            if _raised_in_orbax(unraisable.exc_traceback):
                return  # e.g. the reads of a checkpoint found unreadable (and reported) before
            previous(unraisable)

        unraisablehook._clip_jax_quiet = True  # type: ignore[attr-defined]
        sys.unraisablehook = unraisablehook


def _raised_in_orbax(traceback: TracebackType | None) -> bool:
    while traceback is not None:
        if "/orbax/" in traceback.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        traceback = traceback.tb_next
    return False


@contextlib.contextmanager
def one_line_errors(verbose: bool = False) -> Iterator[None]:
    """Run the body; an exception becomes `error: ...` on stderr and exit status 1 (re-raised
    whole when `verbose`). An exception with an `exit_code` attribute is a deliberate stop: its
    message alone, and that status. A Ctrl-C (KeyboardInterrupt: `train.py` catches it itself
    while it trains) is one line and status 130, traceback only when `verbose`; SystemExit passes
    through."""
    if not verbose:
        quiet_library_logs()
    try:
        yield
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if verbose:
            raise
        sys.stdout.flush()
        print("Interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        _silence_shutdown()
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as error:
        exit_code = getattr(error, "exit_code", None)
        if verbose:
            raise
        sys.stdout.flush()
        if exit_code is not None:
            # A deliberate stop (e.g. the non-finite guard): its message is the whole report.
            print(one_line(error), file=sys.stderr, flush=True)
        else:
            print(f"error: {one_line(error)} (--verbose shows the traceback)", file=sys.stderr, flush=True)
        _silence_shutdown()
        raise SystemExit(EXIT_FAILURE if exit_code is None else exit_code) from None


def _silence_shutdown() -> None:
    """After a failure has been reported: TensorStore's callbacks into Orbax's closed event loop
    print "Event loop is closed" tracebacks while the interpreter shuts down; they say nothing
    the one line has not said, so standard error is closed to them."""
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:  # no file descriptor 2 (embedded interpreters): nothing to silence
        pass
