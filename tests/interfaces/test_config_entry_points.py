"""One configuration behind every entry point: Python, a recipe, `--set`, the Lightning callback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import onnx
import pytest

import torchq
from torchq.recipes import Recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


def zero_point_types(model: onnx.ModelProto) -> set[int]:
    """Element types of the activation zero points of a QDQ model's QuantizeLinear nodes."""
    inits = {i.name: i for i in model.graph.initializer}
    return {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}


def test_python_and_a_recipe_have_the_same_defaults():
    # every field, opset included (it was 20 from Python and 18 from a recipe)
    assert Recipe.from_dict({}).quant_config() == torchq.QuantConfig()


def test_activation_dtype_from_a_recipe_file_and_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        extends: {RECIPES / 'digits.yaml'}
        quantization: {{activation_dtype: uint8}}
        evaluation: null
        """))
    assert Recipe.load(recipe).quant_config().activation_dtype == "uint8"
    result = Recipe.load(recipe, overrides=["calibration.num_batches=1", "export.path=m.onnx"]).run(quiet=True)
    assert zero_point_types(onnx.load(result.onnx_path)) == {onnx.TensorProto.UINT8}
    back = Recipe.load(recipe, overrides=["quantization.activation_dtype=int8"]).quant_config()
    assert back.activation_dtype == "int8"


def test_sqnr_gamma_reaches_the_calibrator_and_the_cli(tmp_path, digits_models):
    import numpy as np

    from onnx_backend import Calibrator, load_ranges, optimize_model
    from onnx_backend.range_selection import select_range
    from torchq.cli import main

    model = optimize_model(str(digits_models["float"]))
    images = np.load(digits_models["data"])["image"][:32]
    ranges = {}
    for gamma in (0.5, 8.0):
        cal = Calibrator(model, "sqnr_asym", sqnr_gamma=gamma, quiet=True)
        cal.collect_data([x[None]] for x in images)
        ranges[gamma] = cal.compute_range()
        name = next(iter(ranges[gamma]))
        assert ranges[gamma][name] == select_range(cal.statistics[name], "sqnr", False, sqnr_gamma=gamma)
    assert ranges[0.5] != ranges[8.0]  # the weight of clipping noise changes some range
    np.savez(tmp_path / "calib.npz", image=images)
    assert main(["--quiet", "calibrate", str(digits_models["float"]), "--data", str(tmp_path / "calib.npz"), "--method", "sqnr_asym", "--sqnr-gamma", "0.5", "-o", str(tmp_path / "r.json")]) == 0
    assert {k: tuple(v) for k, v in load_ranges(tmp_path / "r.json").items()} == {k: tuple(v) for k, v in ranges[0.5].items()}
    with pytest.raises(torchq.ConfigError, match="sqnr_gamma"):
        Calibrator(model, "sqnr_asym", sqnr_gamma=0.0)


def _excluded(report) -> set[str]:
    return {node for node, why in report.float_nodes.items() if why == "excluded by configuration"}


def test_exclude_nodes_means_onnx_nodes_on_both_paths_and_exclude_means_modules(digits_models):
    import numpy as np
    import torch

    from torchq.examples import digits

    images = np.load(digits_models["data"])["image"][:16]
    config = torchq.QuantConfig(exclude_nodes=["MaxPool"])
    # PyTorch path: the exported graph's MaxPool nodes stay float
    model = digits.load_trained(digits_models["dir"])
    torchq.prepare(model, config)
    try:
        model(torch.from_numpy(images))
        qmodel, report = torchq.export_with_report(model, torch.from_numpy(images[:1]))
    finally:
        torchq.unprepare(model)
    pools = {n.name for n in qmodel.graph.node if n.op_type == "MaxPool"}
    assert pools and _excluded(report.backend) == pools
    # ONNX path: the same field, the same meaning
    qmodel, report = torchq.quantize_onnx(str(digits_models["float"]), [[x[None]] for x in images], config)
    pools = {n.name for n in qmodel.graph.node if n.op_type == "MaxPool"}
    assert pools and _excluded(report.quantization) == pools
    # module globs on an ONNX model would match nothing: refused, naming the field to use
    for bad in ({"exclude": ["features.2"]}, {"overrides": [{"pattern": "features.2", "float": True}]}):
        with pytest.raises(torchq.ConfigError, match=r"name PyTorch module paths.*exclude_nodes=\["):
            torchq.quantize_onnx(str(digits_models["float"]), [[images[:1]]], bad)


# ---- every field through every door --------------------------------------------------------------

# Values the automatic choice below cannot make up (structured fields)
STRUCTURED = {"overrides": ({"pattern": "features.*", "method": "min_max", "float": True},), "exclude": ("head",), "exclude_nodes": ("Softmax",), "target": "tflite"}


def non_default_value(name: str):
    """A valid value other than the field's default, so that a door dropping the field shows."""
    import typing

    field = torchq.QuantConfig.model_fields[name]
    default = field.default
    candidates = [STRUCTURED[name]] if name in STRUCTURED else []
    if isinstance(default, bool):
        candidates.append(not default)
    literals = [a for arg in typing.get_args(field.annotation) or (field.annotation,) for a in (typing.get_args(arg) if typing.get_origin(arg) is typing.Literal else ())]
    if typing.get_origin(field.annotation) is typing.Literal:
        literals += list(typing.get_args(field.annotation))
    candidates += [v for v in literals if v != default]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        candidates += [type(default)(default * 2), type(default)(default // 2 if isinstance(default, int) else default / 2), default - 1, default + 1]
    if default is None:
        candidates += [0.5, 1, "auto", True]
    for value in candidates:
        try:
            if torchq.QuantConfig(**{name: value}) != torchq.QuantConfig():
                return value
        except Exception:  # noqa: BLE001 -- not a valid value for this field; try the next
            continue
    raise AssertionError(f"QuantConfig.{name}: no non-default sample value; add one to STRUCTURED in this test")


def recipe_key(name: str) -> str:
    return {"opset": "export.opset", "target": "target"}.get(name, f"quantization.{name}")


def nest(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def as_yaml(value) -> str:
    import yaml

    plain = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(plain, default_flow_style=True).strip().removesuffix("...").strip()


@pytest.mark.parametrize("name", list(torchq.QuantConfig.model_fields))
def test_every_field_reaches_every_entry_point(name, tmp_path):
    from torchq.cli import build_parser
    from torchq.commands.quantize_onnx import config_from_args
    from torchq.lightning import QuantizationCallback

    value = non_default_value(name)
    python = torchq.QuantConfig(**{name: value})
    key = recipe_key(name)
    # a recipe mapping, a recipe file, and --set on a recipe file
    assert Recipe.from_dict(nest(key, value)).quant_config() == python
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"{key.split('.')[0]}: {as_yaml(nest(key, value)[key.split('.')[0]])}\n")
    assert Recipe.load(recipe_file).quant_config() == python
    (tmp_path / "empty.yaml").write_text("name: empty\n")
    assert Recipe.load(tmp_path / "empty.yaml", overrides=[f"{key}={as_yaml(value)}"]).quant_config() == python
    # the resolved recipe, dumped and read back
    assert Recipe.from_dict(Recipe.load(recipe_file).to_dict()).quant_config() == python
    # the ONNX command line: --set FIELD=VALUE
    args = build_parser().parse_args(["quantize-onnx", "m.onnx", "--data", "d.npz", "-o", "q.onnx", "--set", f"{name}={as_yaml(value)}"])
    assert config_from_args(args) == python
    # the Lightning callback: a dict of fields, a recipe, and export={"opset": N}
    assert QuantizationCallback({name: value}).config == python
    assert QuantizationCallback(Recipe.from_dict(nest(key, value))).config == python
    if name == "opset":
        assert QuantizationCallback(None, export={"opset": value}).config == python


def test_the_cli_shorthand_flags_are_the_same_fields():
    from torchq.cli import build_parser
    from torchq.commands.quantize_onnx import config_from_args

    base = ["quantize-onnx", "m.onnx", "--data", "d.npz", "-o", "q.onnx"]
    parse = build_parser().parse_args
    assert config_from_args(parse(base)) == torchq.QuantConfig()  # the command's defaults are QuantConfig's
    flags = ["--method", "entropy_sym", "--percentile", "99.5", "--sqnr-gamma", "2", "--per-tensor", "--activation-dtype", "uint8", "--target", "all",
             "--exclude", "Softmax", "--equalization", "--bias-correction", "--adaround", "--adaround-iterations", "7", "--smoothquant", "0.5", "--attention-masks"]
    want = torchq.QuantConfig(method="entropy", symmetric=True, percentile=99.5, sqnr_gamma=2.0, per_channel=False, activation_dtype="uint8", target=None,
                              exclude_nodes=["Softmax"], equalization=True, bias_correction=True, adaround=True, adaround_iterations=7, smoothquant=0.5, attention_masks=True)
    assert config_from_args(parse(base + flags)) == want
    assert config_from_args(parse(base + ["--auto-method"])).method == "auto"
    with pytest.raises(torchq.ConfigError, match="not a QuantConfig field"):
        config_from_args(parse(base + ["--set", "methd=mse"]))


def test_the_technique_pipeline_options_are_quantconfig_fields():
    import dataclasses

    from onnx_backend.techniques.pipeline import Options
    from torchq.techniques.pipeline import PIPELINE_ONLY, options_from_config

    assert {f.name for f in dataclasses.fields(Options)} - set(PIPELINE_ONLY) <= set(torchq.QuantConfig.model_fields)
    cfg = torchq.QuantConfig(method="sqnr", sqnr_gamma=2.0, histogram_bins=1024, smoothquant=0.5, opset=17)
    options = options_from_config(cfg)
    assert (options.method, options.sqnr_gamma, options.histogram_bins, options.smoothquant, options.opset) == ("sqnr", 2.0, 1024, 0.5, 17)
