"""Quantization-aware fine-tuning (torchq.prepare_qat): the fake-quantized forward is the
exported INT8 model's arithmetic, before and after training, with both exporters."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import torchq
from npu.compare import MAX_STEPS, MIN_IDENTICAL, Comparator
from onnx_backend.errors import ConfigError
from tests.zoo import ZOO
from torchq.qat import distill

MODELS = ["conv_bn_relu", "inception", "depthwise_separable", "squeeze_excitation", "transformer_block", "torch_encoder_layer", "unet"]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _output_steps(model: onnx.ModelProto) -> dict[str, float | None]:
    """Each graph output's quantization step (the scale of the DequantizeLinear writing it), or
    None for an output computed in float."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    steps = {}
    for out in model.graph.output:
        node = producer.get(out.name)
        steps[out.name] = float(inits[node.input[1]]) if node is not None and node.op_type == "DequantizeLinear" else None
    return steps


def _qat_model(name: str, dynamo: bool):
    entry = ZOO[name]
    model = entry.model()
    float_model = copy.deepcopy(model)
    torchq.prepare(model, torchq.QuantConfig())
    torchq.calibrate(model, entry.calibration(), quiet=True)
    torchq.prepare_qat(model, torchq.QATConfig(dynamo=dynamo), example_inputs=entry.calibration()[0])
    return entry, model, float_model


