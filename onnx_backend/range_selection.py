"""Range selection: from a tensor's streaming statistics to the real interval [lo, hi] to quantize.

This is the one place ranges are chosen; the PyTorch observers and the ONNX calibrator both
end here. Every method returns an interval that contains 0 and lies within the observed
[min, max] (widened to include 0). Exact definitions are in docs/METHODS.md; in short, with the
histogram's bins represented by their centres x_i and counts c_i:

* min_max     -- [min, max].
* percentile  -- asymmetric: the central p % of the mass, i.e. quantiles (1 - p)/2 and
                 1 - (1 - p)/2; symmetric: the p-th percentile of |x|. Linear within a bin.
                 The bin holding 0 counts as its neighbour does (exact zeros are exact anyway).
* mse         -- argmin over candidate ranges of  E_clip + E_round,  where
                 E_clip = sum_i c_i (x_i - clamp(x_i, lo, hi))^2 and E_round = n_in * step^2 / 12.
* sqnr        -- argmax of SQNR = sum_i c_i x_i^2 / (gamma * E_clip + E_round), gamma = 3 by
                 default (clipping noise weighted as in AIMET's SQNR encoding analyzer, because
                 clipped errors are large and correlated). gamma = 1 would make it MSE.
* entropy     -- argmin over candidate ranges of KL(P || Q): P is the histogram restricted to
                 the range with the mass outside folded into the edge bins, Q is the window's
                 own mass merged into the number of quantization levels and spread back over
                 P's non-empty bins (TensorRT's algorithm; the asymmetric variant searches both
                 edges), among the admissible ranges only: those clipping at most 0.01 % of the
                 values, or whose expected mse noise is at most min-max's (KL alone rewards
                 windows that clip most of the signal). The bin holding 0 takes its
                 neighbour's count first (the ReLU spike); bins are split until the bulk spans
                 >= 2 x levels bins; a tensor with fewer than 16 x 256 observed values uses the
                 mse range (too sparse for KL).

Candidate thresholds are the histogram's bin edges. Symmetric methods work on |x| (the
histogram folded at 0) and return [-a, a]; a tensor that is never negative gets [0, a] with all
256 levels. Asymmetric methods never move the lower edge below 0 for never-negative tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TypeVar

import numpy as np

from .parallel import map_in_threads
from .statistics import TensorStatistics

try:  # the compiled search kernels (setup.py); the numpy code below when they were not built
    from . import _search
except ImportError:  # pragma: no cover - depends on the install
    _search = None

R = TypeVar("R")
DEFAULT_PERCENTILE = 99.99
DEFAULT_SQNR_GAMMA = 3.0
LEVELS = 256  # int8
SYMMETRIC_LEVELS = 128  # magnitudes 0..127 of a symmetric int8 range
MAX_GRID = 512  # candidates per edge for the O(1)-per-candidate 2-D searches
# Below this many values per quantization level a histogram is too sparse for KL to estimate a
# distribution (it fits sampling noise); entropy then takes the mse range.
MIN_ENTROPY_VALUES_PER_LEVEL = 16


class Method(str, Enum):
    MIN_MAX = "min_max"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"
    SQNR = "sqnr"


def select_range(
    stats: TensorStatistics,
    method: Method | str,
    symmetric: bool = False,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    sqnr_gamma: float = DEFAULT_SQNR_GAMMA,
) -> tuple[float, float]:
    """The range [lo, hi] (lo <= 0 <= hi) chosen by `method` from `stats`."""
    method = Method(method)
    if stats.empty:
        raise ValueError("no calibration data was observed for this tensor")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    if lo == hi:  # all zeros
        return 0.0, 0.0
    never_negative = stats.min >= 0
    if method is Method.ENTROPY and stats.count < MIN_ENTROPY_VALUES_PER_LEVEL * LEVELS:
        method = Method.MSE
    if method is Method.MIN_MAX:
        chosen = _min_max(lo, hi, symmetric)
    elif symmetric or never_negative:
        counts, width = stats.folded_abs()
        levels = LEVELS if never_negative else SYMMETRIC_LEVELS
        a = _ONE_SIDED[method](counts, width, levels, percentile=percentile, gamma=sqnr_gamma)
        a = min(a, max(-lo, hi))
        chosen = (0.0, a) if never_negative else (-a, a)
    else:
        chosen = _TWO_SIDED[method](stats, percentile=percentile, gamma=sqnr_gamma)
    return _contain_zero_and_clamp(chosen, lo, hi, symmetric and not never_negative)


def is_slow_search(method: Method | str, symmetric: bool) -> bool:
    """Whether choosing a range takes milliseconds rather than microseconds: entropy's KL
    searches and the two-sided (lo, hi) grid searches of mse and sqnr. Worth a thread each."""
    method = Method(method)
    return method is Method.ENTROPY or (method in (Method.MSE, Method.SQNR) and not symmetric)


def map_range_searches(search: Callable[[str], R], tensors: Sequence[str], method_of: Callable[[str], tuple[Method | str, bool]]) -> list[R]:
    """[search(t) for t in tensors], one thread per CPU when any tensor's search is slow
    (method_of(t): its method and symmetry); one after the other otherwise."""
    slow = any(is_slow_search(*method_of(t)) for t in tensors)
    return map_in_threads(search, tensors, threads=slow)


def _contain_zero_and_clamp(r: tuple[float, float], lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    a, b = min(float(r[0]), 0.0), max(float(r[1]), 0.0)
    if symmetric:
        m = min(max(-a, b), max(-lo, hi))
        return -m, m
    return max(a, lo), min(b, hi)


def _min_max(lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    if symmetric and lo < 0:
        a = max(-lo, hi)
        return -a, a
    return lo, hi


# ---- one-sided searches: thresholds a = k * width on a histogram of magnitudes ----------------


def _percentile_one_sided(counts: np.ndarray, width: float, levels: int, *, percentile: float, **_) -> float:
    return _quantile(_without_zero_spike(counts, 0), 0.0, width, percentile / 100.0)


def _quantile(counts: np.ndarray, first_edge: float, width: float, q: float) -> float:
    """The q-quantile of a histogram, linear within the bin it falls in."""
    cum = np.cumsum(counts, dtype=np.float64)
    total = cum[-1]
    target = q * total
    k = int(np.searchsorted(cum, target, side="left"))
    k = min(k, counts.size - 1)
    before = cum[k - 1] if k > 0 else 0.0
    frac = 0.0 if counts[k] == 0 else (target - before) / counts[k]
    return first_edge + (k + min(max(frac, 0.0), 1.0)) * width


def _tail_sums(counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Prefix sums (exclusive, length n+1) of c, c*x, c*x^2 with x the bin centre in bin units."""
    c = counts.astype(np.float64)
    x = np.arange(counts.size, dtype=np.float64) + 0.5
    zero = np.zeros(1)
    return tuple(np.concatenate([zero, np.cumsum(v)]) for v in (c, c * x, c * x * x))


