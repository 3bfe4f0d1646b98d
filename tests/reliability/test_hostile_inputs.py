"""Hostile inputs through the CLI: each gets exit 2 with one clear line, no traceback, no output.

The cases are named in tests/reliability/hostile.py; docs/RELIABILITY.md lists them. Most run
`torchq.cli.main` in-process (fd-level capture, see cli_harness.py); the last test proves the
same for real `python -m torchq` processes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_backend import validate
from tests.reliability import hostile
from tests.reliability.cli_harness import files_in, judge, run_cli, run_cli_process

COMMANDS = ("quantize-onnx --ranges", "quantize-onnx --data", "calibrate", "validate")

# What `quantize-onnx --ranges` must say about each hostile model (None: it is usable ONNX and
# must quantize into a valid model).
EXPECTED = {
    "cyclic": r"cycle through node 'conv1'",
    "dangling_input": r"node 'conv2' reads tensor 'nowhere'",
    "missing_initializer": r"node 'conv2' reads tensor 'w2'",
    "int_weights": r"not valid ONNX.*int32",
    "weight_dtype_lies": r"initializer 'w1' declares double of shape \[4, 3, 3, 3\] \(864 bytes\) but holds 432",
    "weight_bytes_short": r"initializer 'w2' declares float .* but holds 10",
    "string_input": r"not valid ONNX.*string",
    "double_input": r"not valid ONNX",
    "enormous_input_dim": r"'x' declares an enormous dimension",
    "enormous_initializer_dims": r"initializer 'wf' declares float of shape \[1099511627776, 1099511627776\]",
    "huge_constant_of_shape": r"not valid ONNX",
    "unknown_op": r"not valid ONNX.*Frobnicate",
    "wrong_op_type": r"not valid ONNX.*axis",
    "bad_attribute": r"not valid ONNX.*group",
    "wrong_kernel_shape": None,  # onnx's checker accepts it; calibration (--data) reports the onnxruntime error
    "duplicate_output_name": r"tensor 'r1' is written by more than one node",
    "no_opset": r"no graph or no opset",
    "future_opset": r"opset 999 is newer",
    "ancient_opset": r"cannot upgrade the model from opset 1",
    "unsorted_nodes": None,
    "no_outputs": r"the graph has no outputs",
    "empty_graph": r"graph output 'y' is not produced by any node",
    "nested_subgraph_bomb": None,
}


def _outputs(cmd: str, out: Path) -> list[Path]:
    if cmd.startswith("quantize"):
        return [out]
    return [out.with_suffix(".json")] if cmd == "calibrate" else []


def _check(argv, cmd, out, folder) -> object:
    before = files_in(folder)
    result = run_cli(argv)
    verdict = judge(result, _outputs(cmd, out), before, folder, ok_codes=(0, 3) if cmd == "validate" else (0,))
    assert verdict is None, f"{cmd}: {verdict}"
    return result


def _assert_valid_output(path: Path) -> None:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert validate(model) == []
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_expected_covers_every_hostile_model():
    assert set(EXPECTED) == set(hostile.HOSTILE_MODELS)


@pytest.mark.parametrize("name", sorted(hostile.HOSTILE_MODELS))
def test_hostile_model(name, tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.HOSTILE_MODELS[name]())
    out = tmp_path / "out.onnx"
    for cmd, argv in hostile.commands(paths, out).items():
        result = _check(argv, cmd, out, tmp_path)
        if cmd == "quantize-onnx --ranges":
            if EXPECTED[name] is None:
                assert result.code == 0, result.stderr
                _assert_valid_output(out)
            else:
                assert result.code == 2 and re.search(EXPECTED[name], result.stderr), result.stderr
        for p in _outputs(cmd, out):
            p.unlink(missing_ok=True)


@pytest.mark.parametrize("name", sorted(hostile.hostile_bytes(b"0" * 64)))
def test_broken_bytes(name, tmp_path):
    good = hostile.base_model().SerializeToString()
    paths = hostile.write_inputs(tmp_path, hostile.hostile_bytes(good)[name])
    out = tmp_path / "out.onnx"
    for cmd, argv in hostile.commands(paths, out).items():
        result = _check(argv, cmd, out, tmp_path)
        assert result.code == 2 and "model.onnx: not a valid ONNX" in result.stderr, result.stderr


def test_model_path_is_a_folder_or_missing(tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    paths["model"].unlink()
    paths["model"].mkdir()
    out = tmp_path / "out.onnx"
    for cmd, argv in hostile.commands(paths, out).items():
        assert "no such file" in _check(argv, cmd, out, tmp_path).stderr


# ---- external data -----------------------------------------------------------------------------


def _external(folder: Path, paths: dict, location: str, offset: int | None = None, length: int | None = None) -> None:
    onnx.save_model(hostile.base_model(), paths["model"], save_as_external_data=True, location="w.bin", size_threshold=0)
    m = onnx.load(paths["model"], load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
            elif e.key == "offset" and offset is not None:
                e.value = str(offset)
            elif e.key == "length" and length is not None:
                e.value = str(length)
    onnx.save_model(m, paths["model"])


EXTERNAL = {
    "parent_folder": (dict(location="../w.bin"), r"external data of tensor 'w1' points outside the model's folder \(\.\./w\.bin\)"),
    "absolute_path": (dict(location="/etc/passwd"), r"points outside the model's folder \(/etc/passwd\)"),
    "device_file": (dict(location="/dev/zero"), r"points outside the model's folder"),
    "symlink_out": (dict(location="link.bin"), r"points outside the model's folder \(link\.bin\)"),
    "missing_file": (dict(location="nothere.bin"), r"external data file nothere\.bin of tensor 'w1' is missing"),
    "a_folder": (dict(location="sub"), r"external data file sub of tensor 'w1' is missing"),
    "offset_beyond_file": (dict(location="w.bin", offset=10**9), r"offset \(1000000000\) exceeds file size"),
    "length_beyond_file": (dict(location="w.bin", length=10**12), r"length \(1000000000000\) exceeds available data"),
    "negative_offset": (dict(location="w.bin", offset=-5), r"offset must be non-negative"),
}


@pytest.mark.parametrize("name", sorted(EXTERNAL))
def test_hostile_external_data(name, tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    kwargs, expected = EXTERNAL[name]
    _external(tmp_path, paths, **kwargs)
    if name == "symlink_out":
        os.symlink("/etc/passwd", tmp_path / "link.bin")
    if name == "a_folder":
        (tmp_path / "sub").mkdir()
    out = tmp_path / "out.onnx"
    for cmd, argv in hostile.commands(paths, out).items():
        result = _check(argv, cmd, out, tmp_path)
        assert result.code == 2 and re.search(expected, result.stderr), result.stderr


# ---- ranges files ------------------------------------------------------------------------------


def _ranges(d) -> str:
    return json.dumps(hostile.base_ranges_file(d))


LAUGHS = "format: torchq-ranges\nversion: 1\na: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh")
) + "ranges: {x: *h}\n"

HOSTILE_RANGES = {
    "not_json": ("{{{", r"not valid JSON(/YAML)? \(line \d+, column \d+\)"),
    "a_list": ("[1, 2]", r"not a torchq ranges file"),
    "wrong_version": ('{"format": "torchq-ranges", "version": 99, "ranges": {}}', r"version 99"),
    "ranges_not_a_mapping": ('{"format": "torchq-ranges", "version": 1, "ranges": [1, 2]}', r"'ranges' must be a mapping"),
    "json_nan": ('{"format": "torchq-ranges", "version": 1, "ranges": {"x": [NaN, 1]}}', r"tensor 'x' must be \[min, max\] of finite float32"),
    "json_infinity": ('{"format": "torchq-ranges", "version": 1, "ranges": {"x": [-Infinity, 1]}}', r"tensor 'x' must be \[min, max\] of finite float32"),
    "mask_values_not_counts": ('{"format": "torchq-ranges", "version": 1, "ranges": {"x": [-1, 1]}, "mask_values": {"x": {"low": -3, "high": true}}}', r"mask_values of tensor 'x' must be \{low: n, high: n\}"),
    "mask_values_a_list": ('{"format": "torchq-ranges", "version": 1, "ranges": {"x": [-1, 1]}, "mask_values": [1]}', r"'mask_values' must be a mapping"),
    "yaml_nan": ("format: torchq-ranges\nversion: 1\nranges:\n  x: [.nan, 1.0]\n", r"tensor 'x' must be \[min, max\] of finite float32"),
    "yaml_inf": ("format: torchq-ranges\nversion: 1\nranges:\n  x: [-.inf, 1.0]\n", r"tensor 'x' must be \[min, max\] of finite float32"),
    "beyond_float32": (_ranges({"x": [-1e300, 1e300]}), r"tensor 'x' must be \[min, max\] of finite float32"),
    "bools": (_ranges({"x": [False, True]}), r"tensor 'x' must be"),
    "strings": (_ranges({"x": ["a", "b"]}), r"tensor 'x' must be"),
    "min_above_max": (_ranges({"x": [1, -1]}), r"min <= max"),
    "three_numbers": (_ranges({"x": [0, 1, 2]}), r"tensor 'x' must be"),
    "deeply_nested": ("[" * 100_000 + "]" * 100_000, r"nested too deeply|maximum nesting depth"),
    "billion_laughs": (LAUGHS, r"tensor 'x' must be"),
    "python_tag": ("!!python/object/apply:os.system ['touch pwned']\n", r"not valid JSON/YAML.*python/object/apply"),
    "binary": ("\x00\x01\x02", r"not valid JSON"),
    "huge_comment": ("# " + "x" * 20_000_000 + "\n", r"not a torchq ranges file|not valid JSON"),
}
YAML_SYNTAX = {"yaml_nan", "yaml_inf", "billion_laughs", "python_tag"}


@pytest.mark.parametrize(
    ("name", "suffix"), [(n, s) for n in sorted(HOSTILE_RANGES) for s in (".yaml", ".json") if s == ".yaml" or n not in YAML_SYNTAX]
)
def test_hostile_ranges_file(name, suffix, tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    content, expected = HOSTILE_RANGES[name]
    paths["ranges"] = paths["ranges"].with_suffix(suffix)
    paths["ranges"].write_text(content)
    out = tmp_path / "out.onnx"
    result = _check(hostile.commands(paths, out)["quantize-onnx --ranges"], "quantize-onnx --ranges", out, tmp_path)
    assert result.code == 2 and re.search(expected, result.stderr), result.stderr
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_ranges_at_float32_max_and_unknown_tensors_still_give_a_valid_model(tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    out = tmp_path / "out.onnx"
    big = {k: [-3.4e38, 3.4e38] for k in hostile.base_ranges()}
    for ranges in (big, {"nope": [0, 1]}, {}):
        paths["ranges"].write_text(_ranges(ranges))
        assert _check(hostile.commands(paths, out)["quantize-onnx --ranges"], "quantize-onnx --ranges", out, tmp_path).code == 0
        _assert_valid_output(out)
        out.unlink()


# ---- calibration data --------------------------------------------------------------------------


def _as_folder(p: Path, files: dict[str, bytes | np.ndarray]) -> None:
    p.unlink()
    p.mkdir()
    for name, content in files.items():
        if isinstance(content, np.ndarray):
            np.save(p / name, content)
        else:
            (p / name).write_bytes(content)


HOSTILE_DATA = {
    "truncated_zip": (lambda p: p.write_bytes(p.read_bytes()[:100]), r"cal\.npz: not a readable \.npz file"),
    "text": (lambda p: p.write_text("hello"), r"cal\.npz: not a readable \.npz file"),
    "pickled_objects": (lambda p: np.savez(p, x=np.array([object()], dtype=object)), r"Object arrays cannot be loaded"),
    "no_arrays": (lambda p: np.savez(p), r"arrays \[\] do not name the model inputs \['x'\]"),
    "zero_samples": (lambda p: np.savez(p, x=np.zeros((0, 3, 8, 8), np.float32)), r"calibration dataset is empty"),
    "int64": (lambda p: np.savez(p, x=np.zeros((2, 3, 8, 8), np.int64)), r"dtype int64, the model expects float32"),
    "complex": (lambda p: np.savez(p, x=np.zeros((2, 3, 8, 8), np.complex64)), r"dtype complex64"),
    "strings": (lambda p: np.savez(p, x=np.array(["a", "b"])), r"dtype <U1"),
    "scalar": (lambda p: np.savez(p, x=np.float32(1)), r"samples along axis 0"),
    "nan": (lambda p: np.savez(p, x=np.full((2, 3, 8, 8), np.nan, np.float32)), r"tensor 'x' holds NaN on calibration sample 0"),
    # +inf and 3e38 are mask values (statistics.MASK_MAGNITUDE), left out of x's range; the NaN
    # the convolutions make of them (inf - inf) is refused
    "inf": (lambda p: np.savez(p, x=np.full((2, 3, 8, 8), np.inf, np.float32)), r"tensor 'c1' holds NaN on calibration sample 0"),
    "overflows_inside": (lambda p: np.savez(p, x=np.full((2, 3, 8, 8), 3e38, np.float32)), r"tensor 'c2' holds NaN on calibration sample 0"),
    "wrong_shape": (lambda p: np.savez(p, x=np.zeros((2, 3, 9, 8), np.float32)), r"shape \[1, 3, 9, 8\], the model expects \[1, 3, 8, 8\]"),
    "wrong_names": (lambda p: np.savez(p, a=np.zeros((2, 3, 8, 8), np.float32), b=np.zeros((2, 3, 8, 8), np.float32)), r"arrays \['a', 'b'\] do not name"),
    "single_npy_file": (lambda p: p.write_bytes(_npy_bytes(np.zeros((2, 3, 8, 8), np.float32))), r"one array, not an \.npz archive"),
    "empty_folder": (lambda p: _as_folder(p, {}), r"no \.npy or \.npz files"),
    "corrupt_npy": (lambda p: _as_folder(p, {"a.npy": b"x"}), r"a\.npy: not a readable numpy file"),
    "npy_header_lies": (
        lambda p: _as_folder(p, {"a.npy": b"\x93NUMPY\x01\x00\xff\xff{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }" + b" " * 600 + b"\n"}),
        r"a\.npy: not a readable numpy file",
    ),
    "npy_wrong_shape": (lambda p: _as_folder(p, {"a.npy": np.zeros(5, np.float32)}), r"shape \[5\], the model expects"),
}


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(HOSTILE_DATA))
def test_hostile_calibration_data(name, tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    make, expected = HOSTILE_DATA[name]
    make(paths["data"])
    out = tmp_path / "out.onnx"
    for cmd in ("quantize-onnx --data", "calibrate"):
        result = _check(hostile.commands(paths, out)[cmd], cmd, out, tmp_path)
        assert result.code == 2 and re.search(expected, result.stderr), result.stderr


# ---- output paths ------------------------------------------------------------------------------


def test_hostile_output_paths(tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    a_folder = tmp_path / "a_folder"
    a_folder.mkdir()
    cases = {
        "missing folder": (tmp_path / "missing" / "out.onnx", r"does not exist"),
        "folder is a file": (a_file / "out.onnx", r"does not exist"),
        "output is a folder": (a_folder, r"could not write|is a directory|Is a directory"),
    }
    for what, (out, expected) in cases.items():
        for cmd in ("quantize-onnx --ranges", "quantize-onnx --data"):
            argv = hostile.commands(paths, tmp_path / "unused.onnx")[cmd]
            argv[argv.index("-o") + 1] = str(out)
            result = _check(argv, cmd, tmp_path / "never.onnx", tmp_path)
            assert result.code == 2 and re.search(expected, result.stderr), (what, result.stderr)
    assert a_file.read_text() == "mine" and not any(a_folder.iterdir())


def test_unwritable_report_path_writes_no_model(tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    out = tmp_path / "out.onnx"
    argv = hostile.commands(paths, out)["quantize-onnx --ranges"] + ["--report", str(tmp_path / "missing" / "report.json")]
    result = _check(argv, "quantize-onnx --ranges", out, tmp_path)
    assert result.code == 2 and "does not exist" in result.stderr and not out.exists()


# ---- real processes ----------------------------------------------------------------------------


def test_real_cli_processes_exit_2_with_one_line(tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    good = paths["model"].read_bytes()
    paths["model"].write_bytes(good[: len(good) // 2])
    out = tmp_path / "out.onnx"
    cmds = hostile.commands(paths, out)
    runs = [cmds["quantize-onnx --ranges"]]
    (tmp_path / "good.onnx").write_bytes(good)
    paths["data"].write_bytes(b"PK\x03\x04 truncated")
    runs.append(["calibrate", str(tmp_path / "good.onnx"), "--data", str(paths["data"]), "-o", str(tmp_path / "r.json")])
    before = files_in(tmp_path)
    for argv in runs:
        result = run_cli_process(argv)
        assert judge(result, [], before, tmp_path) is None and result.code == 2, (argv, result.stderr)