def _train(model, float_model, batches, steps=4):
    """A few large steps, so weights and scales move away from the calibrated ones."""
    state = model.torchq_qat
    scales = {id(p) for p in state.scale_parameters()}
    opt = torch.optim.Adam([
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in scales], "lr": 1e-3},
        {"params": state.scale_parameters(), "lr": 3e-2},
    ])
    before = [p.detach().clone() for p in state.scale_parameters()]
    for i in range(steps):
        x = batches[i % len(batches)]
        with torch.no_grad():
            target = float_model(*x)
        out = model(*x)
        out, target = (out if isinstance(out, tuple) else (out,)), (target if isinstance(target, tuple) else (target,))
        loss = sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(out, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = sum(not torch.equal(a, b.detach()) for a, b in zip(before, state.scale_parameters()))
    return moved


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", MODELS)
def test_fake_quantized_forward_is_the_exported_model(name, dynamo):
    entry, model, float_model = _qat_model(name, dynamo)
    binding = model.torchq_qat.binding
    assert not binding.unbound, binding.unbound
    assert binding.weights, "no weight was bound"
    moved = _train(model, float_model, entry.calibration())
    assert moved > 0, "training moved no scale: the LSQ gradient does not reach the scales"
    example = entry.calibration()[0]
    qmodel, report = torchq.export_with_report(model, example, dynamo=dynamo, input_names=entry.input_names, output_names=entry.output_names)
    assert report.techniques["qat"]["unbound"] == {}
    steps = _output_steps(qmodel)
    session = _session(qmodel)
    for seed in (5, 6):
        inputs = entry.inputs(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch_out = model(*inputs)
        torch_out = torch_out if isinstance(torch_out, tuple) else (torch_out,)
        ort_out = session.run(None, {n: t.numpy() for n, t in zip(entry.input_names, inputs)})
        for out_name, y, o in zip(entry.output_names, torch_out, ort_out):
            diff = np.abs(y.numpy() - o)
            step = steps[out_name]
            if step is not None:  # a quantized output: within one step, nearly all identical
                assert diff.max() <= step * (1 + 1e-5), f"{out_name}: {diff.max()} > one step {step}"
                assert np.mean(diff > step / 2) < 1e-2
            else:  # a float output (the Linear head on the host): float rounding only
                assert diff.max() <= 1e-4 * max(1.0, float(np.abs(o).max())), f"{out_name}: {diff.max()}"


def test_export_uses_the_learned_scales():
    entry, model, float_model = _qat_model("conv_bn_relu", True)
    _train(model, float_model, entry.calibration())
    state = model.torchq_qat
    qmodel = torchq.export(model, entry.calibration()[0], input_names=entry.input_names, output_names=entry.output_names)
    inits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    per_channel = [a for n, a in inits.items() if n.endswith("_scale") and a.ndim == 1 and a.size > 1]
    learned = [state.weight_scale(k).detach().numpy() for k in state.weight_keys]
    for w in learned:  # every learned weight scale vector is in the model, exactly
        assert any(a.shape == w.shape and np.array_equal(a, w.astype(np.float32)) for a in per_channel), w
    learned_act = {round(state.activation_range(i)[1] - state.activation_range(i)[0], 6) for i in range(len(state.binding.activations))}
    exported_act = {round(float(a) * 255, 6) for n, a in inits.items() if n.endswith("_scale") and a.ndim == 0}
    assert learned_act & exported_act


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_simulator_agrees_with_the_qat_export(dynamo):
    entry, model, float_model = _qat_model("residual", dynamo)
    _train(model, float_model, entry.calibration())
    qmodel = torchq.export(model, entry.calibration()[0], dynamo=dynamo, input_names=entry.input_names, output_names=entry.output_names)
    c = Comparator(qmodel, "warboy")
    for seed in (123, 124):
        inputs = entry.inputs(torch.Generator().manual_seed(seed))
        c.add({n: t.numpy() for n, t in zip(entry.input_names, inputs)})
    for t in c.report.outputs:
        assert t.share >= MIN_IDENTICAL and t.max_steps <= MAX_STEPS, c.report.to_text()


def test_distill_never_ends_worse_than_ptq():
    entry, model, float_model = _qat_model("depthwise_separable", True)
    data = ZOO["depthwise_separable"].calibration(10, seed=3)
    good = distill(model, float_model, data, steps=6, lr=1e-4, eval_every=2)
    assert good.best <= good.start and good.history[0] == (0, good.start)
    # a learning rate that wrecks the model: the held-back check keeps the start
    entry, model, float_model = _qat_model("depthwise_separable", True)
    before = copy.deepcopy(model.state_dict())
    bad = distill(model, float_model, data, steps=4, lr=10.0, scale_lr=10.0, eval_every=1)
    assert max(d for _, d in bad.history[1:]) > bad.start  # it did get worse
    assert bad.best_step == 0 and bad.best == bad.start
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip_and_unprepare():
    entry, model, float_model = _qat_model("residual", True)
    _train(model, float_model, entry.calibration())
    saved = copy.deepcopy(model.state_dict())
    assert any(k.startswith("torchq_qat.") for k in saved)
    x = entry.calibration()[1]
    with torch.no_grad():
        y = model(*x)
    _, other, _ = _qat_model("residual", True)  # prepared again from scratch, then loaded
    other.load_state_dict(saved)
    with torch.no_grad():
        assert torch.equal(other(*x), y)
    torchq.unprepare(other)
    assert not hasattr(other, "torchq_qat")
    assert set(other.state_dict()) == {k for k in saved if not k.startswith("torchq_qat.")}
    with torch.no_grad():
        plain = copy.deepcopy(other)
        assert torch.equal(other(*x), plain(*x))


def test_bad_calls_say_what_is_wrong():
    model = ZOO["residual"].model()
    with pytest.raises(ConfigError, match="calibrated model"):
        torchq.prepare_qat(model, example_inputs=ZOO["residual"].calibration()[0])
    with pytest.raises(ConfigError, match="QATConfig"):
        torchq.QATConfig  # noqa: B018
        from torchq.qat.config import make_qat_config

        make_qat_config({"stepz": 3})
    torchq.prepare(model, torchq.QuantConfig(bias_correction=True))
    torchq.calibrate(model, ZOO["residual"].calibration(), quiet=True)
    with pytest.raises(ConfigError, match="techniques"):
        torchq.prepare_qat(model, example_inputs=ZOO["residual"].calibration()[0])


def test_recipe_qat_section_fine_tunes_and_exports(tmp_path):
    from torchq.recipe_run import run_recipe
    from torchq.recipes import Recipe

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    recipe = Recipe.load(root / "recipes" / "digits.yaml", overrides=["qat.steps=4", "qat.eval_every=2", "calibration.kwargs.num_samples=192", f"export.path={tmp_path / 'd.int8.onnx'}", "export.float_path=null", f"model.kwargs.cache_dir={root / 'out' / 'digits'}"])
    result = run_recipe(recipe, evaluate=False)
    qat = result.export_report.techniques["qat"]
    assert qat["distill"]["steps"] == 4 and qat["distill"]["best"] <= qat["distill"]["start"]
    assert qat["unbound"] == {} and qat["weights"] >= 2
    assert result.onnx_path.is_file() and not result.violations
