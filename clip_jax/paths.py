"""Paths of the files the library reads and writes, local or remote (gs://, s3://), as etils epath
paths: the one file layer of clip_jax (joins with `/`, reads and writes through `epath.Path`), and
the one check of an output path before the work that ends by writing it (`check_output`)."""

from __future__ import annotations

import os
import tempfile

from etils import epath


def absolute(path: str | os.PathLike) -> epath.Path:
    """`path` made absolute against the working directory; a remote path (gs://...) already is.

    epath's own `resolve()` would also put the working directory in front of a gs:// path.
    """
    path = epath.Path(path)
    return path if path.is_absolute() else path.resolve()


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on a local (or mounted) filesystem, where POSIX renames and locks work;
    False for object stores (gs://, s3://, ...)."""
    return "://" not in os.fspath(path)


def check_output(
    path: str | os.PathLike,
    *,
    directory: bool,
    replace: bool,
    setting: str = "output",
    overwrite_hint: str = "pass overwrite=True",
) -> None:
    """Refuse, before any work, an output that could not be written at the end: one OSError line
    naming `setting` (e.g. "--output"), the path and what to do.

    `directory`: the output is a directory (created with its parents) rather than a file. `replace`:
    an existing output may be replaced or written into (else a non-empty directory or an existing
    file is refused, and the refusal says `overwrite_hint`). A local output must be writable: its
    directory, or the nearest existing one above it, must accept a new file. That is tried, not
    inferred from permission bits, which root, ACLs and read-only mounts make untrue. Remote paths
    (gs://) are only checked for clashes: whether a bucket accepts a write shows only when it is made.
    """
    name = os.fspath(path)
    target = epath.Path(path)
    if target.exists():
        if directory and not target.is_dir():
            raise FileExistsError(f"{setting} {name!r} is a file, not a directory; choose another {setting}")
        if not directory and target.is_dir():
            raise IsADirectoryError(f"{setting} {name!r} is a directory, not a file; choose another {setting}")
        if not replace and (not directory or any(target.iterdir())):
            what = "directory is not empty" if directory else "file exists"
            raise FileExistsError(f"{setting} {name!r}: the {what}; {overwrite_hint} to replace it")
    if not is_local(name):
        return
    existing = os.path.abspath(name) if directory and os.path.isdir(name) else os.path.dirname(os.path.abspath(name))
    while not os.path.exists(existing):  # the directories that will be created on the way
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(
            f"{setting} {name!r} cannot be created: {existing!r} is a file, not a directory; choose another {setting}"
        )
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".clip_jax-write-test-", dir=existing)
    except OSError as error:
        raise PermissionError(
            f"{setting} {name!r} cannot be written: {existing!r} refuses new files ({error.strerror}); "
            f"choose another {setting} or make {existing!r} writable"
        ) from None
    os.close(descriptor)
    os.remove(probe)
