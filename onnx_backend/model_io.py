"""Reading and writing ONNX models safely.

* Loading checks what users get wrong (missing file, truncated or non-ONNX bytes, external data
  pointing outside the model's folder, a graph that is not a DAG) and says so by name.
* Old opsets are upgraded (per-axis QuantizeLinear needs opset >= 13).
* Writes are atomic: a temporary file in the destination folder, fsync'd, then renamed over the
  target, so a crash or a full disk never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import version_converter

from .errors import InvalidModelError, OutputPathError

MIN_OPSET = 13
# Models larger than this are written with their tensors as external data (protobuf's 2 GB cap).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def load_model(model: onnx.ModelProto | bytes | str | os.PathLike) -> onnx.ModelProto:
    """Load and sanity-check a model from a path, bytes or a ModelProto (which is copied)."""
    if isinstance(model, onnx.ModelProto):
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
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    produced: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            if out:
                produced[out] = node.name or node.op_type
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


def upgrade_opset(proto: onnx.ModelProto, target: int = MIN_OPSET) -> onnx.ModelProto:
    """Convert a model below `target` to `target` (per-axis Q/DQ needs opset 13)."""
    current = default_opset(proto)
    if current >= target:
        return proto
    try:
        return version_converter.convert_version(proto, target)
    except Exception as exc:
        raise InvalidModelError(f"cannot upgrade the model from opset {current} to {target}: {exc}") from None


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