def _noise_one_sided(counts: np.ndarray, levels: int, gamma: float) -> np.ndarray:
    """Clip + rounding noise for every threshold edge k = 1..n (in bin units^2)."""
    C, S1, S2 = _tail_sums(counts)
    k = np.arange(1, counts.size + 1, dtype=np.float64)
    idx = np.arange(1, counts.size + 1)
    above_c, above_s1, above_s2 = C[-1] - C[idx], S1[-1] - S1[idx], S2[-1] - S2[idx]
    clip = above_s2 - 2 * k * above_s1 + k * k * above_c
    step = k / (levels - 1)
    rounding = C[idx] * step * step / 12.0
    return gamma * np.maximum(clip, 0.0) + rounding


def _mse_one_sided(counts: np.ndarray, width: float, levels: int, **_) -> float:
    noise = _noise_one_sided(counts, levels, 1.0)
    return (int(np.argmin(noise)) + 1) * width


def _sqnr_one_sided(counts: np.ndarray, width: float, levels: int, *, gamma: float, **_) -> float:
    noise = _noise_one_sided(counts, levels, gamma)
    return (int(np.argmin(noise)) + 1) * width  # signal power is fixed: max SQNR = min noise


def _without_zero_spike(counts: np.ndarray, zero_bin: int) -> np.ndarray:
    """The histogram with the count of the bin holding 0 replaced by its neighbour's.

    After a ReLU half the values are exactly 0 (99.99 % in a sparse one). Exact zeros are
    represented exactly by any range, so they should not decide it. For entropy: Q spreads the
    spike over its whole group of bins, so KL would favour windows so narrow that each group is
    one bin, clipping hard; flattening the spike (as NVIDIA's pytorch-quantization does) removes
    that bias. For percentile: with more than p % of the values at 0 the p-th percentile would
    lie inside the spike and clip every non-zero value.
    """
    if not 0 <= zero_bin < counts.size - 1:
        return counts
    flat = counts.copy()
    flat[zero_bin] = counts[zero_bin + 1]
    return flat


