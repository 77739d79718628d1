"""Errors that the CLI maps onto exit codes."""

from __future__ import annotations


class IA2Error(Exception):
    """Bad usage or bad input. The CLI prints the message and exits with code 2.

    The message must name the file, line or flag at fault.
    """

    exit_code = 2
