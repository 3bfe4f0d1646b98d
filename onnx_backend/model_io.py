"""Reading and writing ONNX models safely.

* Loading checks what users get wrong (missing file, truncated or non-ONNX bytes, external data
  pointing outside the model's folder, a graph that is not a DAG) and says so by name.
* Old opsets are upgraded (per-axis QuantizeLinear needs opset >= 13).
* Writes are atomic: a temporary file in the destination folder, fsync'd, then renamed over the
  target, so a crash or a full disk never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from .errors import InvalidModelError, OutputPathError

MIN_OPSET = 13
# Models larger than this are written with their tensors as external data (protobuf's 2 GB cap).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def load_model(model: onnx.ModelProto | bytes | str | os.PathLike, *, copy: bool | None = True) -> onnx.ModelProto:
    """Load and sanity-check a model from a path, bytes or a ModelProto, which is copied, unless
    `copy=False`: then it is checked, sorted if need be, and returned itself; `copy=None` (for a
    caller that only reads the model): returned itself, or a copy if its nodes must be sorted."""
    if isinstance(model, onnx.ModelProto):
        proto = model
        if copy or (copy is None and not _is_sorted(model.graph)):
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
        where = "the given ModelProto"
    elif isinstance(model, (bytes, bytearray)):
        proto = _parse(bytes(model), "the given bytes")
        where = "the given bytes"
    else:
        path = Path(model)
        where = str(path)
        if not path.is_file():
            raise InvalidModelError(f"{path}: no such file")
        proto = _parse(path.read_bytes(), where)
        _load_external_data(proto, path)
    _check_structure(proto, where)
    _sort_topologically(proto.graph)
    return proto


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidModelError(f"{where}: not a valid ONNX file (truncated or corrupt): {exc}") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise InvalidModelError(f"{where}: not a valid ONNX model (no graph or no opset)")
    return proto


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    base = path.parent.resolve()
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None:
            raise InvalidModelError(f"{path}: tensor {tensor.name!r} has external data without a location")
        target = (base / location).resolve()
        if base not in target.parents:
            raise InvalidModelError(f"{path}: external data of tensor {tensor.name!r} points outside the model's folder ({location})")
        if not target.is_file():
            raise InvalidModelError(f"{path}: external data file {location} of tensor {tensor.name!r} is missing")
    try:
        onnx.load_external_data_for_model(proto, str(base))
    except Exception as exc:
        raise InvalidModelError(f"{path}: cannot read external data: {exc}") from None


def _check_structure(proto: onnx.ModelProto, where: str) -> None:
    """Catch what would otherwise surface as a crash deep inside a pass."""
    graph = proto.graph
    _check_text(graph, where)
    _check_opset(proto, where)
    _check_initializers(graph, where)
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    produced: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in produced or out in known:
                raise InvalidModelError(f"{where}: tensor {out!r} is written by more than one node (or is also an input/initializer), by {node.name or node.op_type!r}")
            produced[out] = node.name or node.op_type
    if not graph.output:
        raise InvalidModelError(f"{where}: the graph has no outputs")
    for out in graph.output:
        if out.name not in produced and out.name not in known:
            raise InvalidModelError(f"{where}: graph output {out.name!r} is not produced by any node")
    missing = []
    for node in graph.node:
        for name in node.input:
            if name not in known and name not in produced:
                missing.append((node.name or node.op_type, name))
    if missing:
        node, name = missing[0]
        raise InvalidModelError(f"{where}: node {node!r} reads tensor {name!r}, which no node, input or initializer provides")
    _check_acyclic(graph, where)
    for dim_owner in list(graph.input) + list(graph.output):
        for d in dim_owner.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 2**40:
                raise InvalidModelError(f"{where}: {dim_owner.name!r} declares an enormous dimension ({d.dim_value})")


def _check_text(graph: onnx.GraphProto, where: str) -> None:
    """Names are UTF-8 text (protobuf hands invalid UTF-8 over as bytes, which onnx_ir cannot write)."""
    strings = [s for n in graph.node for s in (n.name, n.op_type, n.domain, *n.input, *n.output)]
    strings += [v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)]
    bad = next((s for s in strings if not isinstance(s, str)), None)
    if bad is not None:
        raise InvalidModelError(f"{where}: the name {bad!r} is not valid UTF-8 text")


def _check_opset(proto: onnx.ModelProto, where: str) -> None:
    version, newest = default_opset(proto), onnx.defs.onnx_opset_version()
    if version > newest:
        raise InvalidModelError(f"{where}: opset {version} is newer than the newest this onnx knows ({newest})")


# Sub-byte element types are packed; their sizes are left to onnx's own decoder.
_PACKED = {getattr(TensorProto, n) for n in ("UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2", "FLOAT6E2M3", "FLOAT6E3M2") if hasattr(TensorProto, n)}


def _check_initializers(graph: onnx.GraphProto, where: str) -> None:
    """Every stored tensor holds exactly the data its type and dims declare.

    A lying initializer (dims of 2**80, raw bytes cut short, a type that does not match the
    bytes) otherwise crashes numpy deep inside the planner or the validator.
    """
    for t in graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            continue  # sized by onnx when the external data is read
        if any(d < 0 for d in t.dims):
            raise InvalidModelError(f"{where}: initializer {t.name!r} has a negative dimension {list(t.dims)}")
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            field = helper.tensor_dtype_to_field(t.data_type)
        except Exception:
            raise InvalidModelError(f"{where}: initializer {t.name!r} has unknown element type {t.data_type}") from None
        n = math.prod(t.dims)
        if t.data_type in _PACKED:
            try:
                numpy_helper.to_array(t)
            except Exception as exc:
                raise InvalidModelError(f"{where}: initializer {t.name!r} is corrupt: {exc}") from None
            continue
        if t.data_type == TensorProto.STRING:
            have, want, unit = len(t.string_data), n, "strings"
        elif t.HasField("raw_data"):
            have, want, unit = len(t.raw_data), n * itemsize, "bytes"
        else:
            per = 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
            have, want, unit = len(getattr(t, field)), n * per, "values"
        if have != want:
            kind = TensorProto.DataType.Name(t.data_type).lower()
            raise InvalidModelError(f"{where}: initializer {t.name!r} declares {kind} of shape {list(t.dims)} ({want} {unit}) but holds {have}")


def _dependencies(graph: onnx.GraphProto) -> list[set[int]]:
    """For each node, the indices of the nodes that produce its inputs."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    return [{producer[x] for x in n.input if x in producer} for n in graph.node]


