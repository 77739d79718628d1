"""ia2cache: ICL Activation Alignment with the teacher traced once into a zarr cache.

One module per stage of the data flow, each with one verb of the same name::

    from ia2cache import CollectConfig, DistillConfig, open_cache
    from ia2cache.collect import collect
    from ia2cache.distill import distill

    result = collect(CollectConfig(task="antonyms", n=16))
    cache = open_cache(result.cache)
    run = distill(DistillConfig(cache=result.cache, method="a2t", lr=1e-3))

The verbs (collect, distill, evaluate, sweep, report) are reached through their modules: a
package attribute of the same name as a submodule would turn into the module as soon as the
submodule is imported. Names here are imported lazily, so ``import ia2cache`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_task": "ia2cache.tasks",
    "list_builtin": "ia2cache.tasks",
    "PromptConfig": "ia2cache.prompts",
    "build_pairs": "ia2cache.prompts",
    "load_model": "ia2cache.models",
    "CollectConfig": "ia2cache.collect",
    "Cache": "ia2cache.store",
    "CacheLoader": "ia2cache.loader",
    "LoaderConfig": "ia2cache.loader",
    "DistillConfig": "ia2cache.distill",
    "EvalConfig": "ia2cache.evaluate",
    "load_adapter": "ia2cache.evaluate",
    "SweepConfig": "ia2cache.sweep",
    "SimilarityConfig": "ia2cache.analyze",
    "IA2Error": "ia2cache.errors",
}

__all__ = [*sorted(_EXPORTS), "open_cache"]


def open_cache(path: str) -> Any:
    """Open an existing cache directory read-only (``ia2cache.store.Cache.open``)."""
    from ia2cache.store import Cache

    return Cache.open(path)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ia2cache' has no attribute {name!r}")
