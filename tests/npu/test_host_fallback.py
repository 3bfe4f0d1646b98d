"""A node the target leaves on the host, between quantized neighbours, runs in onnxruntime's
default session as the model says: onnxruntime's graph optimization finds nothing to
re-quantize, npu.check reports the node on the host with the target's reason, and the
simulator and npu.compare still agree with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import npu
import torchq
from onnx_backend import assert_valid
from onnx_backend.qmath import sqnr_db


class WideDepthwise(torch.nn.Module):
    """Expand -> ReLU6 -> depthwise (144 groups, past warboy's 128) -> ReLU6 -> project: the host
    Conv sits between two int8 Convs."""

    def __init__(self):
        super().__init__()
        self.expand = torch.nn.Conv2d(8, 144, 1)
        self.depthwise = torch.nn.Conv2d(144, 144, 3, padding=1, groups=144)
        self.project = torch.nn.Conv2d(144, 16, 1)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.expand(x))
        x = torch.nn.functional.relu6(self.depthwise(x))
        return self.project(x)


def _model() -> WideDepthwise:
    torch.manual_seed(0)
    model = WideDepthwise().eval()
    with torch.no_grad():  # channels of very different weight magnitudes, as BatchNorm folding makes them
        model.depthwise.weight.mul_(torch.logspace(-2, 1, 144).view(144, 1, 1, 1))
    return model


def _session(model, disabled=()) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))


@pytest.mark.parametrize("dynamo", [False, True])
def test_host_depthwise_runs_the_same_with_and_without_onnxruntime_weight_quantization(dynamo):
    model = _model()
    xs = [torch.rand(2, 8, 10, 10) * 4 - 1 for _ in range(6)]
    qmodel = torchq.quantize(model, xs, (xs[0],), torchq.QuantConfig(target="warboy"), input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=dynamo)
    assert_valid(qmodel)

    rows = {r.op_type + str(i): r for i, r in enumerate(npu.check(qmodel, "warboy").rows) if r.op_type == "Conv"}
    host = [r for r in rows.values() if r.placement == "host"]
    assert len(host) == 1 and "Conv groups must be <= 128 (got 144)" in host[0].reason, rows
    assert sum(r.placement == "npu" for r in rows.values()) == 2

    # the host Conv's weights are stored int8 with one scale per output channel, its bias int32
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    conv = next(n for n in qmodel.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 144 for a in n.attribute))
    w_dq, b_dq = producers[conv.input[1]], producers[conv.input[2]]
    assert w_dq.op_type == b_dq.op_type == "DequantizeLinear"
    assert inits[w_dq.input[0]].dtype == np.int8 and inits[w_dq.input[1]].shape == (144,)
    assert inits[b_dq.input[0]].dtype == np.int32

    x = np.concatenate([t.numpy() for t in xs[:3]])
    default = _session(qmodel).run(None, {"x": x})[0]
    without = _session(qmodel, ["WeightBiasQuantization"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(default, without)
    with torch.no_grad():
        assert sqnr_db(model(torch.from_numpy(x)).numpy(), default) > 30

    report = npu.compare(qmodel, [{"x": t.numpy()} for t in xs[:2]], "warboy")
    assert report.agrees, report.to_text()
    sim = npu.Simulator(qmodel, "warboy")
    assert sim.placement[conv.name][0] == "host"


def test_host_conv_whose_output_stays_float_keeps_float_weights():
    """A host Conv that writes a graph output: nothing quantizes its output, onnxruntime has no
    QuantizeLinear to fuse it with, so its weights stay float (no rounding for nothing)."""

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = torch.nn.Conv2d(8, 144, 1)
            self.depthwise = torch.nn.Conv2d(144, 144, 3, padding=1, groups=144)

        def forward(self, x):
            return self.depthwise(torch.relu(self.expand(x)))

    torch.manual_seed(0)
    model = Head().eval()
    xs = [torch.randn(1, 8, 6, 6) for _ in range(4)]
    qmodel = torchq.quantize(model, xs, (xs[0],), torchq.QuantConfig(target="warboy"), input_names=["x"], output_names=["y"], dynamo=False)
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    conv = next(n for n in qmodel.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 144 for a in n.attribute))
    assert conv.input[1] not in producers  # a float initializer
    x = xs[0].numpy()
    np.testing.assert_array_equal(_session(qmodel).run(None, {"x": x})[0], _session(qmodel, ["WeightBiasQuantization"]).run(None, {"x": x})[0])


class SelectHeads(torch.nn.Module):
    """Swin / ViT attention's `q, k, v = qkv[0], qkv[1], qkv[2]`: Gathers (host on warboy) of one
    int8 MatMul's output, each read by int8 ops."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x):
        qkv = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 16).permute(2, 0, 1, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return self.out(q * 2.0 + k * v)


@pytest.mark.parametrize("dynamo", [False, True])
def test_host_gathers_keep_their_input_scale(dynamo):
    torch.manual_seed(0)
    model = SelectHeads().eval()
    xs = [torch.randn(2, 5, 16) for _ in range(4)]
    qmodel = torchq.quantize(model, xs, (xs[0],), torchq.QuantConfig(target="warboy"), input_names=["x"], output_names=["y"], dynamo=dynamo)
    gathers = [r for r in npu.check(qmodel, "warboy").rows if r.op_type == "Gather"]
    assert len(gathers) == 3 and all(r.placement == "host" for r in gathers), gathers
    assert_valid(qmodel)  # same-scale holds on the host Gathers: their outputs take the input's grid
