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
* any other tensor holding low mask values (the mask itself, {0, finfo.min}; a mask added to a
  position bias before it reaches the scores) keeps its lower end at MASK_MIN or below, so that
  added to any score a model computes it still takes the sum to that sum's lower end. A high
  mask value likewise keeps the upper end at -MASK_MIN or above.

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
    """`ranges` with the tensors that held mask values widened by the rules above."""
    holding = {t for t, st in statistics.items() if st.masked and t in ranges}
    if not holding:
        return dict(ranges)
    gaps = softmax_gaps(ir_graph(model))
    out = dict(ranges)
    for t in holding:
        out[t] = widened_for_masks(ranges[t], statistics[t], gaps.get(t))
    return out


def widened_for_masks(r: tuple[float, float], st: TensorStatistics, softmax_gap: float | None) -> tuple[float, float]:
    """One tensor's range, widened so that its saturated mask values still mask (`softmax_gap`:
    the gap a Softmax reading it needs, or None if none does)."""
    lo, hi = float(r[0]), float(r[1])
    symmetric = lo < 0 and lo == -hi
    if st.mask_low:
        lo = min(lo, hi - softmax_gap) if softmax_gap is not None else min(lo, MASK_MIN)
    if st.mask_high:
        hi = max(hi, -MASK_MIN)
    if symmetric:
        a = max(-lo, hi)
        lo, hi = -a, a
    return lo, hi


def mask_counts(statistics: Mapping[str, TensorStatistics]) -> dict[str, tuple[int, int]]:
    """{tensor: (low, high)}: the mask values left out of each tensor that held any."""
    return {t: (st.mask_low, st.mask_high) for t, st in statistics.items() if st.masked}
