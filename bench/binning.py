"""How fast calibration histograms are built (nanoseconds per value) and searched (milliseconds per
tensor), by implementation: the compiled kernels against their numpy fallbacks.

    PYTHONPATH=$PWD python -m bench.binning [--no-write]

Times one `TensorStatistics.update` of a batch that fits the current bins (the common case after
the first batches) with the compiled kernel (onnx_backend/_binning.c), the same update with the
numpy fallback, and a PyTorch observer's update through torch ops (what a GPU tensor takes), on
activation-like data: ReLU outputs (half exact zeros, the case that serializes a plain
bincount), a normal distribution, padded attention scores (a third -inf: mask values), and a
cache-sized and a large batch. Every implementation
must build the same statistics; the script checks that before it times anything.

Then the range searches that score thousands of candidate ranges per tensor (entropy's KL
windows, the two-sided mse/sqnr grid), with the compiled kernels (onnx_backend/_search.c) and
with numpy, on histograms of ReLU, normal and heavy-tailed (Student-t) data; both must choose
the same ranges. Prints the tables and writes docs/bench/binning.md with them and this command.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .common import table

ROOT = Path(__file__).resolve().parent.parent
SIZES = (1 << 16, 1 << 22)


def _data(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=n).astype(np.float32)
    if kind == "masked":  # padded attention scores: a third of the values -inf, mask values left out
        x[rng.random(n) < 1 / 3] = -np.inf
    return np.maximum(x, 0) if kind == "relu" else x


def _seconds_per_update(update, x, repeats: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            update(x)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def _implementations():
    """(name, make_fresh_state, update, snapshot_of_its_statistics) for each implementation."""
    from onnx_backend import statistics
    from onnx_backend.statistics import TensorStatistics
    from torchq.observer import Observer

    kernel = statistics._binning

    def with_kernel(module_kernel, fn):
        def run(*args):
            saved = statistics._binning
            statistics._binning = module_kernel
            try:
                return fn(*args)
            finally:
                statistics._binning = saved

        return run

    def stats_update(kernel_or_none):
        return with_kernel(kernel_or_none, lambda s, x: s.update(x))

    def observer_update(s, x):
        s.update(torch.from_numpy(x))

    return [
        ("TensorStatistics, compiled kernel", TensorStatistics, stats_update(kernel), TensorStatistics.copy),
        ("TensorStatistics, numpy fallback", TensorStatistics, stats_update(None), TensorStatistics.copy),
        ("PyTorch observer, torch ops (GPU path, here on the CPU)", lambda: Observer("x", 4096), with_kernel(None, observer_update), lambda s: s.to_statistics()),
    ]


def measure() -> list[list]:
    from onnx_backend import statistics

    if statistics._binning is None:
        raise SystemExit("the compiled kernel is not built: pip install -e . (needs a C compiler)")
    rng = np.random.default_rng(0)
    impls = _implementations()
    rows = []
    for kind in ("relu", "normal", "masked"):
        for n in SIZES:
            first, batch = _data(kind, n, rng), _data(kind, n, rng) * np.float32(0.5)  # the batch fits the first one's bins
            built, times = [], []
            for name, fresh, update, stats_of in impls:
                s = fresh()
                update(s, first)
                update(s, batch)
                built.append(stats_of(s))
                repeats = max(3, (1 << 24) // n)
                times.append(_seconds_per_update(lambda x, s=s, update=update: update(s, x), batch, repeats) / n * 1e9)
            reference = built[0]
            for (name, *_), other in zip(impls, built):
                same = (other.min, other.max, other.count, other.exponent, other.offset, other.mask_low, other.mask_high) == (reference.min, reference.max, reference.count, reference.exponent, reference.offset, reference.mask_low, reference.mask_high)
                if not (same and np.array_equal(other.counts, reference.counts)):
                    raise SystemExit(f"{name} built different statistics than the compiled kernel")
            rows.append([kind, n, *(f"{t:.2f}" for t in times), f"{times[1] / times[0]:.1f}x", f"{times[2] / times[0]:.1f}x"])
    return rows


SEARCHES = (("entropy", False), ("entropy", True), ("mse", False), ("sqnr", False))


def measure_searches() -> list[list]:
    """ms per tensor of each slow range search, kernel and numpy, after checking they agree."""
    from onnx_backend import range_selection
    from onnx_backend.statistics import TensorStatistics

    if range_selection._search is None:
        raise SystemExit("the compiled search kernels are not built: pip install -e . (needs a C compiler)")
    rng = np.random.default_rng(0)
    data = {"relu": np.maximum(rng.normal(size=1 << 20), 0), "normal": rng.normal(size=1 << 20), "heavy tailed": rng.standard_t(df=4, size=1 << 20)}
    rows = []
    for kind, x in data.items():
        stats = TensorStatistics()
        stats.update(x.astype(np.float32))
        for method, symmetric in SEARCHES:
            times, chosen = [], []
            for kernel in (range_selection._search, None):
                saved, range_selection._search = range_selection._search, kernel
                try:
                    chosen.append(range_selection.select_range(stats, method, symmetric))
                    times.append(_seconds_per_update(lambda s: range_selection.select_range(s, method, symmetric), stats, 3) * 1e3)
                finally:
                    range_selection._search = saved
            if chosen[0] != chosen[1]:
                raise SystemExit(f"{method} ({kind}) chose {chosen[0]} with the kernel, {chosen[1]} with numpy")
            rows.append([kind, f"{method}_{'sym' if symmetric else 'asym'}", f"{times[0]:.2f}", f"{times[1]:.2f}", f"{times[1] / times[0]:.1f}x"])
    return rows


BINNING_HEADER = ["data", "values per batch", "compiled kernel ns/value", "numpy fallback ns/value", "torch ops ns/value", "kernel vs numpy", "kernel vs torch ops"]
SEARCH_HEADER = ["data", "method", "compiled kernel ms/tensor", "numpy ms/tensor", "kernel vs numpy"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write docs/bench/binning.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    binning = table(BINNING_HEADER, [[str(c) for c in r] for r in measure()])
    searches = table(SEARCH_HEADER, measure_searches())
    print(binning + "\n\n" + searches)
    if not args.no_write:
        from onnx_backend.model_io import write_text_atomic

        machine = f"{platform.processor() or platform.machine()}, 1 thread"
        text = (
            "# Histogram binning and range-search speed\n\n"
            f"`PYTHONPATH=$PWD python -m bench.binning` ({machine}; best of 3). One `update` of a batch that fits the\n"
            "current bins, per value: min and max, bin indices, counts. Every implementation builds the same statistics\n"
            "(checked before timing). ReLU data is half exact zeros; masked data a third -inf (padded attention scores:\n"
            "mask values, counted and left out).\n\n" + binning + "\n\n"
            "One range search per tensor (a histogram of 2^20 values, 4096 bins): entropy's KL windows and the two-sided\n"
            "mse/sqnr grid, with the compiled kernels (`onnx_backend/_search.c`) and with numpy; both choose the same range\n"
            "(checked). Percentile and min-max take microseconds either way.\n\n" + searches + "\n"
        )
        write_text_atomic(ROOT / "docs" / "bench" / "binning.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
