"""What the tasks of one Ray Data pass share in each worker process: a preprocessor or a model built once per
process and content, not once per batch (and no torch import here: the encoding tasks never need it)."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_BUILT: OrderedDict[str, Any] = OrderedDict()  # this process's preprocessors and models, by content key


def content_key(*parts: str | bytes) -> str:
    """A short key for what a Ray Data task is handed (computed once, on the driver)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def cached(key: str, build: Callable[[], T], keep: int = 4) -> T:
    """`build()` once per process and key. The tasks of one Ray Data pass run in a few reused worker
    processes: a preprocessor or model handed to every task is parsed or built once per process, not per
    batch, and no actor pool has to start (Ray Data actors also take their arguments from the object
    store with restarts on, which Ray flags with an error line on every run)."""
    if key in _BUILT:
        _BUILT.move_to_end(key)
        return _BUILT[key]
    value = _BUILT[key] = build()
    while len(_BUILT) > keep:
        _BUILT.popitem(last=False)
    return value
