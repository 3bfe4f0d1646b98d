"""npu.check: node by node, what of a quantized QDQ model runs on the NPU and what falls back.

Each op (QuantizeLinear / DequantizeLinear are the int8 boundaries, not ops) lands in one row:

* npu                     -- the target runs it and it is a complete int8 node unit
* unsupported op          -- the target does not run this op type
* attribute out of range  -- the target runs the op, but not with these attributes / shapes
* unfusable QDQ pattern   -- e.g. a Relu left between a Conv and its QuantizeLinear where the
                             target cannot fuse Conv + Relu
* not quantized           -- an activation input is not a DequantizeLinear output, or the
                             output does not go (only) to QuantizeLinear
* shape/constant          -- no activation data (shape arithmetic, constants); not counted

The target's rules come from its declarative description (npu/targets/*.yaml), the same one
the quantizer uses to decide what to quantize.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx
import onnx_ir as ir

from .target import Target, load_target
from .units import Category, QDQModel


@dataclass
class NodeRow:
    node: str
    op_type: str
    placement: str  # "npu" | "host" | "-"
    category: str
    reason: str = ""
    fused_into: str | None = None


@dataclass
class CheckReport:
    target: str
    rows: list[NodeRow] = field(default_factory=list)

    @property
    def npu_nodes(self) -> list[NodeRow]:
        return [r for r in self.rows if r.placement == "npu"]

    @property
    def host_nodes(self) -> list[NodeRow]:
        return [r for r in self.rows if r.placement == "host"]

    def summary(self) -> dict:
        by_category = Counter(r.category for r in self.host_nodes)
        return {
            "npu": len(self.npu_nodes),
            "host": len(self.host_nodes),
            "shape_or_constant": sum(r.category == str(Category.SHAPE) for r in self.rows),
            "host_by_reason": dict(sorted(by_category.items())),
        }

    def to_dict(self) -> dict:
        return {"target": self.target, "summary": self.summary(), "nodes": [asdict(r) for r in self.rows]}

    def headline(self) -> str:
        s = self.summary()
        total = s["npu"] + s["host"]
        why = ", ".join(f"{n} {c}" for c, n in s["host_by_reason"].items())
        line = f"target {self.target}: {s['npu']} of {total} ops run on the NPU, {s['host']} on the host"
        return line + (f" ({why})" if why else "")

    def to_text(self, *, show_shape: bool = False) -> str:
        rows = [r for r in self.rows if show_shape or r.placement != "-"]
        header = ("node", "op", "runs on", "reason")
        cells = [(r.node, r.op_type, r.placement, _why(r)) for r in rows]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header[:3])]
        lines = [self.headline(), ""]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines.append(fmt.format(*header).rstrip())
        lines.append(fmt.format(*("-" * w for w in widths), "-" * 6))
        lines += [fmt.format(*c).rstrip() for c in cells]
        hidden = len(self.rows) - len(rows)
        if hidden:
            lines.append(f"({hidden} shape/constant nodes not shown)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _why(r: NodeRow) -> str:
    if r.placement == "npu":
        return f"fused into {r.fused_into}" if r.fused_into else ""
    return f"{r.category}: {r.reason}" if r.reason else r.category


def _target_verdict(target: Target | None, node: ir.Node) -> tuple[Category, str]:
    if target is None:
        return Category.NPU, ""
    ok, why = target.supports(node)
    if ok:
        return Category.NPU, ""
    listed = node.domain in ("", "ai.onnx") and node.op_type in target.description.ops
    return (Category.ATTRIBUTE if listed else Category.UNSUPPORTED_OP), why


def classify(qm: QDQModel, target: Target | None) -> tuple[list[NodeRow], dict[str, object]]:
    """Rows for every op, and the int8 units (by head node name) that run on the NPU."""
    rows: dict[str, NodeRow] = {}
    units: dict[str, object] = {}
    fusions = target.fusions if target is not None else None
    for node in qm.nodes:
        if qm.is_boundary(node) or node.op_type == "Constant" or node.name in rows:
            continue
        if not qm.is_data_node(node):
            rows[node.name] = NodeRow(node.name, node.op_type, "-", str(Category.SHAPE))
            continue
        category, why = _target_verdict(target, node)
        if category is not Category.NPU:
            rows[node.name] = NodeRow(node.name, node.op_type, "host", str(category), why)
            continue
        u = qm.unit(node, fusions)
        members = [m for m in (u.bias_add, u.activation) if m is not None]
        if u.ok:
            for m in members:  # a fused member must itself be an op the target runs
                m_category, m_why = _target_verdict(target, m)
                if m_category is not Category.NPU:
                    u.category, u.reason = m_category, f"fused {m.op_type} {m.name!r}: {m_why}"
        if not u.ok:
            rows[node.name] = NodeRow(node.name, node.op_type, "host", str(u.category), u.reason)
            if u.category is Category.UNFUSABLE and u.activation is not None:
                a = u.activation
                rows[a.name] = NodeRow(a.name, a.op_type, "host", str(u.category), u.reason)
            continue
        rows[node.name] = NodeRow(node.name, node.op_type, "npu", str(Category.NPU))
        for m in members:
            rows[m.name] = NodeRow(m.name, m.op_type, "npu", str(Category.NPU), fused_into=node.name)
        units[node.name] = u
    ordered = [rows[n.name] for n in qm.nodes if n.name in rows]
    return ordered, units


def check(model: onnx.ModelProto | ir.Model | str | os.PathLike, target: str | Target | None = "warboy") -> CheckReport:
    """What runs on the NPU and what falls back to the host, node by node, and why.

    `target`: a bundled target name ('warboy', 'tflite'), a description .yaml path, a Target, or
    None (every op and fusion accepted: only the QDQ structure is checked).
    """
    tgt = load_target(target) if target is not None else None
    qm = QDQModel(model)
    rows, _ = classify(qm, tgt)
    return CheckReport(tgt.name if tgt is not None else "any", rows)
