"""Where a quantized model loses accuracy: float ONNX vs INT8 QDQ ONNX, tensor by tensor.

    report = torchq.report.compare("model.onnx", "model.int8.onnx", samples)
    torchq.report.write_report(report, "report/")     # report.md, report.html, report.json, PNGs

Both models run on the same samples (onnxruntime). Each quantized tensor of the INT8 model (a
QuantizeLinear -> DequantizeLinear pair) is matched by name to the float model's tensor, after the
float model went through the same graph optimization the quantizer applies (BatchNorm folding,
constant folding), so the names agree. Per tensor, accumulated over all samples:

* SQNR (dB) = 10 log10(sum f^2 / sum (f - q)^2), f the float model's value and q the INT8 model's
  dequantized value: the error of everything quantized up to and including this tensor.
* own SQNR: the same with q = the tensor's own quantize-dequantize applied to f (rounding and
  clipping of this tensor alone).
* clipped: the share of f outside the tensor's quantized range [(qmin - zp) s, (qmax - zp) s].
* the SQNR lost at a layer: the lowest SQNR among the node's quantized activation inputs minus
  the SQNR of its output. The layers that lose most are where to look first (a different method,
  or `float: true` for that module in a recipe).

For the tensors whose own quantization is worst, the float values' streaming histogram (onnx_backend.TensorStatistics, what
onnx_backend.Calibrator accumulates) is kept, and the range each calibration method would choose
(onnx_backend.select_range, the one place ranges are chosen) is listed with the SQNR it would give
on that histogram.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnx_backend import qmath

from onnx_backend.calibrator import _progress, get_pure_input_names
from onnx_backend.errors import CalibrationError, InvalidModelError
from onnx_backend.model_io import load_model
from onnx_backend.optimize import optimize_model
from onnx_backend.range_selection import Method, select_range
from onnx_backend.sessions import open_session
from onnx_backend.statistics import DEFAULT_BINS, NonFiniteError, TensorStatistics

METHODS = tuple(m.value for m in Method)


@dataclass
class TensorResult:
    name: str  # tensor name in the float model
    kind: str  # "activation", "weight", or "output" (a model output that stays float: no quantizer)
    producer: str  # node that computes it in the INT8 model (for a weight: the node that reads it)
    op_type: str
    order: int  # position in the INT8 graph
    sqnr_db: float
    own_sqnr_db: float
    clipped: float  # share of float values outside the quantized range
    range: tuple[float, float]  # quantized range (for a per-channel weight: the widest channel)
    scale: float
    zero_point: int
    per_channel: bool = False


@dataclass
class LayerResult:
    node: str
    op_type: str
    input_sqnr_db: float | None  # worst SQNR among its quantized activation inputs
    output_sqnr_db: float
    lost_db: float | None
    weight_sqnr_db: float | None
    output: str


@dataclass
class MethodRange:
    method: str  # e.g. "mse" or "mse_sym"
    range: tuple[float, float]
    sqnr_db: float  # estimated from the histogram
    clipped: float


@dataclass
class QuantReport:
    float_model: str
    int8_model: str
    samples: int
    tensors: list[TensorResult]
    layers: list[LayerResult]
    method_ranges: dict[str, list[MethodRange]] = field(default_factory=dict)
    statistics: dict[str, TensorStatistics] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)  # INT8 tensor -> why it was not compared
    sensitivity: dict | None = None  # SensitivityReport.to_dict() when asked for (torchq report --sensitivity)

    def worst(self, n: int | None = None, kind: str = "activation", own: bool = False) -> list[TensorResult]:
        """Tensors by SQNR, lowest first (`own`: by their own quantization's SQNR)."""
        ts = sorted((t for t in self.tensors if t.kind == kind), key=lambda t: (t.own_sqnr_db if own else t.sqnr_db, t.order))
        return ts if n is None else ts[:n]

    def to_dict(self) -> dict:
        return {
            "float_model": self.float_model,
            "int8_model": self.int8_model,
            "samples": self.samples,
            "tensors": [asdict(t) for t in sorted(self.tensors, key=lambda t: (t.kind != "activation", t.sqnr_db))],
            "layers": [asdict(layer) for layer in self.layers],
            "method_ranges": {t: [asdict(m) for m in ms] for t, ms in self.method_ranges.items()},
            "unmatched": self.unmatched,
            **({"sensitivity": self.sensitivity} if self.sensitivity is not None else {}),
        }


# ---- the INT8 model's quantized tensors -------------------------------------------------------------


@dataclass
class _QTensor:
    key: str  # the DequantizeLinear output in the INT8 model
    candidates: tuple[str, ...]  # names the float tensor may have
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    qmin: int
    qmax: int
    kind: str
    producer: str = ""
    op_type: str = ""
    order: int = 0
    weight: np.ndarray | None = None  # the quantized weight (int8), for kind == "weight"


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _strip(name: str, suffix: str) -> str | None:
    return name[: -len(suffix)] if name.endswith(suffix) else None


def quantized_tensors(model: onnx.ModelProto) -> list[_QTensor]:
    """Every QuantizeLinear -> DequantizeLinear activation and every DequantizeLinear'd int8 weight."""
    consts = _constants(model)
    producer = {o: (i, n) for i, n in enumerate(model.graph.node) for o in n.output}
    consumers: dict[str, list] = {}
    for i, n in enumerate(model.graph.node):
        for x in n.input:
            consumers.setdefault(x, []).append((i, n))
    out, seen = [], set()
    for i, n in enumerate(model.graph.node):
        if n.op_type != "DequantizeLinear" or len(n.input) < 2 or n.input[1] not in consts:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        scale = consts[n.input[1]].astype(np.float64)
        zp = consts[n.input[2]] if len(n.input) > 2 and n.input[2] in consts else np.zeros_like(scale, dtype=np.int8)
        info = np.iinfo(zp.dtype)
        src = n.input[0]
        stripped = _strip(n.output[0], "_dequantized")
        if src in consts:  # a weight stored quantized
            if consts[src].dtype != np.int8:
                continue  # int32 biases follow from the weights; not compared
            names = tuple(x for x in (stripped, _strip(src, "_quantized")) if x)
            users = consumers.get(n.output[0], [])
            op = users[0][1] if users else n
            qmin = -127 if consts[src].dtype == np.int8 else info.min  # the spec's weights: [-127, 127]
            out.append(_QTensor(n.output[0], names, scale, zp.astype(np.int64), axis if scale.ndim else None, qmin, info.max, "weight", op.name, op.op_type, users[0][0] if users else i, consts[src]))
            continue
        q = producer.get(src)
        if q is None or q[1].op_type != "QuantizeLinear" or src in seen:
            continue  # a DequantizeLinear without its QuantizeLinear is not an activation we made
        seen.add(src)
        x = q[1].input[0]
        p = producer.get(x)
        names = tuple(dict.fromkeys(v for v in (x, stripped, n.output[0], _strip(x, "_float")) if v))
        prod_node = p[1] if p else None
        out.append(
            _QTensor(
                n.output[0], names, scale, zp.astype(np.int64), axis if scale.ndim else None, info.min, info.max, "activation",
                prod_node.name if prod_node else "(graph input)", prod_node.op_type if prod_node else "Input", p[0] if p else -1,
            )
        )
    return out


# ---- running both models ----------------------------------------------------------------------------


def _session(model: onnx.ModelProto, extra_outputs: Sequence[str]) -> ort.InferenceSession:
    return open_session(model, expose=extra_outputs)  # Q/DQ kept as written: the values the QDQ graph defines


def _broadcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if values.ndim == 0 or axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def _fake_quant(x: np.ndarray, t: _QTensor) -> tuple[np.ndarray, np.ndarray]:
    """Quantize-dequantize with the tensor's own parameters (ONNX rounding: half to even)."""
    s = _broadcast(t.scale, t.axis, x.ndim)
    z = _broadcast(t.zero_point, t.axis, x.ndim)
    q = np.rint(x / s) + z
    outside = (q < t.qmin) | (q > t.qmax)
    return (np.clip(q, t.qmin, t.qmax) - z) * s, outside


@dataclass
class _Acc:
    signal: float = 0.0
    noise: float = 0.0
    own_noise: float = 0.0
    clipped: int = 0
    count: int = 0

    def add(self, f: np.ndarray, q: np.ndarray, t: _QTensor) -> None:
        f64 = f.astype(np.float64)
        own, outside = _fake_quant(f64, t)
        self.signal += float(np.sum(f64 * f64))
        self.noise += float(np.sum((f64 - q.astype(np.float64)) ** 2))
        self.own_noise += float(np.sum((f64 - own) ** 2))
        self.clipped += int(np.count_nonzero(outside))
        self.count += f.size


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _feeds(sample, input_names: list[str], index: int) -> dict[str, np.ndarray]:
    if isinstance(sample, Mapping):
        feeds = {k: np.asarray(v) for k, v in sample.items()}
    else:
        sample = [sample] if isinstance(sample, np.ndarray) else list(sample)
        if len(sample) != len(input_names):
            raise CalibrationError(f"sample {index} has {len(sample)} inputs; the model takes {len(input_names)} ({', '.join(input_names)})")
        feeds = dict(zip(input_names, (np.asarray(s) for s in sample)))
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise CalibrationError(f"sample {index} lacks model input(s) {missing}")
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in feeds.items() if k in input_names}


