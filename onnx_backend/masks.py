"""Mask values in the INT8 model: ranges that keep padded positions masked.

The statistics leave mask values out (statistics.MASK_MAGNITUDE: -inf, +inf, float32's finfo.min
and finfo.max), so they never set a range. In the INT8 model QuantizeLinear saturates them: a
low mask value becomes the range's lower end, a high one its upper end. For a padded position to
stay masked, that end must still mask:

* a tensor a Softmax reads (directly, or through ops that only rearrange, cast or scale it by a
  constant: the attention scores with the mask in them) keeps its lower end at least
  ln(2 * 256 * L) below its upper end, L the length of the Softmax axis (DEFAULT_SOFTMAX_LENGTH
  when the graph does not fix it): a padded position, at the lower end, then gets a probability
  below half an output step (1/256) wherever its row reaches the upper end;
* a tensor added to another (the mask itself, {0, finfo.min}; a mask folded into a position
  bias before it reaches the scores) keeps its lower end at the sum's lower end minus the other
  operand's upper end, or below: its saturated mask values still take the integer sum to the
  sum's own lower end, where the rule above applies. Through a rearranging op or a Where branch
  the reader's lower end carries back as it is; any other reader (or none with a range) asks
  for MASK_MIN. A high mask value keeps the upper end at -MASK_MIN or above.

A range symmetric about 0 stays symmetric. Finite additive masks (-1e4, -1e9) are not mask values:
they set ranges like data, and the attention_masks technique (techniques/calibration.py) leaves
them out with the same two rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from .statistics import TensorStatistics

MASK_MIN = -1.0e4  # far below any score, near enough that its scale sits beside a score's in an integer Add
SOFTMAX_OUTPUT_LEVELS = 256
DEFAULT_SOFTMAX_LENGTH = 4096
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
# Ops between a masked tensor and the Softmax that keep a mask value a mask value and the gap
# below the largest value as it is.
_KEEP_GAP = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Expand", "Slice"})


def softmax_margin(length: int) -> float:
    """The gap below the row's largest value that a masked position needs: exp(-gap) * length
    stays below half of the Softmax's output step."""
    return math.log(2 * SOFTMAX_OUTPUT_LEVELS * max(int(length), 1))


def _softmax_length(node: ir.Node) -> int:
    x = node.inputs[0]
    axis = node.attributes["axis"].value if "axis" in node.attributes else -1
    shape = x.shape if x is not None else None
    if shape is None or not -len(shape) <= axis < len(shape):
        return DEFAULT_SOFTMAX_LENGTH
    dim = shape[axis]
    return dim if isinstance(dim, int) and dim > 0 else DEFAULT_SOFTMAX_LENGTH


def _constant_scalar(v: ir.Value | None) -> float | None:
    t = ir.convenience.get_const_tensor(v) if v is not None else None
    if t is None:
        return None
    a = t.numpy()
    return float(a.reshape(-1)[0]) if a.size == 1 and np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and a.reshape(-1)[0] != 0 else None


def softmax_gaps(graph: ir.Graph) -> dict[str, float]:
    """{tensor: the gap below its largest value a masked position needs} for the tensors a
    Softmax reads through the ops above (a Mul or Div by a constant scales the gap back)."""
    gaps: dict[str, float] = {}
    for node in graph:
        if node.op_type not in SOFTMAX_OPS or not node.inputs or node.inputs[0] is None:
            continue
        frontier = [(node.inputs[0], softmax_margin(_softmax_length(node)))]
        while frontier:
            v, gap = frontier.pop()
            if v.name in gaps and gaps[v.name] >= gap:
                continue
            gaps[v.name] = gap
            producer = v.producer()
            if producer is None or not producer.inputs:
                continue
            if producer.op_type in _KEEP_GAP:
                frontier.extend((x, gap) for x in producer.inputs[:1] if x is not None)
            elif producer.op_type in ("Mul", "Div") and len(producer.inputs) == 2:
                c = _constant_scalar(producer.inputs[1])
                if c is not None and producer.inputs[0] is not None:
                    frontier.append((producer.inputs[0], gap * abs(c) if producer.op_type == "Div" else gap / abs(c)))
    return gaps


