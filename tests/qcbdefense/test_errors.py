"""The shared guards of user input: one numeric check, one first line of a library's error."""

import math

import pytest

from qcbdefense.errors import InputError, check_number, first_line


@pytest.mark.parametrize("value, bounds, message", [
    (0, dict(integer=True, low=1), "n must be an integer >= 1, got 0"),
    (2.0, dict(integer=True, low=1), "n must be an integer >= 1, got 2.0"),
    (True, dict(low=0), "n must be a number >= 0, got True"),
    (math.nan, dict(low=0), "n must be a number >= 0, got nan"),
    (math.inf, dict(), "n must be a number, got inf"),
    (0.0, dict(low=0, high=1, low_open=True), r"n must be a number in \(0, 1\], got 0.0"),
    (1.0, dict(low=0, high=1, high_open=True, kind="a fraction"), r"n must be a fraction in \[0, 1\), got 1.0"),
    (9, dict(integer=True, low=2, high=8), r"n must be an integer in 2..8, got 9"),
    ("3", dict(integer=True, optional=True), "n must be an integer or None, got '3'"),
])
def test_a_number_out_of_bounds_is_one_line_saying_what_it_must_be(value, bounds, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        check_number("n", value, **bounds)


def test_a_number_within_bounds_passes():
    check_number("n", 1, integer=True, low=1, high=1)
    check_number("n", 0.5, low=0, high=1, low_open=True, high_open=True)
    check_number("n", None, low=0, optional=True)


def test_first_line_keeps_one_nonblank_line_and_cuts_it():
    assert first_line(ValueError("\n  bad thing  \nmore")) == "bad thing"
    assert first_line(KeyError()) == "KeyError" and first_line("") == "no message"
    assert first_line("x" * 300, limit=10) == "x" * 10 + "..."