def _range_of(t: _QTensor) -> tuple[float, float, float, int]:
    """(lo, hi, scale, zero point) of a per-tensor quantizer; the widest channel if per-channel."""
    lo = (t.qmin - t.zero_point.astype(np.float64)) * t.scale
    hi = (t.qmax - t.zero_point.astype(np.float64)) * t.scale
    i = int(np.argmax(hi - lo)) if np.ndim(lo) else 0
    pick = (lambda a: float(np.ravel(a)[i])) if np.ndim(lo) else float
    return pick(lo), pick(hi), pick(t.scale), int(np.ravel(t.zero_point)[i] if np.ndim(t.zero_point) else t.zero_point)


def compare(
    float_model,
    int8_model,
    samples: Iterable,
    *,
    top: int = 6,
    histogram_bins: int = DEFAULT_BINS,
    quiet: bool | None = None,
) -> QuantReport:
    """Run both models on `samples` (lists of inputs in input order, or {name: array}) and compare."""
    fpath = str(float_model) if not isinstance(float_model, onnx.ModelProto) else "<float model>"
    qpath = str(int8_model) if not isinstance(int8_model, onnx.ModelProto) else "<int8 model>"
    fmodel = optimize_model(load_model(float_model))
    qmodel = load_model(int8_model)
    qtensors = quantized_tensors(qmodel)
    if not qtensors:
        raise InvalidModelError(f"{qpath}: no QuantizeLinear/DequantizeLinear pairs; is this a quantized (QDQ) model?")

    fnames = {o for n in fmodel.graph.node for o in n.output} | {i.name for i in fmodel.graph.input}
    finits = {t.name: numpy_helper.to_array(t) for t in fmodel.graph.initializer} | {
        k: v for k, v in _constants(fmodel).items()
    }
    matched: dict[str, tuple[_QTensor, str]] = {}
    unmatched: dict[str, str] = {}
    for t in qtensors:
        pool = finits if t.kind == "weight" else fnames
        name = next((c for c in t.candidates if c in pool), None)
        if name is None:
            unmatched[t.key] = "no tensor of that name in the (optimized) float model"
        elif name in matched:
            unmatched[t.key] = f"{name!r} is already compared through another DequantizeLinear"
        else:
            matched[name] = (t, name)

    results: list[TensorResult] = []
    # weights: no inference needed
    for name, (t, _) in matched.items():
        if t.kind != "weight":
            continue
        f = finits[name].astype(np.float64)
        if f.shape != t.weight.shape:
            unmatched[t.key] = f"shape {list(t.weight.shape)} differs from the float weight's {list(f.shape)}"
            continue
        acc = _Acc()
        deq = (t.weight.astype(np.float64) - _broadcast(t.zero_point, t.axis, f.ndim)) * _broadcast(t.scale, t.axis, f.ndim)
        acc.add(f, deq, t)
        lo, hi, s, z = _range_of(t)
        results.append(TensorResult(name, "weight", t.producer, t.op_type, t.order, _db(acc.signal, acc.noise), _db(acc.signal, acc.own_noise), acc.clipped / max(acc.count, 1), (lo, hi), s, z, t.scale.ndim > 0 and t.scale.size > 1))

    acts = {name: t for name, (t, _) in matched.items() if t.kind == "activation"}
    input_names = get_pure_input_names(fmodel)
    if input_names != get_pure_input_names(qmodel):
        raise InvalidModelError(f"the models take different inputs: float {input_names}, INT8 {get_pure_input_names(qmodel)}")
    fsess = _session(fmodel, list(acts))
    qsess = _session(qmodel, [t.key for t in acts.values()])
    fouts = [o.name for o in fsess.get_outputs()]
    qouts = [o.name for o in qsess.get_outputs()]
    fidx = {n: fouts.index(n) for n in acts}
    qidx = {n: qouts.index(t.key) for n, t in acts.items()}
    accs = {n: _Acc() for n in acts}
    # model outputs with no quantizer of their own (a Linear head kept in float): compared too,
    # they are what the user reads
    produced = {o: n for n in qmodel.graph.node for o in n.output}
    order = {n.name: i for i, n in enumerate(qmodel.graph.node)}
    float_outputs = [o.name for o in qmodel.graph.output if o.name not in acts and o.name in fouts and produced.get(o.name) is not None and produced[o.name].op_type != "DequantizeLinear"]
    out_acc = {o: [0.0, 0.0] for o in float_outputs}
    stats = {n: TensorStatistics(histogram_bins) for n in acts}
    count = 0
    for i, sample in enumerate(_progress(samples, "comparing", quiet)):
        feeds = _feeds(sample, input_names, i)
        try:
            fo = fsess.run(None, feeds)
            qo = qsess.run(None, feeds)
        except Exception as exc:
            raise CalibrationError(f"onnxruntime failed on sample {i}: {' '.join(str(exc).split())[:300]}") from None
        for o in float_outputs:
            f, q = fo[fouts.index(o)].astype(np.float64), qo[qouts.index(o)].astype(np.float64)
            out_acc[o][0] += float(np.sum(f * f))
            out_acc[o][1] += float(np.sum((f - q) ** 2))
        for n, t in acts.items():
            f, q = fo[fidx[n]], qo[qidx[n]]
            if f.shape != q.shape:
                unmatched.setdefault(t.key, f"shape {list(q.shape)} differs from the float tensor's {list(f.shape)}")
                continue
            accs[n].add(f, q, t)
            try:
                stats[n].update(f)  # what Calibrator.collect_data does per tensor
            except NonFiniteError:
                raise CalibrationError(f"float tensor {n!r} holds NaN on sample {i}") from None
        count += 1
    if count == 0:
        raise CalibrationError("no samples: the data is empty")
    for n, t in acts.items():
        if t.key in unmatched:
            continue
        a = accs[n]
        lo, hi, s, z = _range_of(t)
        results.append(TensorResult(n, "activation", t.producer, t.op_type, t.order, _db(a.signal, a.noise), _db(a.signal, a.own_noise), a.clipped / max(a.count, 1), (lo, hi), s, z))

    for o, (signal, noise) in out_acc.items():
        node = produced[o]
        results.append(TensorResult(o, "output", node.name, node.op_type, order[node.name], _db(signal, noise), math.inf, 0.0, (math.nan, math.nan), math.nan, 0))
    report = QuantReport(fpath, qpath, count, results, layers_of(qmodel, results, qtensors), unmatched=unmatched)
    # Histograms for the tensors whose own quantization is worst: there the range choice matters
    # (the lowest end-to-end SQNR is mostly error carried in from earlier layers).
    for t in report.worst(top, own=True):
        report.statistics[t.name] = stats[t.name]
        report.method_ranges[t.name] = method_ranges(stats[t.name])
    return report


