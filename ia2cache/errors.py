"""Errors that the CLI maps onto exit codes."""

from __future__ import annotations


class IA2Error(Exception):
    """Bad usage or bad input. The CLI prints the message and exits with code 2.

    The message must name the file, line or flag at fault.
    """

    exit_code = 2


def check_int(value: object, flag: str, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool) in [lo, hi]; an IA2Error naming ``flag`` otherwise.
    Every count a user gives passes here before anything is allocated from it."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise IA2Error(f"{flag} {value}: must be an integer from {lo} to {hi}")
    return value


def check_float(value: object, flag: str, lo: float, hi: float, lo_open: bool = False,
                hi_open: bool = False) -> float:
    """``value`` if it is a finite number in the interval; an IA2Error naming ``flag`` otherwise."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        brackets = ("(" if lo_open else "[") + f"{lo:g}, {hi:g}" + (")" if hi_open else "]")
        raise IA2Error(f"{flag} {value}: must be a finite number in {brackets}")
    return float(value)  # type: ignore[arg-type]
