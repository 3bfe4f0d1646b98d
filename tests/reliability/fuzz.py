"""A seeded, deterministic fuzzer for the `torchq` CLI.

Each case takes a valid model (float, or already quantized), applies one to three mutations
(byte flips and truncation, or protobuf-level edits: op types, dangling or rewired inputs,
initializer types, dims and data, attributes, graph input types and shapes, opsets, Q/DQ scales,
zero points and axes) and runs the subcommands that read such a model; or it mutates a valid
recipe (keys deleted, renamed or added, values of every type, nested structures, byte edits of
the YAML) and runs `torchq quantize --recipe --check`, and the recipe itself when it validates. The contract, judged by
cli_harness.judge: exit 0 with a valid output (onnx.checker, the spec validator, onnxruntime
loads it) or exit 2 with one clear line; never exit 1, a traceback or a partial file.

    python -m tests.reliability.fuzz --seed 0 --cases 200 --out /tmp/fuzz

Case i of seed s uses np.random.default_rng([s, i]), so any case replays alone (--only i).
Every case is logged (JSON lines) before it runs, so a crash of the whole process (a segfault
in native code, the memory limit) still names the case that caused it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.reliability import hostile
from tests.reliability.cli_harness import files_in, judge, run_cli

OPS = ["Conv", "Relu", "Add", "Mul", "MatMul", "Gemm", "Softmax", "Concat", "Reshape", "MaxPool", "AveragePool", "GlobalAveragePool",
       "QuantizeLinear", "DequantizeLinear", "Identity", "Sigmoid", "Tanh", "Transpose", "Flatten", "Clip", "ConvTranspose",
       "Resize", "Split", "Gather", "Pad", "LayerNormalization", "Frobnicate", "If", "Loop", "Squeeze"]
ATTRS = ["axis", "axes", "kernel_shape", "strides", "pads", "group", "dilations", "perm", "transB", "alpha", "min", "max", "to",
         "keepdims", "epsilon", "mode", "auto_pad", "output_padding", "block_size", "saturate"]
DTYPES = [v for _, v in TensorProto.DataType.items()] + [99]
SPECIAL_FLOATS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3.4e38, -3.4e38, 1e-30, 65504.0], np.float32)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _tensor_names(m: onnx.ModelProto) -> list[str]:
    names = [i.name for i in m.graph.input] + [t.name for t in m.graph.initializer]
    return names + [o for n in m.graph.node for o in n.output if o]


def _random_attr(rng, name: str) -> onnx.AttributeProto:
    kind = int(rng.integers(6))
    if kind == 0:
        return helper.make_attribute(name, int(_pick(rng, [-(2**40), -5, -1, 0, 1, 2, 3, 7, 2**31, 2**62])))
    if kind == 1:
        return helper.make_attribute(name, float(_pick(rng, [np.nan, np.inf, -1.0, 0.0, 1e-30, 1e30])))
    if kind == 2:
        return helper.make_attribute(name, [int(v) for v in rng.integers(-3, 9, int(rng.integers(0, 6)))], attr_type=onnx.AttributeProto.INTS)
    if kind == 3:
        return helper.make_attribute(name, _pick(rng, ["", "NOTSET", "SAME_UPPER", "nearest", "x" * 1000]))
    if kind == 4:
        return helper.make_attribute(name, [float(v) for v in rng.normal(size=int(rng.integers(1, 4)))])
    return helper.make_attribute(name, helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0]))


# ---- protobuf-level mutations: each edits `m` in place and says what it did --------------------


def m_op_type(m, rng):
    n = _pick(rng, m.graph.node)
    n.op_type = _pick(rng, OPS)
    return f"node {n.name}: op_type -> {n.op_type}"


def m_dangling_input(m, rng):
    n = _pick(rng, m.graph.node)
    if not n.input:
        return "no-op"
    i = int(rng.integers(len(n.input)))
    n.input[i] = f"dangling_{i}"
    return f"node {n.name}: input {i} -> a tensor nothing produces"


def m_rewire_input(m, rng):
    n = _pick(rng, m.graph.node)
    if not n.input:
        return "no-op"
    i = int(rng.integers(len(n.input)))
    n.input[i] = _pick(rng, _tensor_names(m))
    return f"node {n.name}: input {i} -> {n.input[i]}"


def m_extra_or_fewer_inputs(m, rng):
    n = _pick(rng, m.graph.node)
    if rng.random() < 0.5 and n.input:
        del n.input[-1]
        return f"node {n.name}: last input removed"
    n.input.append(_pick(rng, _tensor_names(m) + [""]))
    return f"node {n.name}: extra input {n.input[-1]!r}"


def m_drop_initializer(m, rng):
    if not m.graph.initializer:
        return "no-op"
    t = _pick(rng, m.graph.initializer)
    m.graph.initializer.remove(t)
    return f"initializer {t.name} removed"


def m_initializer_dtype(m, rng):
    t = _pick(rng, m.graph.initializer)
    t.data_type = int(_pick(rng, DTYPES))
    return f"initializer {t.name}: data_type -> {t.data_type}"


def m_initializer_dims(m, rng):
    t = _pick(rng, m.graph.initializer)
    dims = list(t.dims)
    choice = int(rng.integers(5))
    if choice == 0 and dims:
        dims[int(rng.integers(len(dims)))] = int(_pick(rng, [0, -1, 2**40, 3]))
    elif choice == 1:
        dims.append(1)
    elif choice == 2 and dims:
        dims.pop()
    elif choice == 3:
        dims = dims[::-1]
    else:
        dims = [int(np.prod(dims))] if dims else []
    del t.dims[:]
    t.dims.extend(dims)
    return f"initializer {t.name}: dims -> {dims}"


def m_initializer_values(m, rng):
    floats = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and t.raw_data and len(t.raw_data) % 4 == 0]
    if not floats:
        return "no-op"
    t = _pick(rng, floats)
    a = np.frombuffer(t.raw_data, np.float32).copy()
    idx = rng.integers(0, a.size, max(1, a.size // 4))
    a[idx] = rng.choice(SPECIAL_FLOATS, idx.size)
    t.raw_data = a.tobytes()
    return f"initializer {t.name}: {idx.size} values -> special floats"


def m_initializer_bytes(m, rng):
    raw = [t for t in m.graph.initializer if t.raw_data]
    if not raw:
        return "no-op"
    t = _pick(rng, raw)
    data = bytearray(t.raw_data)
    if rng.random() < 0.5:
        t.raw_data = bytes(data[: int(rng.integers(len(data)))])
        return f"initializer {t.name}: raw data truncated"
    for i in rng.integers(0, len(data), max(1, len(data) // 8)):
        data[i] = int(rng.integers(256))
    t.raw_data = bytes(data)
    return f"initializer {t.name}: raw bytes flipped"


def m_set_attribute(m, rng):
    n = _pick(rng, m.graph.node)
    name = _pick(rng, [a.name for a in n.attribute] + ATTRS)
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    n.attribute.append(_random_attr(rng, name))
    return f"node {n.name}: attribute {name} -> {onnx.helper.get_attribute_value(n.attribute[-1])!r}"[:200]


def m_drop_attribute(m, rng):
    with_attrs = [n for n in m.graph.node if n.attribute]
    if not with_attrs:
        return "no-op"
    n = _pick(rng, with_attrs)
    a = _pick(rng, n.attribute)
    n.attribute.remove(a)
    return f"node {n.name}: attribute {a.name} removed"


def m_input_type(m, rng):
    vi = _pick(rng, m.graph.input)
    vi.type.tensor_type.elem_type = int(_pick(rng, DTYPES[:-1]))
    return f"graph input {vi.name}: elem_type -> {vi.type.tensor_type.elem_type}"


def m_input_shape(m, rng):
    vi = _pick(rng, m.graph.input)
    dims = vi.type.tensor_type.shape.dim
    if rng.random() < 0.3 or not dims:
        dims.add().dim_value = 1
        return f"graph input {vi.name}: one more dim"
    d = _pick(rng, dims)
    choice = int(rng.integers(4))
    if choice == 0:
        d.dim_value = int(_pick(rng, [0, 1, 2, 7, 2**20]))
    elif choice == 1:
        d.dim_param = "N"
    elif choice == 2:
        d.Clear()
    else:
        del dims[-1]
    return f"graph input {vi.name}: shape -> {[x.dim_value or x.dim_param or '?' for x in dims]}"


def m_outputs(m, rng):
    choice = int(rng.integers(3))
    if choice == 0:
        m.graph.output[0].name = _pick(rng, _tensor_names(m))
        return f"graph output -> {m.graph.output[0].name}"
    if choice == 1:
        extra = _pick(rng, _tensor_names(m))
        m.graph.output.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, None))
        return f"extra graph output {extra}"
    m.graph.output[0].type.tensor_type.elem_type = int(_pick(rng, DTYPES[:-1]))
    return f"graph output elem_type -> {m.graph.output[0].type.tensor_type.elem_type}"


def m_opset(m, rng):
    if rng.random() < 0.2:
        m.opset_import.append(helper.make_opsetid(_pick(rng, ["com.microsoft", "torchq", "ai.onnx.ml", "x"]), int(rng.integers(1, 5))))
        return f"extra opset import {m.opset_import[-1].domain}"
    m.opset_import[0].version = int(rng.integers(1, 31))
    return f"opset -> {m.opset_import[0].version}"


def m_delete_node(m, rng):
    n = _pick(rng, m.graph.node)
    m.graph.node.remove(n)
    return f"node {n.name} deleted"


def m_duplicate_node(m, rng):
    n = _pick(rng, m.graph.node)
    copy = onnx.NodeProto()
    copy.CopyFrom(n)
    copy.name = n.name + "_dup"
    if rng.random() < 0.5:
        del copy.output[:]
        copy.output.extend([o + "_dup" for o in n.output])
    m.graph.node.append(copy)
    return f"node {n.name} duplicated"


def m_shuffle_nodes(m, rng):
    nodes = list(m.graph.node)
    order = rng.permutation(len(nodes))
    del m.graph.node[:]
    m.graph.node.extend(nodes[i] for i in order)
    return "nodes shuffled"


def _array(t: onnx.TensorProto):
    """The tensor's values, or None when an earlier mutation made them unreadable."""
    try:
        return onnx.numpy_helper.to_array(t)
    except Exception:  # noqa: BLE001
        return None


