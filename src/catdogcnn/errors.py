"""The error raised on purpose for a mistake in what was asked (a setting out of range, a folder without photos, a
name not known): the command line prints its message as one line, and anything else keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the caller can fix, said in one line that names it. A ValueError, so code that catches
    ValueError around the API goes on catching it."""
