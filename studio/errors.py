"""The one error type a person sees: what went wrong, where, and how to fix it."""
from __future__ import annotations


class StudioError(Exception):
    """An error caused by input a person can change (a file, a config, an argument).

    The message is shown as-is by the CLI (one line, exit 2) and the UI, so it names
    what is wrong, where, and what to do about it.
    """
