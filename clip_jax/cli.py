"""What the command lines (`train.py`, `evaluate.py`, `python -m clip_jax.convert`) share: a failure
is reported as one line on stderr, `error: <what went wrong and what to do>`, and exit status 1;
the traceback only with `--verbose`. That holds from the first flag on: a recipe flag
(`define_config_flag`, ml_collections) reads its `--config.FIELD` overrides while the script is
imported and absl parses flags before `main` runs, so those mistakes are caught there.

Library code raises exceptions whose message is that line (naming the file, field or value);
this module only decides how much of it the person at the terminal sees.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as ml_config_flags  # its flag and parser classes

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
# Recipe flags defined with `define_config_flag`: name -> default file (to explain an override).
_CONFIG_FLAGS: dict[str, str] = {}
# name -> the function that adds the fields a recipe leaves out but the command line may set.
_COMPLETERS: dict[str, Callable[[Any, list[str]], None]] = {}


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


_LIBRARY_LOGGERS = ("absl", "asyncio")  # Orbax logs through absl's logger


def quiet_library_logs() -> None:
    """Drop Orbax's own error logs (see `_DropLibraryErrors`) and its unraisable exceptions (see
    `_is_library_noise`) for the rest of the process: for the command lines, which own theirs."""
    # On absl's handler (app.run installs it) and on the loggers themselves, for the handlers of
    # programs without app.run (python -m clip_jax.convert: Python's own handlers).
    for filtered in (absl_logging.get_absl_handler(), *map(logging.getLogger, _LIBRARY_LOGGERS)):
        if not any(isinstance(existing, _DropLibraryErrors) for existing in filtered.filters):
            filtered.addFilter(_DropLibraryErrors())
    if not getattr(sys.unraisablehook, "_clip_jax_quiet", False):
        sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)


@contextlib.contextmanager
def library_noise_quieted() -> Iterator[None]:
    """`quiet_library_logs` for the body only, for library calls (`clip_jax.load`) whose retries
    abandon Orbax reads: a reader of a live workdir stays quiet unless it fails, and raises if it
    does. The caller's hook and loggers are as they were afterwards; an exception of the same kind
    raised outside the body is reported as usual."""
    previous = sys.unraisablehook
    hook = previous if getattr(previous, "_clip_jax_quiet", False) else _quiet_unraisablehook(previous)
    log_filter = _DropLibraryErrors()
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    sys.unraisablehook = hook
    for logger in loggers:
        logger.addFilter(log_filter)
    try:
        yield
        # The abandoned reads' coroutines and tasks are finalised (and reported) now, under the
        # filter, rather than at some later collection outside it.
        gc.collect()
    finally:
        for logger in loggers:
            logger.removeFilter(log_filter)
        if sys.unraisablehook is hook:  # not if the body installed a hook of its own meanwhile
            sys.unraisablehook = previous


def _is_library_noise(unraisable: Any) -> bool:
    """The unraisable exceptions left by Orbax's failed reads and writes: the "Event loop is
    closed" of TensorStore's callbacks once a failure has closed Orbax's event loop, and the
    coroutines of the reads that were abandoned with it (a checkpoint already reported
    unreadable, or rotated out under a reader that then retried)."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    return _raised_in_orbax(unraisable.exc_traceback)


def _quiet_unraisablehook(previous: Callable[[Any], object]) -> Callable[[Any], None]:
    def unraisablehook(unraisable: Any) -> None:
        if not _is_library_noise(unraisable):
            previous(unraisable)

    unraisablehook._clip_jax_quiet = True  # type: ignore[attr-defined]
    return unraisablehook


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


def _verbose_in(argv: Sequence[str]) -> bool:
    """Whether the command line asks for tracebacks: absl has not parsed it yet where this is asked."""
    return any(argument in ("--verbose", "-verbose", "--verbose=true", "--verbose=True") for argument in argv)


def _fail(message: str) -> None:
    print(f"error: {message} (--verbose shows the traceback)", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_FAILURE)


def _given_config_value(name: str, argv: Sequence[str]) -> str | None:
    """`PATH[:ARGUMENT]` of `--NAME=...` (or `--NAME ...`), None when the default recipe is used."""
    for index, argument in enumerate(argv):
        if argument.startswith(f"--{name}="):
            return argument.split("=", 1)[1]
        if argument == f"--{name}" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _check_config_file(name: str, argv: Sequence[str]) -> None:
    # ml_collections defers a missing file to the first use of the config, then names only its
    # module ("Failed loading config file config_config").
    value = _given_config_value(name, argv)
    path = None if value is None else value.split(":", 1)[0]
    if path is not None and not os.path.isfile(path):
        _fail(
            f"--{name}={path}: that config file does not exist; name a Python file with get_config(), e.g. one in configs/"
        )


