"""npu.simulate: run a quantized QDQ model with integers only, as the chip would.

Every node unit that runs on the NPU ("DequantizeLinear inputs -> op -> QuantizeLinear", see
npu.units and npu.check) is one integer kernel (npu.kernels): int8 in, int32 accumulation,
TFLite fixed-point requantization, int8 out. Only ops that fall back to the host run in float,
between their DequantizeLinear and QuantizeLinear, exactly as ONNX defines those two
(npu.units.QParams); a DequantizeLinear -> QuantizeLinear pair with new parameters is an
integer requantization. Host ops, and the int8 data-movement ops, are evaluated with
onnx.reference (the ONNX reference implementation), so no op semantics are re-invented here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from onnx_backend.errors import TorchqError

from .check import classify
from .fixed_point import ROUNDINGS
from .kernels import NoKernel, build_kernel, requantize
from .target import Target, load_target
from .units import QDQModel

Lookup = Callable[[str], np.ndarray]


class SimulationError(TorchqError):
    pass


@dataclass
class Step:
    kind: str  # "int8" | "host" | "quantize" | "dequantize" | "requantize"
    node: str  # the node (unit head) it executes
    op_type: str
    inputs: list[str]
    outputs: list[str]
    run: Callable[[Lookup], list[np.ndarray]]
    detail: str = ""


class Simulator:
    """Compile once (`Simulator(model)`), run many times (`.run(feeds)`)."""

    def __init__(self, model: onnx.ModelProto | ir.Model | str | os.PathLike, target: str | Target | None = "warboy", *, rounding: str = "single"):
        if rounding not in ROUNDINGS:
            raise SimulationError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
        self.rounding = rounding
        self.qm = QDQModel(model)
        self.target = load_target(target) if target is not None else None
        self.opsets = {(imp.domain or ""): imp.version for imp in self.qm.proto.opset_import}
        self._evaluators: dict[int, ReferenceEvaluator] = {}
        self.constants = {name: v.const_value.numpy() for name, v in self.qm.graph.initializers.items() if v.const_value is not None}
        self.input_names = [v.name for v in self.qm.graph.inputs if v.name not in self.constants]
        self.output_names = [v.name for v in self.qm.graph.outputs]
        self.placement: dict[str, tuple[str, str]] = {}  # node -> ("int8" | "host" | "shape", detail)
        self.steps: list[Step] = []
        self._compile()

    # ---- host evaluation -------------------------------------------------------------------------

    def _evaluator(self, node: ir.Node) -> ReferenceEvaluator:
        ev = self._evaluators.get(id(node))
        if ev is None:
            proto = ir.serde.serialize_node(node)
            # A one-node model, not the bare node: onnx.reference expands function ops (Gelu at
            # opset 20, ...) only when it has a model around them.
            graph = onnx.helper.make_graph(
                [proto],
                "host_op",
                [onnx.helper.make_empty_tensor_value_info(i) for i in proto.input if i],
                [onnx.helper.make_empty_tensor_value_info(o) for o in proto.output if o],
            )
            wrapped = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in self.opsets.items()])
            try:
                ev = ReferenceEvaluator(wrapped)
            except Exception as exc:
                raise SimulationError(f"node {node.name!r} ({node.domain or 'ai.onnx'}::{node.op_type}): cannot be evaluated on the host: {exc}") from None
            self._evaluators[id(node)] = ev
        return ev

    def host_eval(self, node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """Run one ONNX node with onnx.reference on the given input arrays."""
        feeds = {}
        for v, a in zip(node.inputs, inputs):
            if v is not None and v.name and a is not None:
                feeds[v.name] = a
        try:
            outs = self._evaluator(node).run(None, feeds)
        except SimulationError:
            raise
        except Exception as exc:
            raise SimulationError(f"node {node.name!r} ({node.op_type}) failed on the host: {type(exc).__name__}: {exc}") from None
        return list(outs)

    # ---- compile ---------------------------------------------------------------------------------

    def _compile(self) -> None:
        qm = self.qm
        rows, units = classify(qm, self.target)
        why_host = {r.node: f"{r.category}: {r.reason}" if r.reason else r.category for r in rows}
        handled_q: set[str] = set()
        claimed: set[str] = set()
        for node in qm.nodes:
            if node.name in claimed:
                continue
            if qm.is_boundary(node):
                if node.op_type == "QuantizeLinear" and node.name in handled_q:
                    continue
                self.steps.append(self._boundary_step(node))
                continue
            unit = units.get(node.name)
            if unit is not None:
                try:
                    kernel = build_kernel(qm, unit, self.host_eval, self.rounding)
                except NoKernel as exc:
                    why_host[node.name] = f"no integer kernel: {exc}"
                else:
                    names = [m.name for m in unit.members]
                    claimed.update(names)
                    handled_q.update(q.name for qs in unit.q_outputs.values() for q in qs)
                    for m in names:
                        self.placement[m] = ("int8", kernel.kind)
                    sources = [dq.inputs[0].name for dq in unit.dq_inputs.values() if not qm.is_const(dq.inputs[0])]
                    self.steps.append(Step("int8", node.name, node.op_type, sources, kernel.outputs, kernel.run, kernel.kind))
                    continue
            data = qm.is_data_node(node)
            self.placement[node.name] = ("host", why_host.get(node.name, "")) if data else ("shape", "shape/constant")
            self.steps.append(self._host_step(node, "host" if data else "shape"))
        self._prune_dequantize()

    def _host_step(self, node: ir.Node, kind: str) -> Step:
        ins = [v.name if v is not None else None for v in node.inputs]
        outs = [v.name for v in node.outputs]

        def run(lookup):
            return self.host_eval(node, [lookup(n) if n else None for n in ins])

        return Step(kind, node.name, node.op_type, [n for n in ins if n], outs, run)

    def _boundary_step(self, node: ir.Node) -> Step:
        qm = self.qm
        p = qm.qparams(node)
        src = node.inputs[0].name
        out = node.outputs[0].name
        if node.op_type == "DequantizeLinear":
            return Step("dequantize", node.name, node.op_type, [src], [out], lambda lookup: [p.dequantize(lookup(src))])
        dq = qm.dq_of(node.inputs[0])
        if dq is not None:  # DequantizeLinear -> QuantizeLinear: an integer requantization
            src_params, src_name = qm.qparams(dq), dq.inputs[0].name
            if src_params.axis is None or src_params.scale.size == 1:
                self.placement[node.name] = ("int8", "requantize")
                return Step("requantize", node.name, node.op_type, [src_name], [out], lambda lookup: [requantize(lookup(src_name), src_params, p, self.rounding)])
        return Step("quantize", node.name, node.op_type, [src], [out], lambda lookup: [p.quantize(lookup(src))])

    def _prune_dequantize(self) -> None:
        """Drop DequantizeLinear steps whose float output nothing reads (int8 kernels read the
        integers behind them)."""
        needed = set(self.output_names)
        for s in self.steps:
            if s.kind in ("host", "shape", "quantize"):
                needed.update(s.inputs)
        self.steps = [s for s in self.steps if s.kind != "dequantize" or s.outputs[0] in needed]

    # ---- run ---------------------------------------------------------------------------------------

    def _feeds(self, feeds) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            feeds = list(feeds) if not isinstance(feeds, np.ndarray) else [feeds]
            if len(feeds) != len(self.input_names):
                raise SimulationError(f"the model takes {len(self.input_names)} inputs {self.input_names}, got {len(feeds)} arrays")
            feeds = dict(zip(self.input_names, feeds))
        missing = [n for n in self.input_names if n not in feeds]
        unknown = [n for n in feeds if n not in self.input_names]
        if missing or unknown:
            raise SimulationError(f"feeds must name the model inputs {self.input_names}; missing {missing}, unknown {unknown}")
        out = {}
        for v in self.qm.graph.inputs:
            if v.name in feeds:
                a = np.asarray(feeds[v.name])
                _check_shape(v, a)
                dt = self.qm.dtype(v)
                out[v.name] = a.astype(dt) if dt is not None and a.dtype != dt else a
        return out

    def run_all(self, feeds, forced: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every tensor the simulation computes (int8 for quantized tensors, float on the host).

        `forced`: tensors to read instead of the simulated ones (compare's local mode feeds each
        kernel onnxruntime's inputs, so a difference is attributed to the node that makes it)."""
        env: dict[str, np.ndarray] = dict(self.constants)
        env.update(self._feeds(feeds))
        if forced:
            def lookup(name):
                return forced[name] if name in forced else env[name]
        else:
            lookup = env.__getitem__
        for step in self.steps:
            try:
                values = step.run(lookup)
            except (SimulationError, NoKernel):
                raise
            except KeyError as exc:
                raise SimulationError(f"node {step.node!r}: tensor {exc} was never computed") from None
            env.update(zip(step.outputs, values))
        return env

    def run(self, feeds) -> list[np.ndarray]:
        env = self.run_all(feeds)
        return [env[n] for n in self.output_names]

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for kind, _ in self.placement.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        host = {n: d for n, (k, d) in self.placement.items() if k == "host"}
        return {"target": self.target.name if self.target else "any", "nodes": kinds, "host_nodes": host}


def _check_shape(v: ir.Value, a: np.ndarray) -> None:
    if v.shape is None:
        return
    want = [d if isinstance(d, int) else None for d in v.shape]
    if len(want) != a.ndim or any(w is not None and w != n for w, n in zip(want, a.shape)):
        shown = ["?" if w is None else w for w in want]
        raise SimulationError(f"input {v.name!r}: got shape {list(a.shape)}, the model takes {shown}")


def simulate(model, feeds, target: str | Target | None = "warboy", *, rounding: str = "single") -> list[np.ndarray]:
    """Outputs of `model` on `feeds` (a dict by input name, or arrays in input order), computed
    with integers only where the target runs the op, in float on the host elsewhere.

    The outputs are what onnxruntime would return (the model's final DequantizeLinear outputs,
    float32); `Simulator(model).run_all(feeds)` also gives every int8 tensor.
    """
    return Simulator(model, target, rounding=rounding).run(feeds)