# ---- layers -------------------------------------------------------------------------------------


def layers_of(qmodel: onnx.ModelProto, results: list[TensorResult], qtensors: list[_QTensor]) -> list[LayerResult]:
    """SQNR lost at each node that produces a quantized activation, most lost first."""
    by_key = {t.key: t for t in qtensors}
    act = {r.name: r for r in results if r.kind == "activation"}
    weight = {r.name: r for r in results if r.kind == "weight"}
    name_of_key = {}
    for t in qtensors:
        pool = act if t.kind == "activation" else weight
        name_of_key[t.key] = next((c for c in t.candidates if c in pool), None)
    nodes = {n.name: n for n in qmodel.graph.node}
    layers = []
    for r in act.values():
        node = nodes.get(r.producer)
        if node is None:
            continue
        in_sqnr, w_sqnr = [], []
        for x in node.input:
            t = by_key.get(x)
            n = name_of_key.get(x)
            if t is None or n is None:
                continue
            (in_sqnr if t.kind == "activation" else w_sqnr).append((act if t.kind == "activation" else weight)[n].sqnr_db)
        worst_in = min(in_sqnr) if in_sqnr else None
        lost = None if worst_in is None or math.isinf(worst_in) and math.isinf(r.sqnr_db) else worst_in - r.sqnr_db
        layers.append(LayerResult(node.name, node.op_type, worst_in, r.sqnr_db, lost, min(w_sqnr) if w_sqnr else None, r.name))
    return sorted(layers, key=lambda layer: -(layer.lost_db if layer.lost_db is not None and not math.isnan(layer.lost_db) else -math.inf))


