"""Fault injection for crash tests: ``IA2CACHE_FAULT=name[:n]`` SIGKILLs this process the n-th
time (default first) execution passes the point ``name``. Unset, it costs one dict lookup."""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("IA2CACHE_FAULT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
