"""SmoothQuant with readers on the host: a post-norm transformer's residual sum runs on the host
with the LayerNorm after it (warboy), so the tensors it reads can be smoothed and the scale undone
there, exactly; the FFN output it reads (BERT's massive activation) gets its channels equalized."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import torchq
from onnx_backend import validate
from onnx_backend.planner import host_nodes
from onnx_backend.qmath import sqnr_db
from onnx_backend.quantizer import resolve_target
from onnx_backend.techniques import Options, run_pipeline
from onnx_backend.techniques.graph import outputs_on, prepare, to_proto
from onnx_backend.techniques.smoothquant import HOST_RESCALE
from tests.conftest import run_onnx
from tests.technique_nets import PostNormFFN, export, first_token_marked

FFN_OUT = "/fc2/Add_output_0"  # the torchscript exporter's name for fc2's output (after its bias)


@pytest.fixture(scope="module")
def block():
    model = PostNormFFN()
    calib, test = first_token_marked(6), first_token_marked(2, seed=9)
    return model, export(model, (torch.from_numpy(calib[0][0]),)), calib, test


def _sqnr(proto, qmodel, test) -> float:
    return min(sqnr_db(run_onnx(proto, {"x": t[0]})[0], run_onnx(qmodel, {"x": t[0]})[0]) for t in test)


def _scale_of(qmodel: onnx.ModelProto, tensor: str) -> float:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    q = next(n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(inits[q.input[1]])


def test_the_residual_sum_and_layer_norm_are_host_nodes_before_any_range(block):
    _, proto, _, _ = block
    host = host_nodes(prepare(proto), supports=resolve_target("warboy"))
    assert {"/ln1/LayerNormalization", "/ln2/LayerNormalization", "/Add_1"} <= host
    assert not {"/fc1/MatMul", "/fc2/MatMul"} & host
    assert "/Add_1" not in host_nodes(prepare(proto), supports=resolve_target(None))


def test_host_readers_get_the_scale_back_and_the_ffn_output_is_equalized(block):
    _, proto, calib, test = block
    plain = run_pipeline(proto, calib, Options(target="warboy"))
    smooth = run_pipeline(proto, calib, Options(target="warboy", smoothquant="auto"))
    groups = smooth.report.steps["smoothquant"]["groups"]
    # the FFN output: only the host residual Add reads it, its channels are equalized
    assert groups[FFN_OUT]["alpha"] == "equalize" and groups[FFN_OUT]["host_readers"] == ["/Add_1"]
    assert groups[FFN_OUT]["error_after"] < groups[FFN_OUT]["error_before"] / 2
    # the LayerNorm output read by fc1 (int8) and by the residual Add (host)
    ln1 = groups["/ln1/LayerNormalization_output_0"]
    assert ln1["readers"] == ["/fc1/MatMul"] and ln1["host_readers"] == ["/Add_1"]
    # the smoothed float graph computes the same function
    feeds = [{"x": t[0]} for t in test]
    for a, b in zip(outputs_on(to_proto(prepare(proto)), feeds), outputs_on(smooth.float_model(), feeds)):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-4 * np.max(np.abs(a[0])))
    (qplain, _), (qsmooth, report) = plain.quantize(), smooth.quantize()
    assert not validate(qsmooth)
    rescales = [n for n in qsmooth.graph.node if n.name.endswith("_smoothquant_rescale")]
    assert len(rescales) == 2 and all(report.float_nodes[n.name] == HOST_RESCALE for n in rescales)
    readers = {n.name: n.op_type for n in qsmooth.graph.node if any(i == r.output[0] for r in rescales for i in n.input)}
    assert set(readers.values()) == {"Add"} and "/Add_1" in report.float_nodes  # on the host, no Q/DQ after
    # one int8 scale for the FFN output, now fitted to its ordinary channels
    assert _scale_of(qsmooth, FFN_OUT) < _scale_of(qplain, FFN_OUT) / 20
    assert _sqnr(proto, qsmooth, test) > _sqnr(proto, qplain, test) + 1.0


def test_without_host_readers_nothing_is_rescaled(block):
    """target None runs the residual Add in int8: no reader on the host, no rescale, and the FFN
    output (read by an int8 Add) is not smoothed."""
    _, proto, calib, _ = block
    smooth = run_pipeline(proto, calib, Options(target=None, smoothquant="auto"))
    steps = smooth.report.steps["smoothquant"]
    assert FFN_OUT not in steps["groups"] and FFN_OUT in steps["skipped"]
    assert not any(n.name.endswith("_smoothquant_rescale") for n in smooth.model.graph)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_the_torch_path_smooths_into_the_host(block, dynamo):
    model, _, calib, test = block
    loader = [torch.from_numpy(c[0]) for c in calib]
    example = (loader[0],)
    qplain = torchq.quantize(model, loader, example, torchq.QuantConfig(), dynamo=dynamo, input_names=["x"], output_names=["y"])
    qsmooth = torchq.quantize(model, loader, example, torchq.QuantConfig(smoothquant="auto"), dynamo=dynamo, input_names=["x"], output_names=["y"])
    assert not validate(qsmooth)
    assert sum(n.name.endswith("_smoothquant_rescale") for n in qsmooth.graph.node) == 2
    with torch.no_grad():
        refs = [model(torch.from_numpy(t[0])).numpy() for t in test]

    def score(q):
        return min(sqnr_db(r, run_onnx(q, {"x": t[0]})[0]) for r, t in zip(refs, test))

    assert score(qsmooth) > score(qplain) + 1.0
