"""The PyTorch frontend's promises: nothing lost, nothing surprising, clear errors."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchq
from onnx_backend import assert_valid
from onnx_backend.qmath import sqnr_db
from tests.conftest import run_onnx
from tests.zoo import ZOO


def calibrated(entry_name="residual", config=None):
    entry = ZOO[entry_name]
    model = entry.model()
    torchq.prepare(model, config)
    torchq.calibrate(model, entry.calibration())
    return entry, model


def test_unprepare_restores_the_model_exactly():
    entry = ZOO["squeeze_excitation"]
    model = entry.model()
    x = entry.calibration()[0]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_out = model(*x)
    before_attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    torchq.prepare(model)
    torchq.calibrate(model, entry.calibration())
    torchq.export(model, x)
    torchq.unprepare(model)
    after = model.state_dict()
    assert before_state.keys() == after.keys() and all(torch.equal(before_state[k], after[k]) for k in after)
    assert torch.equal(model(*x), before_out)
    for name, m in model.named_modules():
        assert set(vars(m)) == before_attrs[name]
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not torchq.is_prepared(model)


def test_same_inputs_give_a_byte_identical_file(tmp_path):
    paths = []
    for i in range(2):
        entry, model = calibrated("inception")
        paths.append(tmp_path / f"m{i}.onnx")
        torchq.export(model, entry.calibration()[0], paths[-1])
        torchq.unprepare(model)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_output_written_atomically_and_returned(tmp_path):
    entry, model = calibrated()
    path = tmp_path / "out.int8.onnx"
    qmodel = torchq.export(model, entry.calibration()[0], path)
    assert onnx.load(path) == qmodel
    assert [p.name for p in tmp_path.iterdir()] == ["out.int8.onnx"]  # no temporary left behind


def test_unwritable_output_path_writes_nothing(tmp_path):
    entry, model = calibrated()
    taken = tmp_path / "taken.onnx"
    taken.mkdir()  # a folder where the file should go: not writable, even for root
    with pytest.raises(torchq.OutputPathError, match="nothing was written"):
        torchq.export(model, entry.calibration()[0], taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"] and not any(taken.iterdir())


def test_read_only_folder_writes_nothing(tmp_path):
    entry, model = calibrated()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write to read-only folders (root)")
        with pytest.raises(torchq.OutputPathError, match="not writable"):
            torchq.export(model, entry.calibration()[0], locked / "m.onnx")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(stat.S_IRWXU)
    with pytest.raises(torchq.OutputPathError, match="does not exist"):
        torchq.export(model, entry.calibration()[0], tmp_path / "missing" / "m.onnx")


def test_export_before_calibration_is_an_error():
    model = ZOO["residual"].model()
    torchq.prepare(model)
    with pytest.raises(torchq.CalibrationError, match="before any calibration batch"):
        torchq.export(model, ZOO["residual"].calibration()[0])
    torchq.unprepare(model)


def test_nan_in_calibration_names_the_tensor():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).log()  # log of negatives: NaN

    model = torchq.prepare(Bad())
    with pytest.raises(torchq.CalibrationError, match=r"NaN in tensor '<model>:log'"):
        model(torch.randn(1, 3, 4, 4))
    torchq.unprepare(model)


def test_example_inputs_that_do_not_fit_are_an_error():
    entry, model = calibrated()
    with pytest.raises(torchq.ConfigError, match="example_inputs do not fit the model"):
        torchq.export(model, torch.randn(1, 5, 16, 16))
    torchq.unprepare(model)


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(torchq.ConfigError, match="method.*'min_max', 'percentile', 'mse', 'entropy', 'sqnr' or 'auto'"):
        torchq.prepare(ZOO["residual"].model(), method="kl")
    with pytest.raises(torchq.ConfigError, match="unknown key"):
        torchq.QuantConfig  # noqa: B018
        torchq.prepare(ZOO["residual"].model(), {"methd": "mse"})


def test_an_op_the_target_cannot_run_stays_float_and_is_reported():
    class WithCumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return F.relu(self.conv(x)).cumsum(dim=1)

    model = torchq.prepare(WithCumsum())
    xs = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    torchq.calibrate(model, xs)
    qmodel, report = torchq.export_with_report(model, xs[0])
    torchq.unprepare(model)
    cumsum = [n for n in report.backend.float_nodes if "umsum" in n.lower() or "CumSum" in n]
    assert cumsum and "not supported by warboy" in report.backend.float_nodes[cumsum[0]]
    with torch.no_grad():
        assert sqnr_db(model(xs[1]).numpy(), run_onnx(qmodel, {qmodel.graph.input[0].name: xs[1].numpy()})[0]) > 30


class Functional(nn.Module):
    """Every functional op of the issue's list, none of them in a module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y = F.relu(self.conv(x))
        y = y + torch.sigmoid(y)
        y = torch.cat([y, F.silu(y)], dim=1)[:, :8]
        y = F.hardswish(F.interpolate(y, scale_factor=2.0, mode="nearest"))
        t = y.flatten(2).permute(0, 2, 1)
        t = F.layer_norm(t, (8,))
        t = F.gelu(self.proj(t))
        att = torch.softmax(torch.matmul(t, t.transpose(1, 2)), dim=-1)
        return (att @ t).view(t.shape[0], -1)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_functional_ops_get_quantization_parameters(dynamo):
    model = torchq.prepare(Functional().eval(), target=None)
    xs = [torch.randn(2, 3, 6, 6) for _ in range(4)]
    torchq.calibrate(model, xs)
    qmodel, report = torchq.export_with_report(model, xs[0], dynamo=dynamo)
    torchq.unprepare(model)
    assert_valid(qmodel)
    assert report.float_tensors == {}
    keys = {k.split(":")[1].split("#")[0] for ks in report.keys_of_tensor.values() for k in ks}
    assert {"add", "cat", "interpolate", "softmax", "sigmoid", "silu", "hardswish", "gelu", "layer_norm", "matmul", "relu", "view", "flatten", "permute"} <= keys
    with torch.no_grad():
        # 20 dB, not 30: the spec fixes Softmax's output step at 1/256, coarse next to attention
        # probabilities of about 1/144 over this model's 144 positions.
        assert sqnr_db(model(xs[1]).numpy(), run_onnx(qmodel, {qmodel.graph.input[0].name: xs[1].numpy()})[0]) > 20


