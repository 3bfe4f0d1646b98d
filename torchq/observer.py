"""Streaming statistics of one tensor, gathered on the tensor's own device.

Same bin geometry as `onnx_backend.statistics` (zero-aligned power-of-two bins; the exponent is a
function of the global min/max only), so `to_statistics()` yields exactly what the numpy path
would have built from the same values, and range selection happens in one place. Per batch it
costs one aminmax, one bincount and one host sync for the min/max; on the CPU it is the numpy
path itself (its compiled binning kernel).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from onnx_backend import statistics
from onnx_backend.statistics import MASK_MAGNITUDE, ChannelSums, NonFiniteError, TensorStatistics, bin_of, required_exponent


class Observer:
    def __init__(self, key: str, max_bins: int):
        self.key = key
        self.max_bins = max_bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.exponent = 0
        self.offset = 0
        self.counts: torch.Tensor | None = None  # int64, on the observed tensor's device
        self.mask_low = 0  # mask values left out (onnx_backend.statistics.MASK_MAGNITUDE)
        self.mask_high = 0
        self.ndim: int | None = None  # rank of the observed tensor, to catch key mix-ups at export
        self.channels = ChannelSums()  # per-channel sums (means for the analytic bias correction)

    @property
    def empty(self) -> bool:
        return self.count == 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        ndim = x.dim()
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # exact
        if x.dtype == torch.float64 and x.device.type == "mps":
            x = x.float()
        if x.device.type == "cpu" and statistics._binning is not None:
            self._update_on_host(x, ndim)
            return
        flat = x.reshape(-1)
        lo, hi = (float(v) for v in torch.stack(torch.aminmax(flat)).tolist())
        mask_low = mask_high = 0
        channels = self._channels_added(x, masked=not (-MASK_MAGNITUDE < lo and hi < MASK_MAGNITUDE))
        if not (-MASK_MAGNITUDE < lo and hi < MASK_MAGNITUDE):  # NaN fails both comparisons
            flat, mask_low, mask_high = self._split_mask_values(flat, lo, hi)
            if flat.numel() == 0:
                self.mask_low, self.mask_high, self.ndim, self.channels = self.mask_low + mask_low, self.mask_high + mask_high, ndim, channels
                return
            lo, hi = (float(v) for v in torch.stack(torch.aminmax(flat)).tolist())
        new_lo, new_hi, n = min(lo, self.min), max(hi, self.max), flat.numel()
        e = required_exponent(new_lo, new_hi, self.max_bins)
        first, last = bin_of(new_lo, e), bin_of(new_hi, e)
        # Scaling by a power of two is exact (unless it underflows), so these are the numpy
        # path's bin indices (onnx_backend.statistics.bin_batch, with the same underflow fix).
        scaled = flat * math.ldexp(1.0, -e)
        index = torch.floor(scaled).to(torch.int64)
        if e > 0:
            index = torch.where((scaled == 0) & (flat < 0), -1, index)
        index = index - first
        batch = torch.bincount(index, minlength=last - first + 1)
        counts = batch if self.counts is None else batch + self._rebinned(e, first, last - first + 1, x.device)
        # One statement, no call in it: an interrupted update leaves the previous state intact.
        self.counts, self.exponent, self.offset, self.min, self.max, self.count, self.mask_low, self.mask_high, self.ndim, self.channels = (
            counts, e, first, new_lo, new_hi, self.count + n, self.mask_low + mask_low, self.mask_high + mask_high, ndim, channels
        )

    def _channels_added(self, x: torch.Tensor, masked: bool) -> ChannelSums:
        """ChannelSums.added in torch ops on the tensor's device (one host copy of the sums)."""
        if not self.channels.fits(tuple(x.shape)):
            return ChannelSums(-1)
        keep = x.abs() < MASK_MAGNITUDE if masked else None  # NaN fails too: update raises on it
        values = torch.where(keep, x, 0) if keep is not None else x
        batch = {}
        for axis in self.channels.axes_for(tuple(x.shape)):
            others = [a for a in range(x.dim()) if a != axis]
            s = values.sum(dim=others, dtype=torch.float64)
            n = keep.sum(dim=others) if keep is not None else torch.full((x.shape[axis],), x.numel() // max(x.shape[axis], 1), dtype=torch.int64)
            batch[axis] = (s.cpu().numpy(), n.cpu().numpy())
        return self.channels.plus(x.dim(), batch)

    def _split_mask_values(self, flat: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, int, int]:
        """statistics.split_mask_values in torch ops, on the tensor's device."""
        if math.isnan(lo) or math.isnan(hi):  # aminmax propagates NaN
            raise NonFiniteError(self.key)
        low, high = flat <= -MASK_MAGNITUDE, flat >= MASK_MAGNITUDE
        n_low, n_high = (int(v) for v in torch.stack([low.sum(), high.sum()]).tolist())
        return flat[~(low | high)], n_low, n_high

    def _update_on_host(self, x: torch.Tensor, ndim: int) -> None:
        """A CPU tensor goes through the numpy path's compiled kernel: the same statistics, 4-9x
        faster than the torch ops below (docs/bench/binning.md)."""
        stats = self.to_statistics()
        try:
            stats.update(x.numpy())
        except NonFiniteError:
            raise NonFiniteError(self.key) from None
        counts = torch.from_numpy(stats.counts)
        # One statement, no call in it: an interrupted update leaves the previous state intact.
        self.counts, self.exponent, self.offset, self.min, self.max, self.count, self.mask_low, self.mask_high, self.ndim, self.channels = (
            counts, stats.exponent, stats.offset, stats.min, stats.max, stats.count, stats.mask_low, stats.mask_high, ndim, stats.channels
        )

    def _rebinned(self, e: int, first: int, length: int, device) -> torch.Tensor:
        shift = e - self.exponent
        index = (torch.arange(self.offset, self.offset + self.counts.numel(), device=self.counts.device) >> shift) - first
        out = torch.zeros(length, dtype=torch.int64, device=self.counts.device)
        return out.index_add_(0, index, self.counts).to(device)

    @property
    def observed(self) -> bool:
        """Any value was seen, mask values included."""
        return self.count > 0 or self.mask_low > 0 or self.mask_high > 0

    def to_statistics(self) -> TensorStatistics:
        if self.counts is None:
            return TensorStatistics(self.max_bins, mask_low=self.mask_low, mask_high=self.mask_high, channels=self.channels)
        return TensorStatistics(self.max_bins, self.min, self.max, self.count, self.exponent, self.offset, self.counts.cpu().numpy().astype(np.int64), self.mask_low, self.mask_high, self.channels)

    def load_statistics(self, stats: TensorStatistics, device=None) -> None:
        """Replace this observer's state (used when merging across processes)."""
        self.min, self.max, self.count = stats.min, stats.max, stats.count
        self.exponent, self.offset = stats.exponent, stats.offset
        self.mask_low, self.mask_high = stats.mask_low, stats.mask_high
        self.channels = stats.channels
        self.counts = torch.as_tensor(stats.counts, dtype=torch.int64, device=device) if not stats.empty else None
