"""torchq.report: float vs INT8, tensor by tensor, on real models and real onnxruntime runs."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from onnx_backend.errors import InvalidModelError
from onnx_backend.qmath import sqnr_db
from tests.conftest import run_onnx
from torchq.commands._common import iter_samples
from torchq.report import compare
from torchq.report_render import write_report


def samples(path, batch=32):
    return list(iter_samples(str(path), ["image"], batch))


@pytest.fixture(scope="module")
def clipped_report(digits_models):
    return compare(digits_models["float"], digits_models["clipped"], samples(digits_models["data"]), top=3)


def test_output_sqnr_matches_a_direct_computation(digits_models, clipped_report):
    x = np.load(digits_models["data"])["image"]
    (f,) = run_onnx(str(digits_models["float"]), {"image": x})
    (q,) = run_onnx(str(digits_models["clipped"]), {"image": x})
    logits = next(t for t in clipped_report.tensors if t.name == "logits")
    assert logits.sqnr_db == pytest.approx(sqnr_db(f, q), abs=1e-3)


def test_the_input_has_no_upstream_error(clipped_report):
    image = next(t for t in clipped_report.tensors if t.name == "image")
    assert image.sqnr_db == pytest.approx(image.own_sqnr_db) and image.clipped == 0


def test_worst_first_and_the_culprit_is_found(clipped_report):
    acts = clipped_report.worst()
    assert [t.sqnr_db for t in acts] == sorted(t.sqnr_db for t in acts)
    # the override clips the first ReLU output hard: it is the worst by its own quantization ...
    culprit = clipped_report.worst(1, own=True)[0]
    assert culprit.clipped > 0.05 and culprit.op_type == "Conv"
    # ... the layer that loses the most SQNR is the one that produces it ...
    assert clipped_report.layers[0].output == culprit.name and clipped_report.layers[0].lost_db > 20
    # ... and min-max would not clip it at all, with a far better SQNR
    by_method = {m.method: m for m in clipped_report.method_ranges[culprit.name]}
    assert by_method["min_max"].clipped == 0 and by_method["min_max"].sqnr_db > culprit.own_sqnr_db + 20
    assert by_method["percentile"].clipped < culprit.clipped  # the default 99.99 % keeps far more


def test_mse_model_is_better_than_the_clipped_model(digits_models, clipped_report):
    mse = compare(digits_models["float"], digits_models["mse"], samples(digits_models["data"]), top=1)
    out = {r.name: r for r in mse.tensors}["logits"]
    assert out.sqnr_db > {r.name: r for r in clipped_report.tensors}["logits"].sqnr_db + 10
    weights = mse.worst(kind="weight")
    assert weights and all(w.sqnr_db > 30 and w.clipped == 0 and w.per_channel for w in weights)


def test_written_report(tmp_path, clipped_report):
    files = write_report(clipped_report, tmp_path / "r")
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"report.md", "report.html", "report.json", "sqnr_per_layer.png"} <= names
    assert sum(n.startswith("hist_") for n in names) == 3
    for p in files.values():
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "![per-layer SQNR](sqnr_per_layer.png)" in md and "## Layers that lose the most" in md
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("<img") == 4 and "<table>" in html
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(data["tensors"]) == len(clipped_report.tensors)
    assert set(data["method_ranges"]) == set(clipped_report.method_ranges)
    assert not math.isnan(data["layers"][0]["lost_db"])


def test_a_float_model_as_int8_is_a_clear_error(digits_models):
    with pytest.raises(InvalidModelError, match="no QuantizeLinear/DequantizeLinear pairs"):
        compare(digits_models["float"], digits_models["float"], samples(digits_models["data"]))


def test_works_on_another_tools_qdq_model(tmp_path, digits_models):
    """A QDQ model from onnxruntime's own quantizer: tensors are matched by name too."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"image": s[0]} for s in samples(digits_models["data"]))

        def get_next(self):
            return next(self.it, None)

    src = tmp_path / "float.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(digits_models["float"])), src)
    quantize_static(str(src), str(tmp_path / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    report = compare(src, tmp_path / "ort.onnx", samples(digits_models["data"]), top=2)
    assert len(report.worst()) >= 5 and report.worst(kind="weight")
    assert all(math.isfinite(t.sqnr_db) and t.sqnr_db > 10 for t in report.worst())
