"""Optional libraries: the core installs only what labelling photos needs (numpy, Pillow, onnxruntime, Typer,
Rich); each other job's libraries come with an extra of the package (pyproject.toml). Their imports sit inside
`needs_extra`, so a missing one says, in one line, which `pip install` adds it:

    with needs_extra("serve"):
        from fastapi import FastAPI
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class MissingExtra(ImportError):
    """An optional library is not installed; the message names the `pip install` that adds it."""


@contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """Turn a missing third-party module imported inside into a MissingExtra naming `catdogcnn[extra]`."""
    try:
        yield
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if not missing or missing == __package__:  # a module of this package missing is a bug, not an install
            raise
        raise MissingExtra(f"{missing} is not installed: pip install 'catdogcnn[{extra}]' adds it",
                           name=error.name) from None
