"""method: auto -- per tensor, the calibration method whose range best preserves its consumers.

For every activation tensor T that gets a range of its own, each of the ten methods (five
methods x symmetric / asymmetric) proposes a range from T's statistics; identical proposals are
merged. Each candidate is judged on the calibration data (the first `samples` samples) by what
it does to the nodes that read T: the consumers run in onnxruntime on the float values of their
other inputs with T fake-quantized by the candidate, and the score is

    sum over consumer outputs o of  |o(T_q) - o(T)|^2 / |o(T)|^2      (relative squared error)

A graph output counts as its own consumer. The candidate with the lowest score wins; ties go to
the earlier of min_max, percentile, mse, entropy, sqnr (asymmetric first). Tensors whose
parameters are fixed by the spec (Softmax / Sigmoid / Tanh outputs) or passed through from
their input (MaxPool, Reshape, ...) are not scored: their own range is never used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from .. import qmath, spec
from ..statistics import MASK_MAGNITUDE
from .graph import session, tensors_on, to_proto

CANDIDATES = [(m, sym) for m in ("min_max", "percentile", "mse", "entropy", "sqnr") for sym in (False, True)]


@dataclass
class AutoChoice:
    ranges: dict[str, tuple[float, float]]
    chosen: dict[str, str] = field(default_factory=dict)  # tensor -> "mse_asym", ...
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        counts: dict[str, int] = {}
        for c in self.chosen.values():
            counts[c] = counts.get(c, 0) + 1
        return {"chosen": dict(sorted(self.chosen.items())), "counts": dict(sorted(counts.items()))}


def _label(method: str, symmetric: bool) -> str:
    return f"{method}_{'sym' if symmetric else 'asym'}"


def _own_range_tensors(model: ir.Model, names) -> list[str]:
    """Tensors whose range the planner may use as their own."""
    out = []
    producers = {o.name: n for n in model.graph for o in n.outputs if o is not None}
    for name in names:
        node = producers.get(name)
        if node is not None:
            rule = spec.rule_for(node.op_type)
            if rule.output is spec.OutputScale.FIXED or rule.output is spec.OutputScale.NONE:
                continue
            if rule.output is spec.OutputScale.SAME_AS_INPUT and not rule.all_inputs_share_scale:
                continue
        out.append(name)
    return out


def consumer_model(model: onnx.ModelProto, tensor: str, types: dict[str, int]) -> tuple[onnx.ModelProto, list[str]] | None:
    """The nodes reading `tensor` as a model of their own: (model, its other activation inputs).

    A reader whose output only feeds a Relu / Clip (absorbed into it when quantized) is judged
    after that activation: errors the clamp removes do not count."""
    inits = {t.name: t for t in model.graph.initializer}
    const_nodes = {o: n for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    uses: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    readers = [n for n in uses.get(tensor, []) if n.op_type not in spec.SHAPE_OPS]
    readers = list({id(n): n for n in readers}.values())
    is_output = tensor in graph_outputs
    if not readers and not is_output:
        return None
    nodes, outputs = [], []
    for n in readers:
        nodes.append(n)
        for o in n.output:
            after = uses.get(o, [])
            if o and len(after) == 1 and after[0].op_type in spec.ACTIVATIONS_THAT_FUSE and o not in graph_outputs and after[0] not in readers:
                nodes.append(after[0])
                outputs.append(after[0].output[0])
            elif o:
                outputs.append(o)
    produced = {o for n in nodes for o in n.output}  # a reader may read another reader's output (x * sigmoid(x))
    used_inits, inputs, consts = {}, [tensor], []
    for n in nodes:
        for i in n.input:
            if not i or i == tensor or i in inputs or i in produced:
                continue
            if i in inits:
                used_inits[i] = inits[i]
            elif i in const_nodes:
                if const_nodes[i] not in consts:
                    consts.append(const_nodes[i])
            else:
                inputs.append(i)
    nodes = consts + nodes
    if is_output:
        nodes.append(onnx.helper.make_node("Identity", [tensor], [f"{tensor}__self"]))
        outputs.append(f"{tensor}__self")
    graph = onnx.helper.make_graph(
        nodes,
        "consumers",
        [onnx.helper.make_tensor_value_info(i, types.get(i, onnx.TensorProto.FLOAT), None) for i in inputs],
        [onnx.helper.make_tensor_value_info(o, types.get(o, onnx.TensorProto.FLOAT), None) for o in outputs],
        list(used_inits.values()),
    )
    m = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return m, inputs[1:]


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def choose(prepared, *, percentile: float, sqnr_gamma: float, fixed: Callable[[str], tuple[str, bool]] | None = None, samples: int | None = None) -> AutoChoice:
    """Ranges for every tensor of `prepared.statistics`; `fixed(t)` -> (method, symmetric) keeps a
    tensor's configured method unless it says "auto"."""
    stats = prepared.statistics
    kw = {"percentile": percentile, "sqnr_gamma": sqnr_gamma}
    proto = to_proto(prepared.model)
    names = [n for n, st in stats.stats.items() if not st.empty]
    result = AutoChoice({})
    todo = []
    for name in names:
        m, sym = fixed(name) if fixed is not None else ("auto", False)
        if m != "auto":
            result.ranges[name] = stats.range_of(name, m, sym, **kw)
        else:
            todo.append(name)
    scored = set(_own_range_tensors(prepared.model, todo))
    for name in todo:
        if name not in scored:  # its own range is never used: any method will do
            result.ranges[name] = stats.range_of(name, "mse", False, **kw)
    candidates: dict[str, list[tuple[str, tuple[float, float]]]] = {}
    for name in scored:
        seen: dict[tuple[float, float], str] = {}
        for m, sym in CANDIDATES:
            r = stats.range_of(name, m, sym, **kw)
            seen.setdefault(r, _label(m, sym))
        candidates[name] = [(label, r) for r, label in seen.items()]
    single = [n for n in scored if len(candidates[n]) == 1]
    for name in single:
        result.chosen[name], result.ranges[name] = candidates[name][0]
    multi = [n for n in scored if len(candidates[n]) > 1]
    if multi:
        _score(proto, prepared.feeds[: samples or prepared.options.auto_samples], multi, candidates, result)
    return result