MAX_SUBDIVISION = 64


def _subdivision(counts: np.ndarray, levels: int) -> int:
    """Factor by which to split bins so the central 99.8 % of the mass spans >= 2 * levels bins.

    The search needs windows of at least `levels` bins; without this, a tensor whose bulk is
    narrower than that (a few large outliers widened the histogram) cannot be fitted, and
    windows reaching into empty space would cost KL nothing.
    """
    cum = np.cumsum(counts, dtype=np.float64)
    lo = int(np.searchsorted(cum, 0.001 * cum[-1]))
    hi = int(np.searchsorted(cum, 0.999 * cum[-1]))
    spread = max(hi - lo + 1, 1)
    k = 1
    while spread * k < 2 * levels and k < MAX_SUBDIVISION:
        k *= 2
    return k


def _split_bins(counts: np.ndarray, k: int) -> np.ndarray:
    return counts.astype(np.float64) if k == 1 else np.repeat(counts.astype(np.float64) / k, k)


# Entropy may always clip this share of the values (what percentile clips by default: isolated
# outliers); clipping more needs a range at least as accurate as min-max (see _admissible).
ENTROPY_FREE_CLIP_SHARE = (100.0 - DEFAULT_PERCENTILE) / 100.0


def _admissible(noise: np.ndarray, whole_range_noise: float, outside: np.ndarray, total: float) -> np.ndarray:
    """Which candidate ranges entropy may choose: those that clip at most ENTROPY_FREE_CLIP_SHARE
    of the values (`outside`: how many lie beyond each), or whose expected clip + rounding noise
    (the mse method's measure, `noise`) is at most that of the whole observed range (min-max's,
    which clips nothing).

    KL compares shapes of mass, not values: a window holding almost none of the mass, or one
    clipping the few large values that carry most of a tensor's energy (a hard-swish output's
    tail, a gate far from 0), can score a KL near 0, because all clipped mass folds into the edge
    bin of both distributions. Such ranges clip many values and cost far more noise than
    min-max's rounding, so this excludes exactly them; rare outliers may still be clipped."""
    return (outside <= ENTROPY_FREE_CLIP_SHARE * total) | (noise <= whole_range_noise * (1.0 + 1e-9))


def _entropy_one_sided(counts: np.ndarray, width: float, levels: int, **_) -> float:
    raw, counts = counts, _without_zero_spike(counts, 0)
    k = _subdivision(counts, levels)
    counts, width = _split_bins(counts, k), width / k
    n = counts.size
    if n <= levels:
        return n * width
    sums = _PrefixSums.of(counts)
    # Admissible thresholds (_admissible), judged on the values as they are (exact zeros included).
    values = _split_bins(raw, k)
    above = np.cumsum(values[::-1])[::-1]  # above[i]: values in bins i.. (beyond a threshold at edge i)
    outside = np.append(above[1:], 0.0)  # beyond edge 1..n
    noise = _noise_one_sided(values, levels, 1.0)
    allowed = _admissible(noise, noise[-1], outside, float(above[0]))
    a, b = levels, n  # windows [0, end), coarse to fine as in _zoom_search
    best, best_kl = n, np.inf
    while True:
        ends = np.unique(np.linspace(a, b, min(b - a + 1, 64 * ZOOM_GRID)).round().astype(np.int64))
        kl = np.where(allowed[ends - 1], _kl_windows(sums, np.zeros_like(ends), ends, levels), np.inf)
        i = int(np.argmin(kl))
        if kl[i] < best_kl:
            best, best_kl = int(ends[i]), float(kl[i])
        step = int(np.max(np.diff(ends), initial=1))
        if step <= 1:
            return best * width
        a, b = max(levels, best - step), min(n, best + step)


# ---- two-sided searches over (lo edge, hi edge) --------------------------------------------------