# ---- what each method would choose ----------------------------------------------------------------


def _estimated(stats: TensorStatistics, lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    """SQNR and clipped share of the histogram (bin centres) under the int8 parameters the
    quantizer derives from [lo, hi] (qmath.activation_params)."""
    centres = (stats.edges()[:-1] + stats.bin_width / 2).astype(np.float64)
    c = stats.counts.astype(np.float64)
    p = qmath.activation_params(lo, hi, symmetric=symmetric)
    s, z = float(p.scale), float(p.zero_point)
    q = np.rint(centres / s) + z
    deq = (np.clip(q, p.qtype.qmin, p.qtype.qmax) - z) * s
    signal = float(np.sum(c * centres**2))
    noise = float(np.sum(c * (centres - deq) ** 2))
    clipped = float(np.sum(c[(q < p.qtype.qmin) | (q > p.qtype.qmax)])) / max(float(c.sum()), 1.0)
    return _db(signal, noise), clipped


def method_ranges(stats: TensorStatistics, methods: Sequence[str] = METHODS) -> list[MethodRange]:
    out = []
    for m in methods:
        for symmetric in (False, True):
            lo, hi = select_range(stats, m, symmetric)
            sqnr, clipped = _estimated(stats, lo, hi, symmetric)
            out.append(MethodRange(f"{m}{'_sym' if symmetric else ''}", (float(lo), float(hi)), sqnr, clipped))
    return out
