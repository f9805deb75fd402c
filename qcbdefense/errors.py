"""Errors the toolkit raises on purpose.

`QcbError` and its subclasses are expected failures (bad input from a user or a stranger's file): the CLI
prints them as one line and exits 2. Anything else is a bug and keeps its traceback.
"""


class QcbError(Exception):
    """Base class of every expected, user-facing failure."""


class InputError(QcbError):
    """Bad input: a missing path, an unknown name, a corrupt or mismatched file, a nonsense option."""
