"""npu.compare: the integer simulator against onnxruntime, tensor by tensor.

onnxruntime runs the model with every quantized tensor (each QuantizeLinear output) exposed as
an extra output; the simulator runs it with integers. For each quantized tensor the report
gives the share of identical int8 values and the largest difference in quantization steps,
twice:

* end to end -- both sides run the whole model, so differences accumulate downstream;
* local -- each simulated node is fed onnxruntime's own inputs, so a difference there was made
  by that node (its arithmetic differs), not inherited.

The first divergent tensor (in graph order) is the first that breaks the agreement criterion
(>= 99.9 % identical and no value more than one step apart); the first locally divergent one
names a node whose own arithmetic differs. The model's outputs are compared end to end from a
separate, unmodified onnxruntime session (exposing tensors changes which nodes onnxruntime
fuses, and with it where its float arithmetic rounds).

In a deep network one near-tie rounded differently early on (onnxruntime computes in float32,
so it misrounds values within ~1e-5 of a tie) spreads through every later layer: on ResNet-18
onnxruntime with all optimizations and with none agree on only ~89 % of the int8 logits. The
local columns are the check of the arithmetic; the end-to-end ones show the accumulation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnx_backend.sessions import LEVELS, open_session

from .simulate import SimulationError, Simulator
from .target import Target

MIN_IDENTICAL = 0.999  # share of identical values an agreeing tensor needs
MAX_STEPS = 1  # largest difference, in quantization steps, an agreeing tensor may have
FLOAT_RTOL = 1e-5  # float outputs of host ops: equal within this share of their largest value


@dataclass
class TensorComparison:
    tensor: str
    node: str  # the node (unit head) that produces it in the simulator
    op_type: str
    runs: str  # int8 | host | requantize | quantize
    elements: int = 0
    identical: int = 0
    max_steps: int = 0
    local_identical: int = 0
    local_max_steps: int = 0
    output: str | None = None  # the graph output this tensor is, if any
    # a float model output (made by a host op): no quantization step, so "identical" means
    # equal within FLOAT_RTOL of the output's magnitude, and max_abs_diff is kept instead
    is_float: bool = False
    max_abs_diff: float = 0.0

    @property
    def share(self) -> float:
        return self.identical / self.elements if self.elements else 1.0

    @property
    def local_share(self) -> float:
        return self.local_identical / self.elements if self.elements else 1.0

    @property
    def agrees(self) -> bool:
        return self.share >= MIN_IDENTICAL and self.max_steps <= MAX_STEPS

    @property
    def local_agrees(self) -> bool:
        return self.local_share >= MIN_IDENTICAL and self.local_max_steps <= MAX_STEPS

    def add(self, ort_q: np.ndarray, sim_q: np.ndarray, ort_local_q: np.ndarray, local_q: np.ndarray) -> None:
        a = np.asarray(ort_q, np.int64)
        d = np.abs(a - np.asarray(sim_q, np.int64))
        dl = np.abs(np.asarray(ort_local_q, np.int64) - np.asarray(local_q, np.int64))
        self.elements += a.size
        self.identical += int(np.count_nonzero(d == 0))
        self.local_identical += int(np.count_nonzero(dl == 0))
        self.max_steps = max(self.max_steps, int(d.max(initial=0)))
        self.local_max_steps = max(self.local_max_steps, int(dl.max(initial=0)))

    def add_float(self, ref: np.ndarray, sim: np.ndarray, ref_local: np.ndarray, local: np.ndarray) -> None:
        ref, ref_local = np.asarray(ref, np.float64), np.asarray(ref_local, np.float64)
        d = np.abs(ref - np.asarray(sim, np.float64))
        dl = np.abs(ref_local - np.asarray(local, np.float64))
        tol = FLOAT_RTOL * max(float(np.max(np.abs(ref), initial=0.0)), np.finfo(np.float32).tiny)
        self.elements += ref.size
        self.identical += int(np.count_nonzero(d <= tol))
        self.local_identical += int(np.count_nonzero(dl <= tol))
        self.max_abs_diff = max(self.max_abs_diff, float(d.max(initial=0.0)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(identical_share=round(self.share, 6), local_identical_share=round(self.local_share, 6), agrees=self.agrees)
        return d


@dataclass
class CompareReport:
    target: str
    rounding: str
    ort_optimization: str = "all"
    samples: int = 0
    tensors: list[TensorComparison] = field(default_factory=list)

    @property
    def outputs(self) -> list[TensorComparison]:
        return [t for t in self.tensors if t.output is not None]

    @property
    def agrees(self) -> bool:
        """The model's outputs meet the criterion (>= 99.9 % identical, <= 1 step)."""
        return all(t.agrees for t in self.outputs)

    @property
    def locally_agrees(self) -> bool:
        """Every node, fed onnxruntime's inputs, meets the criterion: the arithmetic matches."""
        return all(t.local_agrees for t in self.tensors)

    @property
    def first_divergent(self) -> TensorComparison | None:
        return next((t for t in self.tensors if not t.agrees), None)

    @property
    def first_local_divergent(self) -> TensorComparison | None:
        return next((t for t in self.tensors if not t.local_agrees), None)

    @property
    def first_difference(self) -> TensorComparison | None:
        return next((t for t in self.tensors if t.identical < t.elements), None)

    def to_dict(self) -> dict:
        def name(t):
            return None if t is None else {"tensor": t.tensor, "node": t.node, "op_type": t.op_type}

        return {
            "target": self.target,
            "rounding": self.rounding,
            "samples": self.samples,
            "criterion": {"min_identical_share": MIN_IDENTICAL, "max_steps": MAX_STEPS},
            "ort_optimization": self.ort_optimization,
            "agrees": self.agrees,
            "locally_agrees": self.locally_agrees,
            "first_divergent": name(self.first_divergent),
            "first_local_divergent": name(self.first_local_divergent),
            "first_difference": name(self.first_difference),
            "tensors": [t.to_dict() for t in self.tensors],
        }

    def to_text(self, *, show_all: bool = False) -> str:
        lines = [f"simulator (target {self.target}, {self.rounding} rounding) vs onnxruntime (optimization {self.ort_optimization}), {self.samples} sample(s)"]
        for t in self.outputs:
            diff = f"max |diff| {t.max_abs_diff:.3g} (float, from the host)" if t.is_float else f"max {t.max_steps} step(s)"
            lines.append(f"  output {t.output}: {_pct(t.share)} identical, {diff} -> {'agrees' if t.agrees else 'DIVERGES'}")
        fd, fl = self.first_divergent, self.first_local_divergent
        lines.append(f"  first divergent tensor: {_where(fd)}" if fd else "  every quantized tensor agrees (>= 99.9 % identical, <= 1 step)")
        if fl is not None:
            lines.append(f"  first node whose own arithmetic diverges (fed onnxruntime's inputs): {_where(fl, local=True)}")
        else:
            lines.append("  every node's own arithmetic agrees (fed onnxruntime's inputs)")
        rows = [t for t in self.tensors if show_all or t.output is not None or t.identical < t.elements or t.local_identical < t.elements]
        if rows:
            header = ("tensor", "node", "op", "runs", "elements", "identical", "max", "local identical", "local max")
            cells = [
                (t.tensor, t.node, t.op_type, t.runs, str(t.elements), _pct(t.share), f"{t.max_abs_diff:.2g}" if t.is_float else str(t.max_steps), _pct(t.local_share), "-" if t.is_float else str(t.local_max_steps))
                for t in rows
            ]
            widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            lines += ["", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
            lines += [fmt.format(*c).rstrip() for c in cells]
        hidden = len(self.tensors) - len(rows)
        if hidden:
            lines.append(f"({hidden} more quantized tensors identical everywhere; --all shows them)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _pct(share: float) -> str:
    """A share as a percentage that never shows 100 % unless every value is identical."""
    return "100 %" if share >= 1 else f"{np.floor(share * 1e5) / 1e3:.3f} %"


def _where(t: TensorComparison, local: bool = False) -> str:
    share, steps = (t.local_share, t.local_max_steps) if local else (t.share, t.max_steps)
    return f"{t.tensor!r} from {t.op_type} {t.node!r} ({t.runs}): {_pct(share)} identical, max {steps} step(s)"


OPTIMIZATION_LEVELS = LEVELS  # onnxruntime's graph optimization levels, by name


def _session(model: onnx.ModelProto, optimization: str) -> ort.InferenceSession:
    return open_session(model, level=optimization)


class Comparator:
    """Builds the simulator and both onnxruntime sessions once; `add(feeds)` per sample."""

    def __init__(self, model, target: str | Target | None = "warboy", *, rounding: str = "single", ort_optimization: str = "all"):
        if ort_optimization not in OPTIMIZATION_LEVELS:
            raise SimulationError(f"ort_optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {ort_optimization!r}")
        self.sim = Simulator(model, target, rounding=rounding)
        proto = self.sim.qm.proto
        qm = self.sim.qm
        producer = {}
        for s in self.sim.steps:
            for o in s.outputs:
                producer[o] = s
        outputs = {v.name for v in qm.graph.outputs}
        # the quantized tensors, in graph order (every QuantizeLinear output)
        self.quantized = [n.outputs[0].name for n in qm.nodes if qm.is_q(n)]
        # which graph output each quantized tensor is (through its final DequantizeLinear)
        self.output_of = {}
        for v in qm.graph.outputs:
            dq = qm.dq_of(v)
            src = dq.inputs[0].name if dq is not None else v.name
            if src in self.quantized:
                self.output_of[src] = v.name
        exposed = onnx.ModelProto()
        exposed.CopyFrom(proto)
        for name in self.quantized:
            if name not in outputs:
                exposed.graph.output.append(onnx.ValueInfoProto(name=name))
        self.plain = _session(proto, ort_optimization)
        self.exposed = _session(exposed, ort_optimization)
        self.report = CompareReport(self.sim.target.name if self.sim.target else "any", rounding, ort_optimization)
        for name in self.quantized:
            s = producer[name]
            node, op, runs = s.node, s.op_type, s.kind
            if s.kind == "quantize":  # a float tensor quantized: name the host op that made it
                src = producer.get(s.inputs[0])
                node, op, runs = (src.node, src.op_type, src.kind) if src is not None else ("(model input)", "QuantizeLinear", "quantize")
            self.report.tensors.append(TensorComparison(name, node, op, runs, output=self.output_of.get(name)))
        for v in qm.graph.outputs:  # float outputs of host ops
            if v.name not in self.output_of.values() and v.name in producer:
                s = producer[v.name]
                self.report.tensors.append(TensorComparison(v.name, s.node, s.op_type, s.kind, output=v.name, is_float=True))
        self._q_params = {n.outputs[0].name: qm.qparams(n) for n in qm.nodes if qm.is_q(n)}

    def add(self, feeds) -> None:
        feeds = self.sim._feeds(feeds)
        plain = dict(zip([o.name for o in self.plain.get_outputs()], self.plain.run(None, feeds)))
        exposed = dict(zip([o.name for o in self.exposed.get_outputs()], self.exposed.run(None, feeds)))
        sim = self.sim.run_all(feeds)
        forced = {n: exposed[n] for n in self.quantized}
        local = self.sim.run_all(feeds, forced=forced)
        for t in self.report.tensors:
            if t.is_float:
                t.add_float(plain[t.tensor], sim[t.tensor], exposed[t.tensor], local[t.tensor])
                continue
            ort_q = exposed[t.tensor]
            if t.output is not None:  # the model's own output, end to end from the unmodified session
                t.add(self._requantize_output(t, plain[t.output]), sim[t.tensor], ort_q, local[t.tensor])
            else:
                t.add(ort_q, sim[t.tensor], ort_q, local[t.tensor])
        self.report.samples += 1

    def _requantize_output(self, t: TensorComparison, y: np.ndarray) -> np.ndarray:
        """The int8 values behind a dequantized output (exact: q = y / scale + zero point)."""
        if y.dtype.kind in "iu":
            return y
        return self._q_params[t.tensor].quantize(y)


def compare(
    model: onnx.ModelProto | str | os.PathLike, feeds: Mapping | list, target: str | Target | None = "warboy", *, rounding: str = "single", ort_optimization: str = "all"
) -> CompareReport:
    """Compare the integer simulation with onnxruntime on one sample, tensor by tensor.

    `feeds`: one sample (a dict by input name, or arrays in input order) or a list of such
    samples (the counts add up)."""
    c = Comparator(model, target, rounding=rounding, ort_optimization=ort_optimization)
    samples = feeds if isinstance(feeds, list) and feeds and isinstance(feeds[0], (Mapping, list, tuple)) else [feeds]
    for f in samples:
        c.add(f)
    return c.report
