"""Fault points: named places in collect, distill, migrate and the store where a crash test stops
the process (``collect.before_first_shard``, ``store.before_ledger``, ``distill.mid_checkpoint``...).

The library only calls :func:`fault_point`; it does nothing until a hook is installed, which
only the tests do (``tests/faults/sitecustomize.py``, on a test subprocess's PYTHONPATH, arms it
from ``IA2CACHE_FAULT``/``IA2CACHE_HOLD``). Unarmed, a point costs one global lookup.
"""

from __future__ import annotations

from collections.abc import Callable

_hook: Callable[[str], None] | None = None


def fault_point(name: str) -> None:
    """Execution passes the point ``name``: call the installed hook, if any."""
    if _hook is not None:
        _hook(name)


def set_fault_hook(hook: Callable[[str], None] | None) -> None:
    """Install (or with None remove) the hook that every :func:`fault_point` calls."""
    global _hook
    _hook = hook
