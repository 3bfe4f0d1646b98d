"""The compiled range-search kernels (onnx_backend/_search.c) against their numpy references."""

import numpy as np
import pytest

from onnx_backend import range_selection as rs
from onnx_backend.statistics import TensorStatistics

needs_kernels = pytest.mark.skipif(rs._search is None, reason="the compiled search kernels are not built (test_compiled_search_kernels_are_built says so)")


def test_compiled_search_kernels_are_built():
    # setup.py builds them as optional (an install without a compiler still works); the test
    # environment must have them, or the benchmarks measure the slower numpy fallback.
    assert rs._search is not None


def _histogram(rng, n: int, split: bool) -> np.ndarray:
    """Gamma-shaped counts with runs of empty bins; `split`: fractional counts, as after
    range_selection._split_bins."""
    counts = rng.poisson(rng.gamma(0.5, 50, n) * (rng.random(n) > 0.3)).astype(np.float64)
    counts[n // 3 : n // 3 + 40] = 0  # whole groups with no mass
    return counts / 8 if split else counts


def _windows(rng, n: int, levels: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    starts = rng.integers(0, n - levels, count)
    ends = np.minimum(n, starts + levels + rng.integers(0, n, count))
    # the edges of the histogram: nothing folded in below, nothing above, and both
    starts[:3], ends[:3] = [0, n - levels - 5, 0], [levels + 7, n, n]
    return starts.astype(np.int64), ends.astype(np.int64)


@needs_kernels
@pytest.mark.parametrize("levels", [128, 256])
@pytest.mark.parametrize("split", [False, True], ids=["integer counts", "split bins"])
def test_kl_kernel_agrees_with_numpy(rng, levels, split):
    for n in (levels + 9, 3001, 20_000):
        counts = _histogram(rng, n, split)
        sums = rs._PrefixSums.of(counts)
        starts, ends = _windows(rng, n, levels, 500)
        want = rs._kl_windows_numpy(sums, starts, ends, levels)
        got = np.empty(starts.size)
        rs._search.kl_windows(sums.c, sums.C, sums.PL, sums.NZ, starts, ends, levels, got)
        # Only the logarithm differs (a polynomial in the kernel, numpy's SIMD log here).
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
        assert int(np.argmin(got)) == int(np.argmin(want))


@needs_kernels
@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_noise_kernel_gives_numpys_pair(rng, gamma):
    for trial in range(20):
        n = int(rng.integers(2, 6000))
        counts = rng.poisson(rng.gamma(0.3, 40, n) * (rng.random(n) > 0.5)).astype(np.int64)
        counts[0] += 1  # never empty
        stats = TensorStatistics(8192, -1.0, 1.0, int(counts.sum()), -12, -int(rng.integers(0, n + 1)), counts)
        lo_idx, hi_idx = rs._two_sided_grid(stats, rs.MAX_GRID)
        sums = rs._tail_sums(counts)
        want = rs._min_noise_numpy(*sums, lo_idx, hi_idx, gamma, rs.ROUNDING_NOISE)
        assert rs._search.min_noise(*sums, lo_idx, hi_idx, gamma, rs.ROUNDING_NOISE) == want


@needs_kernels
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["entropy", "mse", "sqnr"])
def test_ranges_are_the_same_without_the_kernels(rng, method, symmetric, monkeypatch):
    cases = [rng.standard_t(df=4, size=300_000), np.maximum(rng.normal(size=300_000), 0), rng.gamma(2.0, 1.0, 300_000) - 1.0]
    stats = []
    for x in cases:
        s = TensorStatistics()
        s.update(np.asarray(x, np.float32))
        stats.append(s)
    with_kernels = [rs.select_range(s, method, symmetric) for s in stats]
    monkeypatch.setattr(rs, "_search", None)
    assert [rs.select_range(s, method, symmetric) for s in stats] == with_kernels


@needs_kernels
def test_kernels_refuse_bad_arguments():
    sums = rs._PrefixSums.of(np.ones(300))
    out = np.empty(1)
    one = lambda v: np.array([v], dtype=np.int64)  # noqa: E731 - one window's start or end
    kl = lambda start, end, levels=128, o=out: rs._search.kl_windows(sums.c, sums.C, sums.PL, sums.NZ, one(start), one(end), levels, o)  # noqa: E731
    with pytest.raises(ValueError, match="outside the histogram or spans fewer bins"):
        kl(0, 127)  # fewer bins than levels
    with pytest.raises(ValueError, match="outside the histogram"):
        kl(200, 301)
    with pytest.raises(ValueError, match="levels a power of two"):
        kl(0, 200, levels=100)
    with pytest.raises(ValueError, match="a float64 output per window"):
        kl(0, 200, o=np.empty(2))
    tail = rs._tail_sums(np.ones(300, dtype=np.int64))
    with pytest.raises(ValueError, match="edge index lies outside"):
        rs._search.min_noise(*tail, one(0), one(301), 1.0, rs.ROUNDING_NOISE)
    with pytest.raises(ValueError, match="non-empty int64"):
        rs._search.min_noise(*tail, one(0), np.array([5.0]), 1.0, rs.ROUNDING_NOISE)
