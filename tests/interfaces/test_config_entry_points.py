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
