"""Calibration for the technique pipeline: the Calibrator's statistics, plus attention masks.

Statistics are the Calibrator's (`TensorStatistics` folded batch by batch, ranges by
`select_range`), so without masks the ranges are identical to `Calibrator.compute_range()`.

Attention masks. Padded batches carry an additive mask: scores + mask, with mask 0 on real
positions and a large negative constant (-1e4, -1e9, float32 min, -inf) on padding, then a
Softmax. Left alone, the masked values set the lower end of every tensor they flow into and
the real scores collapse into a few quantization steps. A *masked tensor* here is the output of an
Add / Sub / Where that combines a data operand (an activation holding no value <= MASK_MIN) with
a mask operand (a tensor or constant holding such values, or -inf), and every tensor after it on
the way to the Softmax through ops that carry the mask along (scaling, reshapes, further adds).
Its statistics are collected again without the masked values -- non-finite ones, and those below
the middle of the widest empty stretch of its histogram when that stretch spans half the
observed range (masked values sit far below the real ones) -- and its range keeps room below
the largest real score so that a masked position, saturated at the range's lower end, still gets
a softmax probability below half an output step: hi - lo >= ln(512 L), L the last axis length.
The mask operand itself (0 or the large negative constant) keeps its range, with the lower end
raised to MASK_MIN: -1e4 is far below any real score, so the sum still saturates at the masked
tensor's lower end, and the ratio of the two scales stays representable (float32 min / 255
against a score scale overflows the requantization multiplier of an integer Add).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..calibrator import Ranges, activation_tensors
from ..errors import CalibrationError
from ..range_selection import DEFAULT_PERCENTILE, DEFAULT_SQNR_GAMMA, map_range_searches, select_range
from ..statistics import DEFAULT_BINS, NonFiniteError, TensorStatistics
from .graph import Feeds, tensors_on

MASK_MIN = -1.0e4  # a value this low (or -inf) in an operand of Add/Sub/Where marks an additive mask
SOFTMAX_OUTPUT_LEVELS = 256
MASK_OPS = ("Add", "Sub", "Where")
PASS_THROUGH = ("Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast", "Where", "Expand", "Identity", "Slice")


@dataclass
class MaskedTensor:
    floor: float  # values at or below this are masked positions
    softmax_length: int  # L: the length of the last axis (the softmax's, in attention)


@dataclass
class Statistics:
    """Per-tensor statistics of one model on the calibration data."""

    stats: dict[str, TensorStatistics]
    masked: dict[str, MaskedTensor] = field(default_factory=dict)
    samples: int = 0
    mask_operands: set[str] = field(default_factory=set)  # the masks themselves: lower end raised to MASK_MIN

    def ranges(self, method_for: Callable[[str], tuple[str, bool]], *, percentile: float = DEFAULT_PERCENTILE, sqnr_gamma: float = DEFAULT_SQNR_GAMMA) -> Ranges:
        """{tensor: (lo, hi)}; `method_for(tensor)` gives (method, symmetric)."""
        observed = [name for name, st in self.stats.items() if not st.empty]
        chosen = map_range_searches(lambda name: self.range_of(name, *method_for(name), percentile=percentile, sqnr_gamma=sqnr_gamma), observed, method_for)
        return Ranges(dict(zip(observed, chosen)), method="per-tensor", percentile=percentile)

    def range_of(self, name: str, method: str, symmetric: bool, **kw) -> tuple[float, float]:
        lo, hi = select_range(self.stats[name], method, symmetric, **kw)
        if name in self.mask_operands:
            lo = max(lo, MASK_MIN)
            hi = min(hi, -MASK_MIN) if symmetric else hi  # a symmetric range stays symmetric
        m = self.masked.get(name)
        if m is not None:
            margin = math.log(2 * SOFTMAX_OUTPUT_LEVELS * max(m.softmax_length, 1))
            lo = min(lo, hi - margin)
            if symmetric:
                a = max(-lo, hi)
                lo, hi = -a, a
        return lo, hi


def _update(st: TensorStatistics, x: np.ndarray, floor: float | None = None) -> int:
    """Fold x in; returns how many values were left out (non-finite, or <= floor)."""
    try:
        if floor is None:
            st.update(x)
            return 0
    except NonFiniteError:
        pass
    keep = np.isfinite(x) if floor is None else (np.isfinite(x) & (x > floor))
    st.update(x[keep])
    return int(x.size - np.count_nonzero(keep))


def collect(model: onnx.ModelProto, feeds: Sequence[Feeds], *, bins: int = DEFAULT_BINS, tensors: Sequence[str] | None = None) -> Statistics:
    """Statistics of every float activation (or of `tensors`) over `feeds`, masks handled."""
    names = list(tensors) if tensors is not None else activation_tensors(model)
    stats = {n: TensorStatistics(bins) for n in names}
    nonfinite = dict.fromkeys(names, 0)
    for values in tensors_on(model, feeds, names):
        for name, x in values.items():
            nonfinite[name] += _update(stats[name], x)
    masked = find_masked(model, stats, nonfinite)
    if masked:
        redo = {n: TensorStatistics(bins) for n in masked}
        for values in tensors_on(model, feeds, list(masked)):
            for name, x in values.items():
                _update(redo[name], x, masked[name].floor)
                if x.ndim:
                    masked[name].softmax_length = max(masked[name].softmax_length, int(x.shape[-1]))
        stats.update(redo)
    for name, n in nonfinite.items():
        if n and name not in masked and not _is_mask(stats[name], n):
            raise CalibrationError(f"tensor {name!r} holds NaN or Inf on the calibration data")
    mask_operands = {n for n, st in stats.items() if n not in masked and not st.empty and st.min <= MASK_MIN}
    return Statistics(stats, masked, len(feeds), mask_operands if masked else set())


def _is_mask(st: TensorStatistics, nonfinite: int) -> bool:
    """Holds mask values: non-finite ones, or values <= MASK_MIN."""
    return nonfinite > 0 or (not st.empty and st.min <= MASK_MIN)


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = onnx.numpy_helper.to_array(a.t)
    return out


def _is_mask_constant(v: np.ndarray | None) -> bool:
    if v is None or v.size == 0 or not np.issubdtype(v.dtype, np.floating):
        return False
    finite = v[np.isfinite(v)]
    return (finite.size < v.size and np.any(np.isneginf(v))) or (finite.size > 0 and float(finite.min()) <= MASK_MIN)


def find_masked(model: onnx.ModelProto, stats: dict[str, TensorStatistics], nonfinite: dict[str, int]) -> dict[str, MaskedTensor]:
    """The tensors an additive attention mask flows into, on the way to a Softmax.

    A chain starts at an Add / Sub / Where with a mask operand (a tensor or constant holding a
    value <= MASK_MIN, or -inf) and a data operand (an activation holding none), and follows the
    ops that carry the mask along (PASS_THROUGH) to a Softmax."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    constants = _constant_values(model)
    masks = {n for n, st in stats.items() if _is_mask(st, nonfinite.get(n, 0))}
    masks |= {n for n, v in constants.items() if _is_mask_constant(v)}
    found: dict[str, MaskedTensor] = {}
    for node in model.graph.node:
        if node.op_type not in MASK_OPS or not node.output or node.output[0] not in stats:
            continue
        operands = [i for i in node.input if i]
        if not any(i in masks for i in operands) or not any(i in stats and i not in masks and not stats[i].empty for i in operands):
            continue
        for t in _chain_to_softmax(node.output[0], consumers) or ():
            if t in stats:
                found[t] = MaskedTensor(floor=mask_floor(stats[t]), softmax_length=1)
    return found


