"""The PyTorch -> ONNX binding contract: `torchq::Mark` identity nodes.

At export, every observed PyTorch tensor passes through `Mark(x, key=<observer key>)` in the
custom domain `torchq`. The backend reads the markers, removes them, and so knows exactly which
ONNX tensor each statistic describes, whatever the exporter renamed, decomposed or fused.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx.defs import OpSchema

DOMAIN = "torchq"
OP_TYPE = "Mark"
VERSION = 1


def register_schema() -> None:
    """Register the marker op with onnx (once) so checkers and onnxscript accept it."""
    try:
        onnx.defs.get_schema(OP_TYPE, VERSION, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    float_types = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        doc="Identity that tags a tensor with the key of the torchq observer that describes it.",
        inputs=[OpSchema.FormalParameter("x", "T")],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", float_types, "float tensors")],
        attributes=[OpSchema.Attribute("key", OpSchema.AttrType.STRING, "observer key")],
    )
    onnx.defs.register_schema(schema)


register_schema()


def is_marker(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def strip_markers(model: ir.Model) -> dict[str, list[str]]:
    """Remove every marker (in place) and return {tensor name: [observer keys]}.

    A marker's output is replaced by its input everywhere. If the marker's output was a graph
    output, the input takes over its name, so the user's output names survive. Chains of
    markers (an op the exporter dropped, such as `.contiguous()`) bind several keys to the same
    tensor; the first key is the earliest observation.
    """
    graph = model.graph
    keys_of: dict[int, list[str]] = {}
    by_id: dict[int, ir.Value] = {}
    for node in list(graph):
        if not is_marker(node):
            continue
        x, y = node.inputs[0], node.outputs[0]
        assert x is not None
        key = node.attributes["key"].as_string()
        keys = keys_of.setdefault(id(x), [])
        by_id[id(x)] = x
        keys.extend([key, *keys_of.pop(id(y), [])])
        if y.is_graph_output():
            name = y.name
            for i, out in enumerate(graph.outputs):
                if out is y:
                    graph.outputs[i] = x
            y.name = None
            x.name = name
        ir.convenience.replace_all_uses_with(y, x)
        graph.remove(node, safe=True)
    _drop_unused_domain(model)
    return {by_id[i].name: keys for i, keys in keys_of.items() if keys}


def _drop_unused_domain(model: ir.Model) -> None:
    if not any(n.domain == DOMAIN for n in model.graph):
        model.opset_imports.pop(DOMAIN, None)
