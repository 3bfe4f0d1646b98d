"""Deterministic interrupts: raise KeyboardInterrupt at the k-th executed line of chosen functions.

A Ctrl-C lands between two bytecodes of whatever Python code is running. Instead of sending
signals at random times, `lines_executed` counts the line events of the target functions during
one call, and `interrupt_at_line(k)` raises KeyboardInterrupt at the k-th of them (via
sys.settrace, so the exception appears exactly where a signal handler's would), which lets a test
try every interruption point of an update and check what state it leaves.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from types import CodeType


def _codes(functions: Iterable[Callable]) -> set[CodeType]:
    out = set()
    for f in functions:
        f = getattr(f, "__func__", f)
        while hasattr(f, "__wrapped__"):  # torch.no_grad() and other decorators
            f = f.__wrapped__
        out.add(f.__code__)
    return out


@contextlib.contextmanager
def _on_each_line(functions: Iterable[Callable], on_line: Callable[[object], None]):
    """Call on_line(frame) at every line event inside `functions` while the block runs."""
    codes = _codes(functions)

    def local(frame, event, arg):
        if event == "line":
            on_line(frame)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code in codes else None

    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(None)


def lines_executed(functions: Iterable[Callable], call: Callable[[], object]) -> int:
    count = 0

    def on_line(frame):
        nonlocal count
        count += 1

    with _on_each_line(functions, on_line):
        call()
    return count


@contextlib.contextmanager
def interrupt_at_line(functions: Iterable[Callable], k: int):
    """Raise KeyboardInterrupt at the k-th line event (0-based) inside `functions`."""
    seen = 0

    def on_line(frame):
        nonlocal seen
        seen += 1
        if seen - 1 == k:
            raise KeyboardInterrupt(f"injected at line {frame.f_lineno} of {frame.f_code.co_name}")

    with _on_each_line(functions, on_line):
        yield