def mask_floor(st: TensorStatistics) -> float:
    """Where a tensor's masked values end: the middle of the widest empty stretch of its
    histogram, if that stretch spans at least half of the observed range (masked values sit far
    below the real ones); -inf when there is none (no padding seen, or only -inf masks)."""
    if st.empty or st.max <= st.min:
        return -math.inf
    nz = np.flatnonzero(st.counts)
    if nz.size < 2:
        return -math.inf
    gaps = np.diff(nz)
    k = int(np.argmax(gaps))
    width = st.bin_width
    lo_edge = (st.offset + nz[k] + 1) * width  # top of the last occupied bin below the gap
    hi_edge = (st.offset + nz[k + 1]) * width  # bottom of the first occupied bin above it
    if hi_edge - lo_edge < 0.5 * (st.max - st.min):
        return -math.inf
    return (lo_edge + hi_edge) / 2


def _chain_to_softmax(start: str, consumers) -> list[str] | None:
    """Tensors from `start` through the mask-carrying ops, if they reach a Softmax (else None)."""
    chain, frontier, seen, reaches = [start], [start], {start}, False
    while frontier:
        t = frontier.pop()
        for node in consumers.get(t, []):
            if node.op_type == "Softmax":
                reaches = True
            elif node.op_type in PASS_THROUGH:
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        chain.append(o)
                        frontier.append(o)
    return chain if reaches else None


def masked_by_ranges(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> list[str]:
    """Tensors whose (already chosen) range an additive attention mask has stretched below
    MASK_MIN / 100: for warning users of the plain path, whose histograms cannot separate the
    masked values any more."""
    stats = {name: TensorStatistics(DEFAULT_BINS, float(lo), float(hi), 1) for name, (lo, hi) in ranges.items()}
    return sorted(t for t in find_masked(model, stats, {}) if stats[t].min <= MASK_MIN / 100)