def _score(proto: onnx.ModelProto, feeds, names: list[str], candidates, result: AutoChoice) -> None:
    types = _types(proto)
    subs = {}
    for name in names:
        built = consumer_model(proto, name, types)
        if built is not None:
            subs[name] = (session(built[0]), built[1])
    need = set(subs)
    for _, others in subs.values():
        need.update(others)
    num = {n: np.zeros(len(candidates[n])) for n in subs}
    den = {n: np.zeros(1) for n in subs}
    params = {n: [_params(r) for _, r in candidates[n]] for n in subs}
    for values in tensors_on(proto, feeds, sorted(need), types):
        for name, (sess, others) in subs.items():
            feeds_c = {o: values[o] for o in others}
            x = values[name]
            ref = sess.run(None, {name: x, **feeds_c})
            real = [np.abs(r) < MASK_MAGNITUDE for r in ref]  # mask values (padding) are not compared
            den[name] += sum(float(np.sum(np.square(r[k], dtype=np.float64))) for r, k in zip(ref, real))
            for k, p in enumerate(params[name]):
                xq = x if p is None else np.asarray(qmath.fake_quantize(x, p), dtype=x.dtype).reshape(x.shape)
                out = sess.run(None, {name: xq, **feeds_c})
                num[name][k] += sum(float(np.sum(np.square(o[m].astype(np.float64) - r[m]))) for o, r, m in zip(out, ref, real))
    for name in names:
        if name not in subs:
            result.chosen[name], result.ranges[name] = candidates[name][0]
            continue
        scores = num[name] / max(float(den[name][0]), 1e-30)
        best = int(np.argmin(scores))
        result.chosen[name], result.ranges[name] = candidates[name][best]
        result.scores[name] = {label: float(s) for (label, _), s in zip(candidates[name], scores)}


def _params(r: tuple[float, float]) -> qmath.QuantParams | None:
    lo, hi = r
    if lo == hi:
        return None
    return qmath.activation_params(lo, hi, symmetric=lo < 0 and lo == -hi)