def test_keyword_inputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, *, scale):
            return self.fc(x) * scale

    model = torchq.prepare(KW())
    data = [{"x": torch.randn(2, 4), "scale": torch.rand(2, 1) + 0.5} for _ in range(4)]
    torchq.calibrate(model, data)
    qmodel = torchq.export(model, (data[0]["x"],), kwargs={"scale": data[0]["scale"]})
    torchq.unprepare(model)
    assert_valid(qmodel)
    feeds = {i.name: v.numpy() for i, v in zip(qmodel.graph.input, (data[1]["x"], data[1]["scale"]))}
    assert sqnr_db(model(**data[1]).detach().numpy(), run_onnx(qmodel, feeds)[0]) > 30


@pytest.mark.parametrize("dynamo", [True, False])
def test_output_names_that_clash_with_inner_values(dynamo):
    # torch's dynamo exporter names an nn.Embedding's output `embedding`; asking for an output of
    # that name made it write a duplicate (invalid ONNX). The user's names win; inner values move.
    class Embedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(16, 8)
            self.linear = nn.Linear(8, 8)

        def forward(self, ids):
            return F.normalize(self.linear(self.embedding(ids)).mean(1), dim=-1)

    ids = torch.randint(0, 16, (4, 5))
    model = torchq.prepare(Embedder().eval())
    torchq.calibrate(model, [ids])
    qmodel = torchq.export(model, (ids,), input_names=["linear"], output_names=["embedding"], dynamo=dynamo)
    torchq.unprepare(model)
    assert_valid(qmodel)
    assert [o.name for o in qmodel.graph.output] == ["embedding"] and [i.name for i in qmodel.graph.input] == ["linear"]
    produced = [name for node in qmodel.graph.node for name in node.output]
    assert len(produced) == len(set(produced))
    assert sqnr_db(model(ids).detach().numpy(), run_onnx(qmodel, {"linear": ids.numpy()})[0]) > 25


def test_calibration_data_forms():
    entry = ZOO["residual"]
    xs = [c[0] for c in entry.calibration(4)]
    loader = DataLoader(TensorDataset(torch.cat(xs), torch.zeros(len(xs) * 2, dtype=torch.long)), batch_size=2)
    for data in (xs, [(x,) for x in xs], loader):  # tensors, tuples, (inputs, target) pairs
        model = entry.model()
        q = torchq.quantize(model, data, xs[0])
        assert_valid(q)
        assert not torchq.is_prepared(model)
    with pytest.raises(torchq.CalibrationError, match="empty"):
        torchq.quantize(entry.model(), [], xs[0])


def test_interrupted_calibration_leaves_the_model_usable():
    entry = ZOO["residual"]
    model = entry.model()
    x = entry.calibration()[0][0]
    reference = model(x)
    torchq.prepare(model)

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = model.conv2.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    model(x)  # still works, still observing
    torchq.unprepare(model)
    assert torch.equal(model(x), reference)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_exclude_keeps_modules_in_float():
    entry = ZOO["flatten_linear"]
    _, model = calibrated("flatten_linear", torchq.QuantConfig(exclude=("fc2",)))
    qmodel, report = torchq.export_with_report(model, entry.calibration()[0])
    torchq.unprepare(model)
    assert_valid(qmodel)
    float_nodes = " ".join(report.backend.float_nodes)
    assert "fc2" in float_nodes or any("excluded" in why for why in report.backend.float_nodes.values())
    weights = [n for n in qmodel.graph.node if n.op_type in ("Gemm", "MatMul")]
    quantized_weights = [n for n in weights if any(i.endswith("_dequantized") and "weight" in i for i in n.input)]
    assert len(quantized_weights) == len(weights) - 1


def test_prepare_twice_is_an_error():
    model = torchq.prepare(ZOO["residual"].model())
    with pytest.raises(torchq.ConfigError, match="already prepared"):
        torchq.prepare(model)
    torchq.unprepare(model)