def _two_sided_grid(stats: TensorStatistics, max_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate edge indices (into stats.edges()) below and above zero, at most max_grid each."""
    zero = -stats.offset  # edge index of 0.0 (edges are aligned at 0)
    n = stats.counts.size
    zero = min(max(zero, 0), n)
    below = np.unique(np.linspace(0, zero, min(zero + 1, max_grid)).round().astype(np.int64))
    above = np.unique(np.linspace(zero, n, min(n - zero + 1, max_grid)).round().astype(np.int64))
    return below, above


def _percentile_two_sided(stats: TensorStatistics, *, percentile: float, **_) -> tuple[float, float]:
    tail = (1.0 - percentile / 100.0) / 2.0
    first = stats.offset * stats.bin_width
    counts = _without_zero_spike(stats.counts, -stats.offset)
    lo = _quantile(counts, first, stats.bin_width, tail)
    hi = _quantile(counts, first, stats.bin_width, 1.0 - tail)
    return lo, hi


ROUNDING_NOISE = 1.0 / (12.0 * (LEVELS - 1) ** 2)  # of a step^2 / 12 per value, per bin unit^2 of range


def _noise_two_sided(sums: tuple[np.ndarray, ...], lo_idx: np.ndarray, hi_idx: np.ndarray, gamma: float, rounding_noise: float = ROUNDING_NOISE) -> np.ndarray:
    """Noise for every (lo edge, hi edge) pair, shape (len(lo_idx), len(hi_idx)), bin units^2
    (sums: _tail_sums of the counts)."""
    C, S1, S2 = sums
    L = lo_idx[:, None].astype(np.float64)
    H = hi_idx[None, :].astype(np.float64)
    a, b = lo_idx[:, None], hi_idx[None, :]
    below = S2[a] - 2 * L * S1[a] + L * L * C[a]
    above = (S2[-1] - S2[b]) - 2 * H * (S1[-1] - S1[b]) + H * H * (C[-1] - C[b])
    # Rounding noise n_in * step^2 / 12 with step = (H - L) / 255, written with one constant
    # factor instead of two divisions (the compiled kernel does the same operations in the same
    # order, so both give the same doubles).
    rounding = (C[b] - C[a]) * ((H - L) * (H - L)) * rounding_noise
    return gamma * (np.maximum(below, 0.0) + np.maximum(above, 0.0)) + rounding


# Candidate pairs scored at a time: the temporaries stay in the cache (1.9x faster than the whole
# 512 x 512 grid at once); each pair's noise is computed exactly as it would be in one go.
NOISE_BLOCK_ELEMENTS = 1 << 16


def _min_noise_window(stats: TensorStatistics, gamma: float) -> tuple[float, float]:
    """The grid's (lo, hi) of least noise; ties go to the first in (lo, hi) order, as np.argmin."""
    lo_idx, hi_idx = _two_sided_grid(stats, MAX_GRID)
    search = _min_noise_numpy if _search is None else _search.min_noise
    best_i, best_j = search(*_tail_sums(stats.counts), lo_idx, hi_idx, float(gamma), ROUNDING_NOISE)
    edges = stats.edges()
    return float(edges[lo_idx[best_i]]), float(edges[hi_idx[best_j]])


def _min_noise_numpy(C, S1, S2, lo_idx: np.ndarray, hi_idx: np.ndarray, gamma: float, rounding_noise: float) -> tuple[int, int]:
    """The compiled `min_noise` in numpy: the fallback, and the reference the kernel is tested
    against. (i, j) of the least-noise pair, scored in blocks of rows."""
    rows = max(1, NOISE_BLOCK_ELEMENTS // hi_idx.size)
    best, best_i, best_j = np.inf, 0, 0
    for r in range(0, lo_idx.size, rows):
        noise = _noise_two_sided((C, S1, S2), lo_idx[r : r + rows], hi_idx, gamma, rounding_noise)
        k = int(np.argmin(noise))
        if noise.flat[k] < best:
            best, (best_i, best_j) = noise.flat[k], (r + k // hi_idx.size, k % hi_idx.size)
    return best_i, best_j


def _mse_two_sided(stats: TensorStatistics, **_) -> tuple[float, float]:
    return _min_noise_window(stats, 1.0)


def _sqnr_two_sided(stats: TensorStatistics, *, gamma: float, **_) -> tuple[float, float]:
    return _min_noise_window(stats, gamma)


def _entropy_two_sided(stats: TensorStatistics, **_) -> tuple[float, float]:
    counts = _without_zero_spike(stats.counts, -stats.offset)
    k = _subdivision(counts, LEVELS)
    split = TensorStatistics(stats.max_bins * k, stats.min, stats.max, stats.count, stats.exponent, stats.offset * k, _split_bins(counts, k))
    split_width = stats.bin_width / k
    counts, n = split.counts, split.counts.size
    if n <= LEVELS:
        return stats.min, stats.max
    zero = min(max(-split.offset, 0), n)
    best = _zoom_search(counts, _split_bins(stats.counts, k), (0, zero), (zero, n))
    first = split.offset * split_width
    return first + best[0] * split_width, first + best[1] * split_width


ZOOM_GRID = 32  # candidates per edge and round of the coarse-to-fine entropy search


def _zoom_search(counts: np.ndarray, raw: np.ndarray, lo_span: tuple[int, int], hi_span: tuple[int, int]) -> tuple[int, int]:
    """Coarse-to-fine search of the admissible window [lo, hi) minimising KL: a ZOOM_GRID x
    ZOOM_GRID grid of edges, then the same grid again around the best, two grid steps wide, until
    steps are one bin. Costs O(rounds * ZOOM_GRID^2 * levels) instead of O(bins^2 * levels).
    The whole span is a candidate of the first round and always admissible. `counts`: the
    histogram KL is computed on (zero spike flattened); `raw`: the values as they are, for the
    noise that decides admissibility."""
    (lo_a, lo_b), (hi_a, hi_b) = lo_span, hi_span
    sums = _PrefixSums.of(counts)
    noise_sums = _tail_sums(raw)
    whole = float(_noise_two_sided(noise_sums, np.array([lo_a]), np.array([hi_b]), 1.0)[0, 0])
    best, best_kl = (lo_a, hi_b), np.inf
    while True:
        lo_idx = np.unique(np.linspace(lo_a, lo_b, min(lo_b - lo_a + 1, ZOOM_GRID)).round().astype(np.int64))
        hi_idx = np.unique(np.linspace(hi_a, hi_b, min(hi_b - hi_a + 1, ZOOM_GRID)).round().astype(np.int64))
        window, kl = _best_window(sums, noise_sums, whole, lo_idx, hi_idx)
        if kl < best_kl:
            best, best_kl = window, kl
        step_lo = int(np.max(np.diff(lo_idx), initial=1))
        step_hi = int(np.max(np.diff(hi_idx), initial=1))
        if step_lo <= 1 and step_hi <= 1:
            return best
        lo_a, lo_b = max(lo_span[0], best[0] - step_lo), min(lo_span[1], best[0] + step_lo)
        hi_a, hi_b = max(hi_span[0], best[1] - step_hi), min(hi_span[1], best[1] + step_hi)


def _best_window(sums: _PrefixSums, noise_sums: tuple[np.ndarray, ...], whole_noise: float, lo_idx, hi_idx) -> tuple[tuple[int, int], float]:
    """The grid's admissible window of least KL and its KL (inf when none is admissible)."""
    C = noise_sums[0]  # cumulative counts of the values as they are
    outside = C[lo_idx][:, None] + (C[-1] - C[hi_idx])[None, :]
    allowed = _admissible(_noise_two_sided(noise_sums, lo_idx, hi_idx, 1.0), whole_noise, outside, float(C[-1])).ravel()
    a, b = np.meshgrid(lo_idx, hi_idx, indexing="ij")
    a, b = a.ravel(), b.ravel()
    ok = ((b - a) >= LEVELS) & allowed
    if not ok.any():
        return (int(lo_idx[0]), int(hi_idx[-1])), np.inf
    a, b = a[ok], b[ok]
    kl = _kl_windows(sums, a, b, LEVELS)
    k = int(np.argmin(kl))
    return (int(a[k]), int(b[k])), float(kl[k])


def _xlogx(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def _kl_windows(sums: _PrefixSums, starts: np.ndarray, ends: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) for each window [start, end) of bins, vectorised (TensorRT's definition).

    P: the window's counts with the mass below and above folded into its first and last bin,
    normalised by the total N. Q: the window's counts *without* the folded mass, merged into
    `levels` groups (boundaries start + floor(k * len / levels)), each group's mass M_j spread
    uniformly over the n_j bins where P is non-zero, normalised by the window mass W. Then

        KL = (1/N) [ sum_i c'_i log c'_i  -  sum_j C'_j log(M_j / n_j) ]  -  log N  +  log W

    with C'_j the folded mass of group j. A group whose M_j is 0 while P has mass there (only
    folded outliers) is smoothed to half a count. `sums`: the histogram's _PrefixSums.
    """
    starts, ends = starts.astype(np.int64), ends.astype(np.int64)
    if _search is None or levels & (levels - 1):  # the kernel takes powers of two
        return _kl_windows_numpy(sums, starts, ends, levels)
    out = np.empty(starts.size)
    _search.kl_windows(sums.c, sums.C, sums.PL, sums.NZ, starts, ends, levels, out)
    return out


def _kl_windows_numpy(sums: _PrefixSums, starts: np.ndarray, ends: np.ndarray, levels: int) -> np.ndarray:
    """The compiled `kl_windows` in numpy: the fallback, and the reference the kernel is tested
    against. Blocks of windows: the (windows, levels) temporaries stay in the cache instead of
    costing fresh pages for every array (3-4x faster for a 2048-window search)."""
    block = max(1, KL_BLOCK_ELEMENTS // (levels + 1))
    return np.concatenate([_kl_block(sums, starts[i : i + block], ends[i : i + block], levels) for i in range(0, starts.size, block)])


KL_BLOCK_ELEMENTS = 1 << 16


@dataclasses.dataclass
class _PrefixSums:
    c: np.ndarray  # counts
    C: np.ndarray  # cumulative counts, C[i] = sum(c[:i])
    PL: np.ndarray  # cumulative c log c
    NZ: np.ndarray  # cumulative number of non-zero bins

    @classmethod
    def of(cls, counts: np.ndarray) -> _PrefixSums:
        c = counts.astype(np.float64)
        zero = np.zeros(1)
        return cls(c=c, C=np.concatenate([zero, np.cumsum(c)]), PL=np.concatenate([zero, np.cumsum(_xlogx(c))]), NZ=np.concatenate([zero, np.cumsum(c > 0, dtype=np.float64)]))


def _kl_block(sums: _PrefixSums, starts: np.ndarray, ends: np.ndarray, levels: int) -> np.ndarray:
    c, C, PL, NZ = sums.c, sums.C, sums.PL, sums.NZ
    total = C[-1]
    below = C[starts]
    above = total - C[ends]
    first_c, last_c = c[starts], c[ends - 1]
    plogp = PL[ends] - PL[starts] - _xlogx(first_c) - _xlogx(last_c) + _xlogx(first_c + below) + _xlogx(last_c + above)
    # Group boundaries start + floor(len * k / levels), in float64: exact for integers this small
    # (len * k is exact, and a correctly rounded quotient of integers below 2**40 by `levels` is
    # never rounded up to the next integer), and faster than int64 floor division.
    k = np.arange(levels + 1, dtype=np.float64)
    bounds = starts[:, None] + np.floor(np.outer(ends - starts, k) / levels).astype(np.int64)
    unfolded = np.diff(C[bounds], axis=1)
    folded = unfolded.copy()
    folded[:, 0] += below
    folded[:, -1] += above
    nonzero = np.diff(NZ[bounds], axis=1)
    nonzero[:, 0] += (first_c == 0) & (below > 0)
    nonzero[:, -1] += (last_c == 0) & (above > 0)
    q_mass = np.maximum(unfolded, 0.5)
    np.maximum(nonzero, 1.0, out=nonzero)
    # q_mass >= 0.5 and nonzero >= 1 keep the log finite, so empty groups add exactly 0.
    q_term = np.einsum("ij,ij->i", folded, np.log(q_mass / nonzero))
    window = np.maximum(C[ends] - C[starts], 0.5)
    return (plogp - q_term) / total - np.log(total) + np.log(window)


_ONE_SIDED = {
    Method.PERCENTILE: _percentile_one_sided,
    Method.MSE: _mse_one_sided,
    Method.SQNR: _sqnr_one_sided,
    Method.ENTROPY: _entropy_one_sided,
}
_TWO_SIDED = {
    Method.PERCENTILE: _percentile_two_sided,
    Method.MSE: _mse_two_sided,
    Method.SQNR: _sqnr_two_sided,
    Method.ENTROPY: _entropy_two_sided,
}


def expected_noise(stats: TensorStatistics, lo: float, hi: float, gamma: float = 1.0) -> float:
    """Expected clip (weighted by gamma) + rounding noise per element of quantizing to [lo, hi].

    The same model of noise the mse/sqnr methods minimise, in real units; used by reports.
    """
    if stats.empty:
        return math.nan
    x = (np.arange(stats.counts.size) + stats.offset + 0.5) * stats.bin_width
    c = stats.counts.astype(np.float64)
    clip = np.sum(c * (x - np.clip(x, lo, hi)) ** 2)
    step = (hi - lo) / (LEVELS - 1)
    inside = np.sum(c[(x >= lo) & (x <= hi)])
    return float((gamma * clip + inside * step * step / 12.0) / stats.count)