def _is_sorted(graph: onnx.GraphProto) -> bool:
    return all(d < i for i, ds in enumerate(_dependencies(graph)) for d in ds)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Put the nodes in topological order (ONNX requires it; shape inference and the optimizer
    assume it), keeping the given order where it already is one. The graph is known acyclic."""
    if _is_sorted(graph):
        return
    deps = _dependencies(graph)
    users: list[list[int]] = [[] for _ in graph.node]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    nodes = [graph.node[i] for i in order]
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)


def _check_acyclic(graph: onnx.GraphProto, where: str) -> None:
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    state = [0] * len(graph.node)  # 0 new, 1 on stack, 2 done
    for start in range(len(graph.node)):
        if state[start]:
            continue
        stack = [(start, iter(graph.node[start].input))]
        state[start] = 1
        while stack:
            idx, inputs = stack[-1]
            nxt = next(inputs, None)
            if nxt is None:
                state[idx] = 2
                stack.pop()
                continue
            p = producer.get(nxt)
            if p is None or state[p] == 2:
                continue
            if state[p] == 1:
                raise InvalidModelError(f"{where}: the graph has a cycle through node {graph.node[p].name or graph.node[p].op_type!r}")
            state[p] = 1
            stack.append((p, iter(graph.node[p].input)))


def tensor_data_bytes(t: TensorProto) -> int:
    """Bytes of a tensor's data, from its shape and type: ByteSize() serializes the message to
    count them, and even reading raw_data copies it (0.2 and 0.07 s over MiniLM's initializers).
    String tensors, whose size the shape does not tell, are measured with ByteSize()."""
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return t.ByteSize()
    return math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def approximate_model_bytes(model: onnx.ModelProto) -> int:
    """The size of a model's tensor data (initializers and Constant nodes of the main graph):
    what decides whether it is large, without serializing it."""
    graph = model.graph
    constants = (a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t"))
    return sum(tensor_data_bytes(t) for t in graph.initializer) + sum(tensor_data_bytes(t) for t in constants)


# Initializers larger than this are left out of shape inference (it needs their dims and type,
# not their values; data propagation reads only small shape tensors).
INFERENCE_DATA_LIMIT = 1 << 16


def _is_large(t: TensorProto) -> bool:
    return t.data_location != TensorProto.EXTERNAL and tensor_data_bytes(t) > INFERENCE_DATA_LIMIT


def _skeleton(proto: onnx.ModelProto, stubbed: Callable[[TensorProto], bool] = _is_large) -> onnx.ModelProto:
    """`proto` without the data of the main graph's `stubbed` initializers (dims and type kept,
    marked external)."""
    skeleton = onnx.ModelProto()
    graph = proto.graph
    kept_graph = onnx.GraphProto()
    kept_graph.name = graph.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(kept_graph, field).extend(getattr(graph, field))
    for t in graph.initializer:
        if stubbed(t):
            stub = kept_graph.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="torchq-stub")
        else:
            kept_graph.initializer.append(t)
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(proto, field))
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    skeleton.graph.CopyFrom(kept_graph)
    return skeleton


# Data types whose raw bytes numpy (and onnxruntime's OrtValue) read as they are.
_PLAIN_DTYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL}


def _held_in_memory(t: TensorProto) -> bool:
    """A large initializer whose raw little-endian bytes this machine reads as a numpy array."""
    return sys.byteorder == "little" and t.data_type in _PLAIN_DTYPES and t.HasField("raw_data") and _is_large(t)


def write_with_external_weights(skeleton: onnx.ModelProto, weights: Mapping[str, np.ndarray], folder: str | os.PathLike) -> Path:
    """Write split_weights' two parts as a model file whose stubs point into one data file beside
    it, in `folder` (which the caller owns); returns the model's path. onnxruntime maps such data
    from the file instead of holding its own copy."""
    folder = Path(folder)
    stubs = {t.name: t for t in skeleton.graph.initializer if t.name in weights}
    offset = 0
    with open(folder / "weights.bin", "wb") as f:
        for name, value in weights.items():
            value.tofile(f)
            stub = stubs[name]
            del stub.external_data[:]
            for key, v in (("location", "weights.bin"), ("offset", offset), ("length", value.nbytes)):
                stub.external_data.add(key=key, value=str(v))
            offset += value.nbytes
    path = folder / "model.onnx"
    path.write_bytes(skeleton.SerializeToString())
    return path


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Names the graph's nodes read (subgraphs included) and its outputs."""
    read = {o.name for o in graph.output}
    for node in graph.node:
        read.update(node.input)
        for a in node.attribute:
            for g in [a.g] if a.HasField("g") else a.graphs:
                read |= _names_read(g)
    return read