def config_override_error(config: object, name: str, override: str) -> str | None:
    """What is wrong with the override `--NAME.OVERRIDE` of `config` (a ConfigDict), in one line,
    with the closest existing field offered; None when every field of its path exists."""
    node, walked = config, name
    for part in override.split("."):
        if not (hasattr(node, "keys") and hasattr(node, "__contains__")):
            return (
                f"--{name}.{override}: {walked} is a {type(node).__name__} ({node!r}), not a group of fields; "
                f"set --{walked} itself"
            )
        if part not in node:
            fields = sorted(str(key) for key in node.keys())
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"did you mean --{walked}.{close[0]}?" if close else f"its fields are {', '.join(fields)}"
            return f"--{name}.{override}: {walked} has no field {part!r}; {hint}"
        node, walked = node[part], f"{walked}.{part}"
    return None


def _read_recipe(path: str) -> object:
    """The config of `FILE[:ARGUMENT]`, as ml_collections builds it: `get_config([ARGUMENT])`."""
    file, *argument = path.split(":", 1)
    specification = importlib.util.spec_from_file_location("clip_jax_recipe", file)
    module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(module)
    return module.get_config(*argument)


def override_paths(name: str, argv: Sequence[str]) -> list[str]:
    """The field paths that `--NAME.PATH=VALUE` (or `--NAME.PATH VALUE`) arguments of `argv` set."""
    prefix = f"--{name}."
    return [argument[len(prefix) :].split("=", 1)[0] for argument in argv if argument.startswith(prefix)]


def _explain_config_failure(name: str, argv: Sequence[str]) -> str | None:
    """The one line for a failed parse of recipe flag `name`: the first override naming no field."""
    try:  # the recipe alone, without the overrides that failed
        config = _read_recipe(_given_config_value(name, argv) or _CONFIG_FLAGS[name])
    except Exception:  # noqa: BLE001 - the recipe itself is broken: the caller reports the original error
        return None
    try:
        _COMPLETERS.get(name, lambda *_: None)(config, override_paths(name, argv))
    except ValueError as error:  # an override naming no field the completer knows
        return f"--{name}.{error}"
    prefix = f"--{name}."
    for argument in argv:
        if argument.startswith(prefix):
            message = config_override_error(config, name, argument[len(prefix) :].split("=", 1)[0])
            if message is not None:
                return message
    return None


@contextlib.contextmanager
def _config_flag_errors(argv: Sequence[str]) -> Iterator[None]:
    """Failures of recipe flags while `argv` is parsed become one line (`error: ...`, exit 1)."""
    if _verbose_in(argv):
        yield
        return
    for name in _CONFIG_FLAGS:
        _check_config_file(name, argv)
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        for name in _CONFIG_FLAGS:
            message = _explain_config_failure(name, argv)
            if message is not None:
                _fail(message)
        _fail(one_line(error))


class _CompletedRecipeParser(ml_config_flags.ConfigFileFlagParser):
    """ml_collections' recipe parser, with `complete(config, paths)` run on the recipe before it is
    locked: it adds the fields that the command line's overrides name and the recipe left out
    (e.g. a model field the run keeps at the registry's value unless told otherwise)."""

    def __init__(self, name: str, complete: Callable[[Any, list[str]], None]) -> None:
        super().__init__(name=name, lock_config=False)
        self._complete = complete

    def parse(self, path: str) -> Any:
        config = super().parse(path)
        if hasattr(config, "lock"):  # not ml_collections' stand-in for a file that failed to load
            self._complete(config, override_paths(self.name, sys.argv))
            config.lock()
        return config


def define_config_flag(
    name: str, default: str | None, help_text: str, complete: Callable[[Any, list[str]], None] | None = None
) -> None:
    """An ml_collections recipe flag (`--NAME=recipe.py`, `--NAME.FIELD=VALUE`, locked against new
    fields) whose mistakes are one line. Defining it already reads the default recipe and
    sys.argv's overrides, so an unknown field is caught here, at import; `parse_flags` catches the
    same mistakes after an explicit `--NAME=FILE`. `complete(config, paths)`, if given, may add to
    the recipe the fields that the overrides' `paths` name before it is locked."""
    _CONFIG_FLAGS[name] = default
    with _config_flag_errors(sys.argv):
        if complete is None:
            config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
            return
        _COMPLETERS[name] = complete
        # DEFINE_config_file with another parser: the same flag class it builds (ml_collections
        # offers no public way to pass a parser).
        flag = ml_config_flags._ConfigFlag(  # noqa: SLF001
            parser=_CompletedRecipeParser(name, complete),
            serializer=flags.ArgumentSerializer(),
            name=name,
            default=default,
            help_string=help_text,
            flag_values=flags.FLAGS,
        )
        flags.DEFINE_flag(flag, flags.FLAGS)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=cli.parse_flags)`) with the mistakes of
    recipe flags as one line; other flag errors keep absl's own short report."""
    with _config_flag_errors(argv):
        return app.parse_flags_with_usage(argv)
