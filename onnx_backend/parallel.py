"""Work spread over the CPUs this process may use."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cpus() -> int:
    """CPUs this process may run on (a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], *, threads: bool = True) -> list[R]:
    """[fn(x) for x in items], in order, computed side by side in one thread per CPU (or one after
    the other, `threads=False`: for work of microseconds, which threads only slow down).

    For per-tensor range searches: numpy releases the GIL while it works on their arrays of tens
    of thousands of elements, so the searches of different tensors overlap (entropy 1.2-1.4x,
    two-sided mse 1.1-1.25x faster on this machine's 2 CPUs; the same ranges).
    """
    workers = min(cpus(), len(items)) if threads else 1
    if workers < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))