def _qdq_params(m):
    """Initializers used as Q/DQ scale (input 1) or zero point (input 2)."""
    inits = {t.name: t for t in m.graph.initializer}
    scales = [inits[n.input[1]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1 and n.input[1] in inits]
    zeros = [inits[n.input[2]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]
    return scales, zeros


def m_qdq_scale(m, rng):
    scales, _ = _qdq_params(m)
    if not scales:
        return "no-op"
    t = _pick(rng, scales)
    a = _array(t)
    if a is None or a.size == 0:
        return "no-op"
    a = a.astype(np.float32)
    a.flat[int(rng.integers(a.size))] = _pick(rng, [0.0, -1.0, np.nan, np.inf, 1e-45, 3.4e38])
    t.CopyFrom(onnx.numpy_helper.from_array(a.astype(np.float32), t.name))
    return f"Q/DQ scale {t.name} -> {a.ravel()[:4]}"


def m_qdq_zero_point(m, rng):
    _, zeros = _qdq_params(m)
    if not zeros:
        return "no-op"
    t = _pick(rng, zeros)
    a = _array(t)
    if a is None:
        return "no-op"
    dtype = _pick(rng, [np.uint8, np.int32, np.float32, np.int16, np.int8])
    t.CopyFrom(onnx.numpy_helper.from_array(np.resize(a.astype(dtype), int(rng.integers(0, 4)) or a.shape), t.name))
    return f"Q/DQ zero point {t.name} -> {dtype.__name__}"


def m_qdq_axis(m, rng):
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return "no-op"
    n = _pick(rng, qdq)
    for a in list(n.attribute):
        if a.name == "axis":
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute("axis", int(rng.integers(-6, 6))))
    return f"{n.name}: axis -> {n.attribute[-1].i}"


def m_qdq_inputs(m, rng):
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return "no-op"
    n = _pick(rng, qdq)
    if not n.input:
        return "no-op"
    keep = int(rng.integers(0, len(n.input)))
    del n.input[keep:]
    return f"{n.name}: only {keep} inputs"


PROTO_MUTATIONS: list[Callable] = [
    m_op_type, m_dangling_input, m_rewire_input, m_extra_or_fewer_inputs, m_drop_initializer, m_initializer_dtype, m_initializer_dims,
    m_initializer_values, m_initializer_bytes, m_set_attribute, m_drop_attribute, m_input_type, m_input_shape, m_outputs, m_opset,
    m_delete_node, m_duplicate_node, m_shuffle_nodes,
]
QDQ_MUTATIONS: list[Callable] = [m_qdq_scale, m_qdq_zero_point, m_qdq_axis, m_qdq_inputs]


def mutate_bytes(data: bytes, rng) -> tuple[bytes, str]:
    b = bytearray(data)
    choice = int(rng.integers(4))
    if choice == 0:
        cut = int(rng.integers(len(b)))
        return bytes(b[:cut]), f"truncated at {cut}/{len(b)}"
    if choice == 1:
        k = int(rng.integers(1, 9))
        for i in rng.integers(0, len(b), k):
            b[i] ^= 1 << int(rng.integers(8))
        return bytes(b), f"{k} bit flips"
    if choice == 2:
        at = int(rng.integers(len(b)))
        junk = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        return bytes(b[:at] + junk + b[at:]), f"{len(junk)} random bytes inserted at {at}"
    at, n = int(rng.integers(len(b))), int(rng.integers(1, 256))
    return bytes(b[:at] + b[at : at + n] * 3 + b[at + n :]), f"chunk of {n} bytes at {at} repeated"


# ---- recipe mutations --------------------------------------------------------------------------

RECIPE_KEYS = ["name", "model", "factory", "kwargs", "checkpoint", "calibration", "loader", "num_batches", "device", "quantization",
               "method", "symmetric", "percentile", "per_channel", "exclude", "overrides", "pattern", "float", "histogram_bins",
               "target", "export", "path", "opset", "exporter", "input_names", "dynamic_axes", "evaluation", "function", "extends", "typo_key"]


def _random_value(rng, depth: int = 0):
    kind = int(rng.integers(12 if depth < 3 else 8))
    if kind == 0:
        return int(_pick(rng, [0, 1, -1, 3, 17, 256, 2**31, -(2**63), 10**30]))
    if kind == 1:
        return float(_pick(rng, [0.5, -1.0, 1e308, float("nan"), float("inf"), 99.99, 1e-300]))
    if kind == 2:
        return _pick(rng, ["", "mse", "entropy", "min_max", "warboy", "tflite", "dynamo", "torchscript", "cpu", "x" * 10_000, "../../etc/passwd",
                           "/etc/passwd", "os:system", "tests.reliability.recipe_targets:raises", "tests.reliability.recipe_targets:tiny_model",
                           "a.b:c", "*", "head.*", "é\u0000", "12"])
    if kind == 3:
        return bool(rng.integers(2))
    if kind == 4:
        return None
    if kind in (5, 6, 7):
        return _pick(rng, [[], [1, 2], ["a"], {}, {"pattern": "*"}, {"a": 1}])
    if kind in (8, 9):
        return [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {_pick(rng, RECIPE_KEYS): _random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def mutate_recipe(recipe: dict, rng) -> str:
    paths = [p for p in _paths(recipe) if p]
    path = _pick(rng, paths)
    parent = recipe
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    choice = int(rng.integers(5))
    if choice == 0 and isinstance(parent, dict):
        del parent[last]
        return f"{'.'.join(map(str, path))} deleted"
    if choice == 1 and isinstance(parent, dict):
        parent[str(last) + _pick(rng, ["s", "_", "X"])] = parent.pop(last)
        return f"{'.'.join(map(str, path))} renamed"
    if choice == 2 and isinstance(parent, dict):
        key = _pick(rng, RECIPE_KEYS)
        parent[key] = _random_value(rng)
        return f"{'.'.join(map(str, path[:-1] + (key,)))} added/replaced: {parent[key]!r}"[:200]
    parent[last] = _random_value(rng)
    return f"{'.'.join(map(str, path))} -> {parent[last]!r}"[:200]


def recipe_case(rng, folder: Path) -> tuple[str | bytes, list[str]]:
    import yaml

    from tests.reliability.recipe_targets import base_recipe

    recipe = base_recipe(folder)
    if rng.random() < 0.2:
        text, what = mutate_bytes(yaml.safe_dump(recipe).encode(), rng)
        return text, [what]
    mutations = [mutate_recipe(recipe, rng) for _ in range(int(rng.integers(1, 4)))]
    return yaml.safe_dump(recipe, allow_unicode=True), mutations


# ---- bases and commands ------------------------------------------------------------------------


@dataclass
class Base:
    name: str
    model: bytes
    quantized: bool
    data: np.ndarray


def make_bases() -> list[Base]:
    from onnx_backend import Calibrator, quantize

    bases = []
    for name, build, shape in (("conv", hostile.base_model, hostile.INPUT_SHAPE), ("attention", hostile.attention_model, [1, 4, 8])):
        model = build()
        data = np.random.default_rng(0).normal(size=(3, *shape[1:])).astype(np.float32)
        bases.append(Base(f"float_{name}", model.SerializeToString(), False, data))
        calibrator = Calibrator(model, "min_max_asym", quiet=True)
        calibrator.collect_data([[d[None]] for d in data])
        bases.append(Base(f"qdq_{name}", quantize(model, calibrator.compute_range()).SerializeToString(), True, data))
    return bases


def ranges_for(base: Base) -> dict:
    from onnx_backend import Calibrator

    calibrator = Calibrator(base.model, "min_max_asym", quiet=True)
    calibrator.collect_data([[d[None]] for d in base.data])
    return calibrator.compute_range().to_dict()


def commands_for(base: Base, folder: Path, rng) -> dict[str, tuple[list[str], list[Path]]]:
    model, data = str(folder / "model.onnx"), str(folder / "cal.npz")
    out = folder / "out.onnx"
    if base.quantized:
        cmds = {"validate": (["validate", model], [])}
        if rng.random() < 0.5:
            cmds["check"] = (["check", model, "--json"], [])
        if rng.random() < 0.35:
            cmds["simulate"] = (["simulate", model, "--data", data, "--target", "all", "-o", str(folder / "sim.npz")], [folder / "sim.npz"])
        return cmds
    cmds = {"quantize-onnx --ranges": (["quantize-onnx", model, "--ranges", str(folder / "ranges.json"), "--target", "all", "-o", str(out)], [out])}
    if rng.random() < 0.35:
        cmds["quantize-onnx --data"] = (["quantize-onnx", model, "--data", data, "--method", "mse_asym", "-o", str(out)], [out])
    if rng.random() < 0.2:
        cmds["calibrate"] = (["calibrate", model, "--data", data, "-o", str(folder / "r.json")], [folder / "r.json"])
    return cmds


OK_CODES = {"validate": (0, 3), "check": (0,), "simulate": (0,)}
RECIPE_SHARE = 0.3  # of the cases mutate a recipe instead of a model


def _loads_in_onnxruntime(model: onnx.ModelProto | str) -> str | None:
    """None if onnxruntime loads the model, else why not."""
    import onnxruntime as ort

    # Basic optimizations: onnxruntime 1.32's extended QDQ fusions fail to load valid models
    # at opset >= 21 (a MatMul + bias Add on a 3-D input; docs/RELIABILITY.md, known issues).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def check_output(cmd: str, outputs: list[Path], float_model: Path | None = None) -> str | None:
    """An exit-0 quantized model must be valid ONNX and follow the spec; and it must load in
    onnxruntime when the float model it came from does (onnx knows opsets onnxruntime does
    not run yet: those quantize into valid models that run elsewhere)."""
    if not cmd.startswith("quantize"):
        return None
    from onnx_backend import validate

    try:
        q = onnx.load(outputs[0])
        onnx.checker.check_model(q, full_check=True)
    except Exception as exc:  # noqa: BLE001
        return f"exit 0 but the output is not a valid model: {type(exc).__name__}: {str(exc)[:300]}"
    broken = validate(q)
    if broken:
        return f"exit 0 but the output breaks the spec: {broken[0]}"
    why = _loads_in_onnxruntime(q)
    if why is not None and re.search(r"NOT_IMPLEMENTED : Could not find an implementation for (Quantize|Dequantize)Linear\(\d+\)", why):
        why = None  # onnxruntime 1.32 has no Q/DQ kernels at opset 28 (float ops it has): docs/RELIABILITY.md
    if why is not None and (float_model is None or _loads_in_onnxruntime(str(float_model)) is None):
        return f"exit 0 but onnxruntime cannot load the output (it loads the float model): {why}"
    return None


def _judge_run(argv: list[str], outputs: list[Path], folder: Path, ok_codes) -> tuple[object, str | None]:
    before = files_in(folder)
    r = run_cli(argv)
    verdict = judge(r, outputs, before, folder, ok_codes)
    if verdict is None and r.code == 0 and outputs and outputs[0].suffix == ".onnx":
        verdict = check_output("quantize", outputs)
    return r, verdict


def run_recipe_case(seed: int, index: int, rng, work: Path, failures: Path) -> list[dict]:
    folder = work / f"case{index}"
    folder.mkdir(parents=True)
    text, mutations = recipe_case(rng, folder)
    path = folder / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    results = []
    runs = [("quantize --recipe --check", ["--quiet", "quantize", "--recipe", str(path), "--check"], [])]
    for cmd, argv, outputs in runs:
        start = time.perf_counter()
        r, verdict = _judge_run(argv, outputs, folder, (0,))
        results.append({"case": index, "base": "recipe", "mutations": mutations, "cmd": cmd, "code": r.code, "seconds": round(time.perf_counter() - start, 2),
                        "verdict": verdict, "message": (r.error_lines or [""])[-1][:300]})
        if cmd.endswith("--check") and r.code == 0:  # a valid recipe: run it
            runs.append(("quantize --recipe", ["--quiet", "quantize", "--recipe", str(path), "--no-eval", "-o", str(folder / "out.onnx")], [folder / "out.onnx"]))
        if verdict is not None:
            failures.mkdir(exist_ok=True)
            (failures / f"seed{seed}_case{index}.yaml").write_bytes(path.read_bytes())
    shutil.rmtree(folder, ignore_errors=True)
    return results


def run_case(seed: int, index: int, bases: list[Base], ranges: dict, work: Path, failures: Path) -> list[dict]:
    rng = np.random.default_rng([seed, index])
    if rng.random() < RECIPE_SHARE:
        return run_recipe_case(seed, index, rng, work, failures)
    base = bases[int(rng.integers(len(bases)))]
    folder = work / f"case{index}"
    folder.mkdir(parents=True)
    if rng.random() < 0.25:
        data, what = mutate_bytes(base.model, rng)
        mutations = [what]
    else:
        m = onnx.load_from_string(base.model)
        pool = PROTO_MUTATIONS + (QDQ_MUTATIONS * 3 if base.quantized else [])
        mutations = [_pick(rng, pool)(m, rng) if m.graph.node and m.graph.initializer and m.graph.input else "no-op" for _ in range(int(rng.integers(1, 4)))]
        data = m.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    np.savez(folder / "cal.npz", x=base.data)
    if not base.quantized:
        (folder / "ranges.json").write_text(json.dumps(ranges[base.name]))
    results = []
    for cmd, (argv, outputs) in commands_for(base, folder, rng).items():
        before = files_in(folder)
        start = time.perf_counter()
        r = run_cli(argv)
        verdict = judge(r, outputs, before, folder, OK_CODES.get(cmd, (0,)))
        if verdict is None and r.code == 0:
            verdict = check_output(cmd, outputs, folder / "model.onnx")
        for p in outputs:
            p.unlink(missing_ok=True)
        results.append({"case": index, "base": base.name, "mutations": mutations, "cmd": cmd, "code": r.code, "seconds": round(time.perf_counter() - start, 2),
                        "verdict": verdict, "message": (r.error_lines or [""])[-1][:300]})
        if verdict is not None:
            failures.mkdir(exist_ok=True)
            (failures / f"seed{seed}_case{index}.onnx").write_bytes(data)
    shutil.rmtree(folder, ignore_errors=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=150)
    p.add_argument("--seconds", type=float, default=600, help="stop starting new cases after this long")
    p.add_argument("--only", type=int, default=None, help="run only this case index")
    p.add_argument("--out", required=True, help="folder for the log (fuzz.jsonl) and failing models")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    bases = make_bases()
    ranges = {b.name: ranges_for(b) for b in bases if not b.quantized}
    codes: Counter = Counter()
    failed = 0
    start = time.perf_counter()
    indices = [args.only] if args.only is not None else range(args.cases)
    with open(out / "fuzz.jsonl", "w") as log:
        done = 0
        for i in indices:
            if time.perf_counter() - start > args.seconds:
                break
            log.write(json.dumps({"start": i}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            for r in run_case(args.seed, i, bases, ranges, work, out / "failures"):
                codes[(r["cmd"], r["code"])] += 1
                failed += r["verdict"] is not None
                log.write(json.dumps(r) + "\n")
            log.flush()
            done += 1
        log.write(json.dumps({"done": done, "failed": failed, "seconds": round(time.perf_counter() - start, 1)}) + "\n")
    print(f"seed {args.seed}: {done} cases in {time.perf_counter() - start:.1f} s, {failed} failures")
    for (cmd, code), n in sorted(codes.items()):
        print(f"  {cmd:24s} exit {code}: {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
