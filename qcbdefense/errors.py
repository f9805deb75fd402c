"""Errors the toolkit raises on purpose, and the exit code the CLI gives each.

`QcbError` and its subclasses are expected failures: the CLI prints them as one line and exits with the
class's `exit_code`. Anything else is a bug and keeps its traceback. The CLI's exit codes (README, Commands):
0 done; 1 a verdict or a gate says no (scan SUSPICIOUS, verify's thresholds); 2 bad input, refused before
the work; 3 the run went through but its result is not what was asked (training diverged).
"""


class QcbError(Exception):
    """Base class of every expected, user-facing failure."""

    exit_code = 2


class InputError(QcbError):
    """Bad input: a missing path, an unknown name, a corrupt or mismatched file, a nonsense option."""


class RunFailed(QcbError):
    """The run went through but did not give what was asked (a loss that became NaN or infinite)."""

    exit_code = 3


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first non-blank line of an error (or a message), cut at `limit` characters: how a library's
    multi-line error becomes part of one InputError line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = lines[0] if lines else (type(err).__name__ if isinstance(err, BaseException) else "no message")
    return line if len(line) <= limit else line[:limit] + "..."