def split_weights(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The skeleton of `proto` (a model load_model checked; its large initializers stubbed) and
    their data as read-only arrays.

    onnxruntime builds a session from the two (SessionOptions.add_external_initializers) without
    the whole model serialized and parsed back: MiniLM's calibration session 0.33 -> 0.17 s, and
    no serialized copy of the weights in memory. `proto` is not changed.
    """
    read = _names_read(proto.graph)
    # onnxruntime drops unread initializers before it takes the arrays, then fails to find them.
    moved = lambda t: t.name in read and _held_in_memory(t)  # noqa: E731
    skeleton = _skeleton(proto, moved)
    weights = {}
    for t in proto.graph.initializer:
        if moved(t):
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
            # raw_data is a copy (protobuf hands out bytes, never a view), of the size load_model checked.
            weights[t.name] = np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
    return skeleton, weights


def infer_shapes(proto: onnx.ModelProto, *, data_prop: bool = False) -> onnx.ModelProto:
    """onnx's shape inference (strict_mode=False) run on a skeleton of `proto` without its large
    initializers' data; returns that skeleton, with the inferred value_info and output types.

    onnx.shape_inference.infer_shapes serializes the whole model into C++ and back, so on a
    440 MB model it held three extra copies at once (1.2 GB, the largest step of quantizing
    ConvNeXt-B; bench/scale.py). Use `merge_inferred` to copy the result into a model you own.
    """
    return onnx.shape_inference.infer_shapes(_skeleton(proto), strict_mode=False, data_prop=data_prop)


def check_without_data(proto: onnx.ModelProto) -> None:
    """What onnx.checker.check_model(full_check=True) checks, for less memory: the structure on
    the model itself, then strict type and shape inference on the skeleton (full_check runs the
    inference on a serialized copy of the whole model)."""
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(_skeleton(proto), check_type=True, strict_mode=True)


def merge_inferred(proto: onnx.ModelProto, inferred: onnx.ModelProto) -> onnx.ModelProto:
    """Copy inferred value_info and output types into `proto` (in place) and return it."""
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)
    for out, typed in zip(proto.graph.output, inferred.graph.output):
        if out.name == typed.name:
            out.type.CopyFrom(typed.type)
    return proto


def upgrade_opset(proto: onnx.ModelProto, target: int = MIN_OPSET) -> onnx.ModelProto:
    """Convert a model below `target` to `target` (per-axis Q/DQ needs opset 13)."""
    current = default_opset(proto)
    if current >= target:
        return proto
    try:
        return version_converter.convert_version(proto, target)
    except Exception as exc:
        why = " ".join(str(exc).split())
        try:  # the converter's own message hides the usual cause: the model itself is invalid
            onnx.checker.check_model(proto)
        except Exception as invalid:  # noqa: BLE001 -- onnx raises several types
            why = "it is not valid ONNX (onnx.checker): " + next((ln.strip() for ln in str(invalid).splitlines() if ln.strip()), type(invalid).__name__)
        raise InvalidModelError(f"cannot upgrade the model from opset {current} to {target}: {why}") from None


def _destination(path: str | os.PathLike) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"{path}: folder {folder} is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path`; what the block writes there under `path.name` (and any
    sibling files) is fsync'd and renamed into place when the block succeeds, else removed.

    Renames within one folder are atomic, so readers see the old file or the whole new one.
    """
    path = _destination(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OutputPathError(f"{path}: could not write ({exc.strerror or exc}); nothing was written") from None
    try:
        yield staging / path.name
        written = sorted(staging.iterdir(), key=lambda f: f.name == path.name)  # the main file last
        for f in written:
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        for f in written:
            os.replace(f, path.parent / f.name)
    except OSError as exc:
        raise OutputPathError(f"{path}: could not write ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` to `path` atomically. Models over ~1.8 GB keep their tensors in
    `<name>.data` beside it (protobuf cannot hold more than 2 GB)."""
    with atomic_output(path) as tmp:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data rewrites the tensors it is given
            onnx.save_model(copy, tmp, save_as_external_data=True, location=tmp.name + ".data", all_tensors_to_one_file=True)
        else:
            tmp.write_bytes(model.SerializeToString(deterministic=True))
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
