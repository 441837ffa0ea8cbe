"""What every command shares: what a user can fix is one line on stderr, `error: ...`, and exit code 2; the
--model option."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from catdogcnn.errors import UserError

# Errors a user can cause: printed as one line, exit code 2. Anything else is a bug and keeps its traceback, so
# a ValueError or KeyError from a slip in the code is never mistaken for bad input. The OSErrors listed name the
# file the user gave.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def user_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from catdogcnn.bundle import BundleError
        from catdogcnn.data import BadImageError
        from catdogcnn.extras import MissingExtra

        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
        try:
            return func(*args, **kwargs)
        except MissingExtra as e:  # before USER_ERRORS: the command is fine, the install lacks a part
            raise fail(str(e), code=1) from None
        except (BundleError, BadImageError, *USER_ERRORS) as e:
            raise fail(str(e)) from None

    return wrapper


ModelOption = Annotated[Path | None, typer.Option("--model", "-m", help="Model bundle folder, or a shipped bundle's "
                                                  "name: default, seed_cnn, resnet_small (default: default).")]
