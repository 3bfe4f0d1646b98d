"""A diagnostic variant for onnxruntime on x86: the same quantized model with activations stored
as uint8 instead of int8 (zero point + 128). The real values are identical
(r = (q - z) * s with q and z shifted by the same 128); only the storage type changes.

Why it exists: onnxruntime's x86 CPU kernels fuse QDQ groups only with uint8 activations. Its
QDQS8ToU8Transformer converts an int8 QuantizeLinear -> DequantizeLinear pair to uint8 only when
the QuantizeLinear feeds exactly one DequantizeLinear; a tensor with several consumers (every
residual branch point) keeps int8 and its consumers run in float between Q/DQ. This variant shows
the latency the TFLite-spec model would have if that conversion applied everywhere. It is NOT
TFLite-spec (the spec wants int8 activations) and is never what torchq writes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def to_uint8_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    weight_zps = {n.input[2] for n in out.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[0] in inits}
    converted = set()
    for node in out.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] in weight_zps:
            continue
        zp = inits.get(node.input[2])
        if zp is None or zp.name in converted:
            continue
        value = numpy_helper.to_array(zp)
        if value.dtype != np.int8:
            continue
        zp.CopyFrom(numpy_helper.from_array((value.astype(np.int16) + 128).astype(np.uint8), zp.name))
        converted.add(zp.name)
    del out.graph.value_info[:]  # stale int8 types; onnxruntime re-infers
    return out
