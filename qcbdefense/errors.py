"""Errors the toolkit raises on purpose, and the exit code the CLI gives each.

`QcbError` and its subclasses are expected failures: the CLI prints them as one line and exits with the
class's `exit_code`. Anything else is a bug and keeps its traceback. The CLI's exit codes (README, Commands):
0 done; 1 a verdict or a gate says no (scan SUSPICIOUS, verify's thresholds); 2 bad input, refused before
the work; 3 the run went through but its result is not what was asked (training diverged).
"""

import math


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


def check_number(name: str, value: object, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False, kind: str | None = None,
                 optional: bool = False) -> None:
    """InputError unless `value` is a finite number (an int when `integer`; a bool is neither) within the bounds
    given: >= low (> low when `low_open`), <= high (< high when `high_open`); None passes when `optional`.

    The one guard for the numbers a user gives (CLI flags, options dataclasses, API keywords); its message names
    the value, what it must be (`kind`, default "an integer" / "a number") and the bounds, e.g. "calib must be an
    integer >= 1, got 0".
    """
    if value is None and optional:
        return
    number = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if (number and math.isfinite(value) and (low is None or value > low or (value == low and not low_open))
            and (high is None or value < high or (value == high and not high_open))):
        return
    kind = kind or ("an integer" if integer else "a number")
    if low is not None and high is not None:
        bounds = (f" in {low:g}..{high:g}" if integer and not (low_open or high_open) else
                  f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    elif low is not None:
        bounds = f" {'>' if low_open else '>='} {low:g}"
    else:
        bounds = "" if high is None else f" {'<' if high_open else '<='} {high:g}"
    raise InputError(f"{name} must be {kind}{bounds}{' or None' if optional else ''}, got {value!r}")
