"""onnxruntime sessions, built one way for every part of torchq.

Each reader of a model's tensors (the Calibrator, the technique pipeline, `torchq report`, the
Lightning callback's INT8 forward, `npu.compare`) opens its session here, so the options that
decide what a tensor's values are (the graph optimization level) are chosen in one place, named,
and not re-typed with different defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InvalidModelError

LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
# What a QDQ model's tensors mean depends on the level: "basic" keeps every Q/DQ pair as written
# (the values the QDQ graph defines), "all" lets onnxruntime fuse them into integer kernels.
EXPOSING_LEVEL = "basic"
PROVIDERS = ("CPUExecutionProvider",)


def session_options(level: str = EXPOSING_LEVEL, *, threads: int | None = None, log_severity: int = 3) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = log_severity
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def exposing(model: onnx.ModelProto, names: Sequence[str], types: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """A copy of `model` whose outputs are its own plus `names` (float unless `types` says)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, (types or {}).get(name, onnx.TensorProto.FLOAT), None))
            present.add(name)
    return exposed


def open_session(
    model: onnx.ModelProto | bytes | str,
    *,
    expose: Sequence[str] = (),
    types: Mapping[str, int] | None = None,
    level: str = EXPOSING_LEVEL,
    threads: int | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
    providers: Sequence[str] = PROVIDERS,
) -> ort.InferenceSession:
    """A session on `model` (a ModelProto, serialized bytes or a path) with `expose` as extra
    outputs; `weights` are initializers the model's skeleton lacks (kept as arrays, not copied
    into a serialized model). Failure to load is one InvalidModelError line."""
    if expose:
        if not isinstance(model, onnx.ModelProto):
            raise TypeError("exposing tensors needs the ModelProto")
        model = exposing(model, expose, types)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = session_options(level, threads=threads)
    if weights:
        options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
    try:
        return ort.InferenceSession(source, options, providers=list(providers))
    except Exception as exc:
        raise InvalidModelError(f"onnxruntime cannot load the model: {' '.join(str(exc).split())[:300]}") from None
