"""The one base of every error a user can cause, and how its messages list examples. Imports nothing of ours."""

from collections.abc import Iterable

EXAMPLES_SHOWN = 5  # how many offending names a message lists before "..."


def examples(items: Iterable[object]) -> str:
    """The first few items, quoted, for a one-line message."""
    items = list(items)
    shown = ", ".join(repr(str(item)) for item in items[:EXAMPLES_SHOWN])
    return shown + (", ..." if len(items) > EXAMPLES_SHOWN else "")


class UserError(Exception):
    """Bad params, data, credentials or files: the stage prints this one line and exits 2, no traceback."""
