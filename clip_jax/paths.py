"""Paths of the files the library reads and writes, local or remote (gs://, s3://), as etils epath
paths: the one file layer of clip_jax (joins with `/`, reads and writes through `epath.Path`)."""

from __future__ import annotations

import os

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
