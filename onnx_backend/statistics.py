"""Streaming, mergeable statistics of one tensor: exact min/max plus a histogram that widens.

Bin geometry (shared by the numpy path here and the on-device torch observer in torchq):
bin k covers [k * 2**e, (k + 1) * 2**e). Widths are powers of two and edges are aligned at 0, so

* widening is exact: going from exponent e to e + 1 merges bins pairwise (k -> k >> 1);
* merging two histograms is exact: coarsen both to the larger exponent, then add;
* the exponent is a function of the global min and max only (the smallest e for which the data
  spans at most `max_bins` bins, and never finer than the data's own float resolution), so the
  result does not depend on the order of the batches or on how the data was sharded across ranks;
* |x| is a fold of the same bins around 0, which the symmetric methods use.

Mask values -- -inf, +inf and magnitudes of at least MASK_MAGNITUDE (float32's finfo.min and
finfo.max, scaled down by up to 2**-8: how padded attention masks reach the tensors) -- are
counted (`mask_low`, `mask_high`) and left out of min, max, count and histogram: they are
padding, not a distribution, and a range that held them would give every other value the same
code. NaN is an error. docs/METHODS.md says why this boundary and what INT8 does with them.

Alongside the histogram, per-channel sums (`ChannelSums`, along axis 1 and along the last axis)
give each channel's mean: what the analytic bias correction (onnx_backend/mean_correction.py)
needs of a weighted layer's input. They merge exactly as well (sums and counts add).

Memory is O(max_bins + channels), whatever the number of samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 4096
# Bins no finer than 2**-100 (keeps 2**-e finite in float32) and no finer than the data's own
# resolution (2**(exponent of max|x| - 40)), so bin indices stay well inside int64.
MIN_EXPONENT = -100
RESOLUTION_BITS = 40


# |x| >= this (or infinite) is a mask value: 2**8 below float32's largest finite magnitude, so
# finfo.min survives a scaling by 1/sqrt(head dim) (or any factor down to 1/256) and still counts.
MASK_MAGNITUDE = 2.0**120


class NonFiniteError(ValueError):
    """Calibration data holds NaN."""


def bin_of(v: float, exponent: int) -> int:
    """Index of the bin holding `v`: floor(v / 2**exponent).

    A negative value so small that v / 2**exponent underflows to -0.0 still lies in bin -1.
    """
    k = math.floor(math.ldexp(v, -exponent))
    return -1 if k == 0 and v < 0 else k


def _spans(lo: float, hi: float, e: int) -> int:
    return bin_of(hi, e) - bin_of(lo, e) + 1


def required_exponent(lo: float, hi: float, max_bins: int) -> int:
    """Smallest bin exponent for which [lo, hi] spans at most `max_bins` bins."""
    magnitude = max(abs(lo), abs(hi))
    floor_e = MIN_EXPONENT if magnitude == 0 else max(MIN_EXPONENT, math.frexp(magnitude)[1] - RESOLUTION_BITS)
    if hi <= lo:
        return floor_e
    start = math.frexp((hi - lo) / max_bins)[1] - 2  # certainly too fine: spans > max_bins bins
    e = max(floor_e, start)
    while _spans(lo, hi, e) > max_bins:
        e += 1
    return e


def coarsen(counts: np.ndarray, offset: int, shift: int) -> tuple[np.ndarray, int]:
    """Re-bin `counts` (first bin index `offset`) to bins 2**shift times wider."""
    if shift == 0 or counts.size == 0:
        return counts, offset
    index = np.arange(offset, offset + counts.size, dtype=np.int64) >> shift
    new_offset = int(index[0])
    return np.bincount(index - new_offset, weights=counts, minlength=int(index[-1]) - new_offset + 1).astype(np.int64), new_offset


def realign(counts: np.ndarray, offset: int, new_offset: int, length: int) -> np.ndarray:
    """Place `counts` into a zero array of `length` bins starting at bin `new_offset`."""
    out = np.zeros(length, dtype=np.int64)
    start = offset - new_offset
    out[start : start + counts.size] = counts
    return out


try:  # the compiled kernel (setup.py); numpy below when it was not built
    from . import _binning
except ImportError:  # pragma: no cover - depends on the install
    _binning = None
# The interface count() must have; a kernel built from an older _binning.c is not used.
BINNING_ABI = 2
if _binning is not None and getattr(_binning, "ABI", 1) != BINNING_ABI:  # pragma: no cover - a stale build
    import warnings

    warnings.warn(f"{_binning.__file__} was built from an older _binning.c; binning in numpy (slower) until `python setup.py build_ext --inplace` rebuilds it", stacklevel=2)
    _binning = None


def bin_batch(x: np.ndarray, exponent: int, lo: float | None = None, hi: float | None = None) -> tuple[np.ndarray, int]:
    """Counts of the 1-D float32/float64 array x (no mask value in it) in bins of width
    2**exponent, and the index of the first bin (lo, hi: x's minimum and maximum, when the caller
    knows them)."""
    first = bin_of(float(x.min()) if lo is None else lo, exponent)
    last = bin_of(float(x.max()) if hi is None else hi, exponent)
    if _binning is None:
        return bin_batch_numpy(x, exponent, first, last), first
    counts = np.zeros(last - first + 1, dtype=np.int64)
    if _count_into(counts, x, exponent, first) is None:
        raise ValueError(f"a value of the batch lies outside [{lo}, {hi}], the range it was binned for")
    return counts, first


def _count_into(counts: np.ndarray, x: np.ndarray, exponent: int, first: int, relu: bool = False) -> tuple[float, float, int, int] | None:
    """Add the bin counts of x (of max(x, 0) with `relu`) to `counts` (whose index 0 is bin
    `first`) with the compiled kernel, leaving mask values out, and return (min, max) of the
    values counted and the numbers of low and high mask values; None, with `counts` partly
    updated, if a value lies outside those bins or x holds NaN."""
    native = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))  # what the kernel reads
    return _binning.count(native, math.ldexp(1.0, -exponent), first, exponent > 0, counts, relu, MASK_MAGNITUDE)


# Elements binned at a time: the temporaries stay in the cache, 1.7x faster than whole-array
# passes on activations of millions of values (the counting itself is numpy's bincount).
BIN_CHUNK = 1 << 16


def bin_batch_numpy(x: np.ndarray, exponent: int, first: int, last: int) -> np.ndarray:
    """bin_batch in numpy: the fallback, and the reference the compiled kernel is tested against."""
    counts = np.zeros(last - first + 1, dtype=np.int64)
    w = x.dtype.type(math.ldexp(1.0, -exponent))
    scaled_buffer = np.empty(min(x.size, BIN_CHUNK), dtype=x.dtype)
    index_buffer = np.empty(scaled_buffer.size, dtype=np.intp)
    for start in range(0, x.size, BIN_CHUNK):
        part = x[start : start + BIN_CHUNK]
        scaled, index = scaled_buffer[: part.size], index_buffer[: part.size]
        # Scaling by a power of two is exact in float32 and float64 (unless it underflows), so
        # floor() gives the same bin indices here and in the torch observer.
        np.multiply(part, w, out=scaled)
        underflow = (scaled == 0) & (part < 0) if exponent > 0 else None  # only then: see bin_of
        np.floor(scaled, out=scaled)
        if underflow is not None:
            scaled[underflow] = -1
        # floor(x * w) - first is exact in float: either every value is small, or all lie within a
        # factor of two of `first` (Sterbenz) -- so the one integer conversion happens last.
        scaled -= scaled.dtype.type(first)
        np.copyto(index, scaled, casting="unsafe")
        counts += np.bincount(index, minlength=counts.size)
    return counts


def split_mask_values(x: np.ndarray) -> tuple[np.ndarray, int, int]:
    """x without its mask values, and how many were <= -MASK_MAGNITUDE and >= MASK_MAGNITUDE.
    Raises NonFiniteError if x holds NaN."""
    if np.isnan(x.min()):  # NaN propagates through min (one pass; the mask test needs two)
        raise NonFiniteError("NaN in calibration data")
    low, high = x <= -MASK_MAGNITUDE, x >= MASK_MAGNITUDE
    n_low, n_high = int(np.count_nonzero(low)), int(np.count_nonzero(high))
    return (x[~(low | high)] if n_low or n_high else x), n_low, n_high


def channel_axes(ndim: int) -> tuple[int, ...]:
    """The axes whose per-channel sums are kept: axis 1 (Conv's NCHW channels, Gemm's features)
    and the last axis (a MatMul's input features), for tensors of rank 2 and more."""
    return () if ndim < 2 else tuple(sorted({1, ndim - 1}))


@dataclass(frozen=True)
class ChannelSums:
    """Per-channel sums and value counts of a tensor along `channel_axes(ndim)`.

    Immutable: `added` and `merged` return new objects, so statistics that share one (see
    TensorStatistics.sharing_counts) never change each other. Mask values are not counted. An
    axis whose size changes between batches (a sequence axis) is dropped; if the rank itself
    changes, so are all (`ndim` = -1). Sums are float32 per item (along axis 0), float64 across
    items: unlike the histogram, the order of the items and how they were batched or sharded
    change them by float64 rounding (a relative 1e-16), not more."""

    ndim: int = 0  # 0: nothing seen yet
    sums: dict[int, np.ndarray] = field(default_factory=dict)  # axis -> float64 sums
    counts: dict[int, np.ndarray] = field(default_factory=dict)  # axis -> int64 value counts

    def mean(self, axis: int) -> np.ndarray | None:
        """Per-channel mean along `axis` (negative counts from the end), or None where not kept
        or a channel saw no value."""
        if self.ndim <= 0:
            return None
        axis = axis + self.ndim if axis < 0 else axis
        if axis not in self.sums or not np.all(self.counts[axis] > 0):
            return None
        return self.sums[axis] / self.counts[axis]

    def added(self, x: np.ndarray, *, relu: bool = False, masked: bool = False) -> ChannelSums:
        """These sums plus those of batch x (of max(x, 0) with `relu`; `masked`: x may hold
        mask values, which are left out)."""
        if not self.fits(x.shape):
            return ChannelSums(-1)
        keep = np.abs(x) < MASK_MAGNITUDE if masked else None  # inf fails too
        values = np.where(keep, x, 0) if keep is not None else x
        if relu:
            values = np.maximum(values, 0)
        batch = {}
        for axis in self.axes_for(x.shape):
            others = tuple(a for a in range(x.ndim) if a != axis)
            n = np.full(x.shape[axis], x.size // max(x.shape[axis], 1), dtype=np.int64) if keep is None else keep.sum(axis=others).astype(np.int64)
            batch[axis] = (self._per_item_sums(values, axis).sum(axis=0, dtype=np.float64), n)
        return self.plus(x.ndim, batch)

    @staticmethod
    def _per_item_sums(values: np.ndarray, axis: int) -> np.ndarray:
        """[items along axis 0, channels] sums in float32, one contiguous pass: each item's sums
        do not depend on the batch it came in, so stacking samples (the Calibrator does) changes
        the totals only by float64 rounding."""
        items, c = values.shape[0], values.shape[axis]
        if axis == values.ndim - 1:
            return values.reshape(items, -1, c).sum(axis=1)
        return values.reshape(items, c, -1).sum(axis=2)  # axis 1

    def fits(self, shape: tuple[int, ...]) -> bool:
        """A batch of this shape can be added (same rank as before, or the first batch)."""
        return self.ndim != -1 and (self.ndim == 0 or len(shape) == self.ndim)

    def axes_for(self, shape: tuple[int, ...]) -> list[int]:
        """The axes of a batch of this shape to sum: those still kept, with unchanged sizes."""
        return [a for a in channel_axes(len(shape)) if self.ndim == 0 or (a in self.sums and self.sums[a].size == shape[a])]

    def plus(self, ndim: int, batch: dict[int, tuple[np.ndarray, np.ndarray]]) -> ChannelSums:
        """These sums plus a batch's {axis: (sums, counts)} (from `axes_for`; others dropped)."""
        if ndim != self.ndim and self.ndim != 0:
            return ChannelSums(-1)
        sums = {a: np.asarray(s, dtype=np.float64) + self.sums.get(a, 0.0) for a, (s, _) in batch.items()}
        counts = {a: np.asarray(n, dtype=np.int64) + self.counts.get(a, 0) for a, (_, n) in batch.items()}
        return ChannelSums(ndim, sums, counts)

    def merged(self, other: ChannelSums) -> ChannelSums:
        """Exact merge: sums and counts add, axes kept by both stay."""
        if other.ndim == 0:
            return self
        if self.ndim == 0:
            return other
        if self.ndim != other.ndim or -1 in (self.ndim, other.ndim):
            return ChannelSums(-1)
        axes = [a for a in self.sums if a in other.sums and self.sums[a].size == other.sums[a].size]
        return ChannelSums(self.ndim, {a: self.sums[a] + other.sums[a] for a in axes}, {a: self.counts[a] + other.counts[a] for a in axes})

    def to_dict(self) -> dict:
        return {"ndim": self.ndim, "axes": {str(a): {"sums": self.sums[a].tolist(), "counts": self.counts[a].tolist()} for a in sorted(self.sums)}}

    @classmethod
    def from_dict(cls, d: dict | None) -> ChannelSums:
        if not d:
            return cls()
        axes = d.get("axes", {})
        return cls(int(d["ndim"]), {int(a): np.asarray(v["sums"], dtype=np.float64) for a, v in axes.items()}, {int(a): np.asarray(v["counts"], dtype=np.int64) for a, v in axes.items()})


def channel_sums_of(stats) -> dict[str, ChannelSums]:
    """{tensor: its per-channel sums} for the tensors of {tensor: TensorStatistics} that kept any."""
    return {name: st.channels for name, st in stats.items() if st.channels.sums}


@dataclass
class TensorStatistics:
    """Min, max, element count and a zero-aligned power-of-two histogram of one tensor, and how
    many mask values were left out of them (see the module docstring)."""

    max_bins: int = DEFAULT_BINS
    min: float = math.inf
    max: float = -math.inf
    count: int = 0  # values in the histogram: mask values are not
    exponent: int = MIN_EXPONENT
    offset: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    mask_low: int = 0  # -inf and values <= -MASK_MAGNITUDE, left out
    mask_high: int = 0  # +inf and values >= MASK_MAGNITUDE, left out
    channels: ChannelSums = field(default_factory=ChannelSums)

    @property
    def empty(self) -> bool:
        """No value to choose a range from (mask values, if any, are not)."""
        return self.count == 0

    @property
    def masked(self) -> int:
        """Mask values left out of the statistics."""
        return self.mask_low + self.mask_high

    @property
    def observed(self) -> bool:
        """Any value at all was seen, mask values included."""
        return self.count > 0 or self.masked > 0

    @property
    def bin_width(self) -> float:
        return math.ldexp(1.0, self.exponent)

    def edges(self) -> np.ndarray:
        """Bin edges, len(counts) + 1 of them."""
        return np.arange(self.offset, self.offset + self.counts.size + 1, dtype=np.float64) * self.bin_width

    def _widened(self, lo: float, hi: float) -> tuple[int, int, np.ndarray]:
        """Exponent, first bin and a fresh copy of the counts, re-binned so that [lo, hi] fits
        (lo <= self.min, hi >= self.max). `self` is not changed."""
        e = required_exponent(lo, hi, self.max_bins)
        first, last = bin_of(lo, e), bin_of(hi, e)
        if self.empty:
            return e, first, np.zeros(last - first + 1, dtype=np.int64)
        counts, offset = coarsen(self.counts, self.offset, e - self.exponent)
        return e, first, realign(counts, offset, first, last - first + 1)

    def update(self, x: np.ndarray, *, relu: bool = False) -> None:
        """Fold a batch into the statistics (of max(x, 0) with `relu`: a Relu's output, from its
        input, without the Relu's own copy of the values). Mask values are counted and left out.
        Raises NonFiniteError on NaN, with nothing changed."""
        x = np.asarray(x)
        if x.size == 0:
            return
        shaped = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
        masked_before = self.masked
        self._update_histogram(shaped.ravel(), relu)
        self.channels = self.channels.added(shaped, relu=relu, masked=self.masked > masked_before)

    def _update_histogram(self, x: np.ndarray, relu: bool) -> None:
        if self._counted_in_current_bins(x, relu):
            return
        if relu:
            x = np.maximum(x, x.dtype.type(0))  # NaN stays NaN
        lo, hi = float(x.min()), float(x.max())
        mask_low = mask_high = 0
        if not (-MASK_MAGNITUDE < lo and hi < MASK_MAGNITUDE):  # NaN fails both comparisons
            x, mask_low, mask_high = split_mask_values(x)
            if x.size == 0:
                # One statement, no call in it: a KeyboardInterrupt leaves the old state or the new one.
                self.mask_low, self.mask_high = self.mask_low + mask_low, self.mask_high + mask_high
                return
            lo, hi = float(x.min()), float(x.max())
        e = required_exponent(min(lo, self.min), max(hi, self.max), self.max_bins)
        counts, first = bin_batch(x, e, lo, hi)
        self.add_counts(lo, hi, x.size, counts, first, e, mask_low=mask_low, mask_high=mask_high)

    def _counted_in_current_bins(self, x: np.ndarray, relu: bool) -> bool:
        """The common case after the first batches, in one pass over x: the batch lies in the
        current bins and the wider range requires the current exponent (it almost always does: the
        range grew within the same end bins), so the first bin stays too and the compiled kernel
        counts the batch straight into a copy of the counts, taking its min and max and counting
        its mask values on the way -- exactly what the general path of `update` gives, without its
        re-binning. False, with nothing changed, otherwise (a value beyond the bins, NaN: the
        general path)."""
        if _binning is None or self.empty:
            return False
        counts = self.counts.copy()  # never written into: see add_counts
        counted = _count_into(counts, x, self.exponent, self.offset, relu)
        if counted is None:
            return False
        batch_lo, batch_hi, mask_low, mask_high = counted  # (inf, -inf) if every value is a mask value
        lo, hi = min(batch_lo, self.min), max(batch_hi, self.max)
        # A range grown across a power of two may need coarser bins (RESOLUTION_BITS).
        if (lo, hi) != (self.min, self.max) and required_exponent(lo, hi, self.max_bins) != self.exponent:
            return False
        n = x.size - mask_low - mask_high
        # One statement, no call in it: a KeyboardInterrupt leaves the old state or the new one.
        self.counts, self.min, self.max, self.count, self.mask_low, self.mask_high = counts, lo, hi, self.count + n, self.mask_low + mask_low, self.mask_high + mask_high
        return True

    def add_counts(self, lo: float, hi: float, n: int, counts: np.ndarray, first: int, exponent: int, *, mask_low: int = 0, mask_high: int = 0) -> None:
        """Merge `n` elements spanning [lo, hi], already binned at `exponent` from bin `first`,
        and `mask_low` + `mask_high` mask values left out of them.

        Builds a new counts array and never writes into the current one, so a shallow copy
        (sharing_counts) of these statistics can be updated without touching the original.
        """
        if n == 0:
            # One statement, no call in it: a KeyboardInterrupt leaves the old state or the new one.
            self.mask_low, self.mask_high = self.mask_low + mask_low, self.mask_high + mask_high
            return
        new_lo, new_hi = min(lo, self.min), max(hi, self.max)
        e, offset, total = self._widened(new_lo, new_hi)
        counts, first = coarsen(np.asarray(counts, dtype=np.int64), first, e - exponent)
        start = first - offset
        total[start : start + counts.size] += counts
        # One statement, no call in it: a KeyboardInterrupt leaves the old state or the new one.
        self.exponent, self.offset, self.counts, self.min, self.max, self.count, self.mask_low, self.mask_high = (
            e, offset, total, new_lo, new_hi, self.count + n, self.mask_low + mask_low, self.mask_high + mask_high
        )

    def merge(self, other: TensorStatistics) -> TensorStatistics:
        """Fold another statistics object of the same tensor into this one (exact)."""
        if not other.observed:
            return self
        if self.max_bins != other.max_bins:
            raise ValueError(f"cannot merge histograms of {self.max_bins} and {other.max_bins} bins")
        self.add_counts(other.min, other.max, other.count, other.counts, other.offset, other.exponent, mask_low=other.mask_low, mask_high=other.mask_high)
        self.channels = self.channels.merged(other.channels)
        return self

    def copy(self) -> TensorStatistics:
        return dataclasses.replace(self, counts=self.counts.copy())

    def sharing_counts(self) -> TensorStatistics:
        """A copy that shares the counts array, which update() never writes into: updating it
        leaves this object as it is."""
        return dataclasses.replace(self)

    def folded_abs(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| on bins [k w, (k+1) w), k >= 0, covering [0, max |x|].

        Coarsened first (exactly: bins are aligned at 0) so that [0, max |x|] fits `max_bins`
        bins, however far from 0 the data lies; then negative bin -1-k folds onto bin k.
        """
        magnitude = max(abs(self.min), abs(self.max))
        e = max(self.exponent, required_exponent(0.0, magnitude, self.max_bins))
        counts, offset = coarsen(self.counts, self.offset, e - self.exponent)
        index = np.arange(offset, offset + counts.size)
        folded = np.where(index >= 0, index, -index - 1)
        out = np.zeros(int(folded.max()) + 1, dtype=np.int64)
        np.add.at(out, folded, counts)
        return out, math.ldexp(1.0, e)

    def to_dict(self) -> dict:
        """Plain-JSON form; `counts` is stored sparsely as [first_nonzero, run...]. `min` and
        `max` are inf and -inf while nothing but mask values was seen (json writes them as
        Infinity)."""
        nz = np.flatnonzero(self.counts)
        start = int(nz[0]) if nz.size else 0
        stop = int(nz[-1]) + 1 if nz.size else 0
        return {
            "max_bins": self.max_bins,
            "min": self.min,
            "max": self.max,
            "count": self.count,
            "exponent": self.exponent,
            "offset": self.offset + start,
            "counts": self.counts[start:stop].tolist(),
            "mask_low": self.mask_low,
            "mask_high": self.mask_high,
            "channels": self.channels.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TensorStatistics:
        """The inverse of to_dict; a dict written before mask values (or channel sums) were
        kept has none."""
        return cls(
            int(d["max_bins"]), float(d["min"]), float(d["max"]), int(d["count"]), int(d["exponent"]), int(d["offset"]), np.asarray(d["counts"], dtype=np.int64),
            int(d.get("mask_low", 0)), int(d.get("mask_high", 0)), ChannelSums.from_dict(d.get("channels")),
        )
