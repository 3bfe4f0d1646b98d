"""Calibration for the technique pipeline: the Calibrator's statistics, plus attention masks.

Statistics are the Calibrator's (`TensorStatistics` folded batch by batch, ranges by
`select_range`), so without masks the ranges are identical to `Calibrator.compute_range()`.

Attention masks. Padded batches carry an additive mask: scores + mask, with mask 0 on real
positions and a large negative constant (-1e4, -1e9, float32 min, -inf) on padding, then a
Softmax. The statistics already leave -inf and finfo.min out (mask values: statistics.py); left
alone, the finite ones set the lower end of every tensor they flow into and the real scores
collapse into a few quantization steps. A *masked tensor* here is the output of an
Add / Sub / Where that combines a data operand (an activation holding no value <= MASK_MIN, not constant) with
a mask operand (a tensor or constant holding such values, or -inf), and every tensor after it on
the way to the Softmax through ops that carry the mask along (scaling, reshapes, further adds).
Its statistics are collected again without the masked values -- mask values, and those below
the middle of the widest empty stretch of its histogram when that stretch spans half the
observed range (masked values sit far below the real ones) -- and its range keeps room below
the largest real score so that a masked position, saturated at the range's lower end, still gets
a softmax probability below half an output step: hi - lo >= ln(512 L), L the last axis length.
The mask operand itself (0 or the large negative constant) gets the lower end MASK_MIN: -1e4 is
far below any real score, so the sum still saturates at the masked tensor's lower end, and the
ratio of the two scales stays representable (float32 min / 255 against a score scale overflows
the requantization multiplier of an integer Add). These are onnx_backend.masks' two rules, which
every path applies to mask values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import masks
from ..calibrator import Calibrator, Ranges
from ..errors import CalibrationError
from ..masks import MASK_MIN, softmax_margin
from ..range_selection import DEFAULT_PERCENTILE, DEFAULT_SQNR_GAMMA, map_range_searches, select_range
from ..statistics import DEFAULT_BINS, NonFiniteError, TensorStatistics, channel_sums_of
from .graph import Feeds, tensors_on

# MASK_MIN (onnx_backend.masks): a value this low (or a mask value) in an operand of Add/Sub/Where marks an additive mask
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
    mask_operands: set[str] = field(default_factory=set)  # the masks themselves: lower end MASK_MIN
    softmax_gaps: dict[str, float] = field(default_factory=dict)  # masks.softmax_gaps of the model

    def ranges(self, method_for: Callable[[str], tuple[str, bool]], *, percentile: float = DEFAULT_PERCENTILE, sqnr_gamma: float = DEFAULT_SQNR_GAMMA) -> Ranges:
        """{tensor: (lo, hi)}; `method_for(tensor)` gives (method, symmetric)."""
        observed = [name for name, st in self.stats.items() if not st.empty]
        chosen = map_range_searches(lambda name: self.range_of(name, *method_for(name), percentile=percentile, sqnr_gamma=sqnr_gamma), observed, method_for)
        return Ranges(dict(zip(observed, chosen)), method="per-tensor", percentile=percentile, mask_values=masks.mask_counts(self.stats), channel_sums=channel_sums_of(self.stats))

    def range_of(self, name: str, method: str, symmetric: bool, **kw) -> tuple[float, float]:
        st = self.stats[name]
        lo, hi = select_range(st, method, symmetric, **kw)
        if name in self.mask_operands:
            lo = MASK_MIN
            hi = min(hi, -MASK_MIN) if symmetric else hi  # a symmetric range stays symmetric
        m = self.masked.get(name)
        if m is not None:
            lo = min(lo, hi - softmax_margin(m.softmax_length))
            if symmetric:
                a = max(-lo, hi)
                lo, hi = -a, a
        elif name not in self.mask_operands and st.masked:  # mask values outside a recognised mask
            lo, hi = masks.widened_for_masks((lo, hi), st, self.softmax_gaps.get(name))
        return lo, hi


def _update(st: TensorStatistics, name: str, sample: int, x: np.ndarray, floor: float | None = None) -> None:
    """Fold x in (without its values <= floor, if given: masked positions)."""
    try:
        st.update(x if floor is None else x[~(x <= floor)])  # NaN is kept, and refused
    except NonFiniteError:
        raise CalibrationError(f"tensor {name!r} holds NaN on calibration sample {sample}") from None


def collect(model: onnx.ModelProto, feeds: Sequence[Feeds], *, bins: int = DEFAULT_BINS) -> Statistics:
    """Statistics of every float activation over `feeds`, masks handled. The first pass is the
    Calibrator's own (its session, its statistics: one collector for every entry point); only
    the tensors an attention mask flows into are read again, without their masked values."""
    calibrator = Calibrator(model, histogram_bins=bins, quiet=True)
    calibrator.collect_data(feeds)
    stats = dict(calibrator.statistics)
    masked = find_masked(model, stats)
    if masked:
        redo = {n: TensorStatistics(bins) for n in masked}
        for i, values in enumerate(tensors_on(model, feeds, list(masked))):
            for name, x in values.items():
                _update(redo[name], name, i, x, masked[name].floor)
                if x.ndim:
                    masked[name].softmax_length = max(masked[name].softmax_length, int(x.shape[-1]))
        for name, st in redo.items():  # the mask values were counted in the first pass
            st.mask_low, st.mask_high = stats[name].mask_low, stats[name].mask_high
        stats.update(redo)
    mask_operands = {n for n, st in stats.items() if n not in masked and _is_mask(st)}
    gaps = masks.softmax_gaps(masks.ir_graph(model)) if any(st.masked for st in stats.values()) else {}
    return Statistics(stats, masked, len(feeds), mask_operands if masked else set(), gaps)


def given(model: onnx.ModelProto, stats: dict[str, TensorStatistics], samples: int) -> Statistics | None:
    """Statistics gathered elsewhere (the PyTorch observers, on every calibration batch) as the
    pipeline's, or None when an attention mask flows into one of their tensors: those must be
    read again without their masked positions, which needs the inputs (see `collect`)."""
    if find_masked(model, stats):
        return None
    gaps = masks.softmax_gaps(masks.ir_graph(model)) if any(st.masked for st in stats.values()) else {}
    return Statistics(dict(stats), {}, samples, set(), gaps)


def _is_mask(st: TensorStatistics) -> bool:
    """Holds mask values, or values <= MASK_MIN."""
    return st.mask_low > 0 or (not st.empty and st.min <= MASK_MIN)


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


def find_masked(model: onnx.ModelProto, stats: dict[str, TensorStatistics]) -> dict[str, MaskedTensor]:
    """The tensors an additive attention mask flows into, on the way to a Softmax.

    A chain starts at an Add / Sub / Where with a mask operand (a tensor or constant holding a
    value <= MASK_MIN, or a mask value) and a data operand (an activation holding none, not
    constant), and follows the ops that carry the mask along (PASS_THROUGH) to a Softmax."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    constants = _constant_values(model)
    mask_tensors = {n for n, st in stats.items() if _is_mask(st)}
    mask_tensors |= {n for n, v in constants.items() if _is_mask_constant(v)}
    found: dict[str, MaskedTensor] = {}
    for node in model.graph.node:
        if node.op_type not in MASK_OPS or not node.output or node.output[0] not in stats:
            continue
        operands = [i for i in node.input if i]
        if not any(i in mask_tensors for i in operands) or not any(_is_data(i, stats, mask_tensors) for i in operands):
            continue
        for t in _chain_to_softmax(node.output[0], consumers) or ():
            if t in stats:
                found[t] = MaskedTensor(floor=mask_floor(stats[t]), softmax_length=1)
    return found


def _is_data(name: str, stats: dict[str, TensorStatistics], mask_tensors: set[str]) -> bool:
    """An activation that is not a mask and takes more than one value (the zeros a mask is
    built from with Where(padded, finfo.min, zeros) are not scores)."""
    st = stats.get(name)
    return st is not None and name not in mask_tensors and not st.empty and st.max > st.min


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
    return sorted(t for t in find_masked(model, stats) if stats[t].min <= MASK_MIN / 100)