def ir_graph(model: ir.Model | onnx.ModelProto) -> ir.Graph:
    return (ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model).graph


def keep_masking(model: ir.Model | onnx.ModelProto, statistics: Mapping[str, TensorStatistics], ranges: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """`ranges` with the tensors that held mask values widened by the rules above; readers
    first, so that a mask carried into a sum gets the bound the sum's own range sets."""
    holding = {t for t, st in statistics.items() if st.masked and t in ranges}
    if not holding:
        return dict(ranges)
    graph = ir_graph(model)
    gaps = softmax_gaps(graph)
    out = dict(ranges)
    values = [v for node in reversed(list(graph)) for v in node.outputs if v is not None] + list(graph.inputs)
    for v in values:
        if v.name in holding:
            out[v.name] = widened_for_masks(out[v.name], statistics[v.name], gaps.get(v.name), _lowest_needed(v, out))
    return out


def _lowest_needed(v: ir.Value, ranges: Mapping[str, tuple[float, float]]) -> float | None:
    """The highest lower end that still masks in every reader of `v` other than a Softmax's
    chain (softmax_gaps): through a rearranging op or a Where branch, its output's lower end;
    into an Add, the sum's lower end minus the other operand's upper end (and one step of the
    sum's), so the saturated mask takes the integer sum to its lower end; MASK_MIN for any other
    reader, or one without a range. None when only a Softmax reads it."""
    needed: list[float] = []
    for use in v.uses():
        node = use.node
        outs = [o for o in node.outputs if o is not None]
        o_range = ranges.get(outs[0].name) if outs else None
        if node.op_type in SOFTMAX_OPS:
            continue
        if o_range is None:
            needed.append(MASK_MIN)
        elif (node.op_type in _KEEP_GAP and use.idx == 0) or (node.op_type == "Where" and use.idx in (1, 2)):
            needed.append(o_range[0])
        elif node.op_type == "Add" and len(node.inputs) == 2 and node.inputs[1 - use.idx] is not None:
            other = _upper_end(node.inputs[1 - use.idx], ranges)
            step = (o_range[1] - o_range[0]) / 255
            needed.append(MASK_MIN if other is None else o_range[0] - other - step)
        else:
            needed.append(MASK_MIN)
    if not needed and not v.uses():  # a graph output
        needed.append(MASK_MIN)
    return min(needed) if needed else None


def _upper_end(v: ir.Value, ranges: Mapping[str, tuple[float, float]]) -> float | None:
    if v.name in ranges:
        return float(ranges[v.name][1])
    t = ir.convenience.get_const_tensor(v)
    if t is None:
        return None
    a = t.numpy()
    return float(a.max()) if a.size and np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() else None


def widened_for_masks(r: tuple[float, float], st: TensorStatistics, softmax_gap: float | None, lowest_needed: float | None = MASK_MIN) -> tuple[float, float]:
    """One tensor's range, widened so that its saturated mask values still mask: `softmax_gap`,
    the gap a Softmax reading it needs (None if none does); `lowest_needed`, the lower end its
    other readers need (None if it has none)."""
    lo, hi = float(r[0]), float(r[1])
    symmetric = lo < 0 and lo == -hi
    if st.mask_low:
        if softmax_gap is not None:
            lo = min(lo, hi - softmax_gap)
        if lowest_needed is not None:
            lo = min(lo, lowest_needed)
    if st.mask_high:
        hi = max(hi, -MASK_MIN)
    if symmetric:
        a = max(-lo, hi)
        lo, hi = -a, a
    return lo, hi


def mask_counts(statistics: Mapping[str, TensorStatistics]) -> dict[str, tuple[int, int]]:
    """{tensor: (low, high)}: the mask values left out of each tensor that held any."""
    return {t: (st.mask_low, st.mask_high) for t, st in statistics.items() if st.masked}
