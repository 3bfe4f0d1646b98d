"""Op coverage beyond the zoo (what benchmark CNNs use): small torch models quantized by
torchq (target=None: every op in int8), simulated and compared with onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchq
from npu.compare import MAX_STEPS, MIN_IDENTICAL, Comparator
from onnx_backend import assert_valid
from tests.npu.op_models import CASES


def _quantize(case, dynamo):
    torch.manual_seed(0)
    model = case.build().eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(*case.shape, generator=g),) for _ in range(4)]
    torchq.prepare(model, torchq.QuantConfig(target=None))
    torchq.calibrate(model, data)
    q, _ = torchq.export_with_report(model, data[0], dynamo=dynamo)
    torchq.unprepare(model)
    assert_valid(q)
    return q, g


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_op_runs_in_integers_and_agrees(case, dynamo):
    q, g = _quantize(case, dynamo)
    c = Comparator(q, None)
    for _ in range(2):
        c.add({q.graph.input[0].name: torch.randn(*case.shape, generator=g).numpy()})
    ran = {}
    for n in c.sim.qm.nodes:
        if n.name in c.sim.placement:
            ran.setdefault(n.op_type, set()).add(c.sim.placement[n.name][0])
    for op in case.ops:
        assert ran.get(op) == {"int8"}, (op, c.sim.placement)
    assert not [n for n, (kind, _) in c.sim.placement.items() if kind == "host"]
    report = c.report
    (out,) = report.outputs
    assert out.max_steps <= MAX_STEPS, report.to_text()
    if case.ties:
        # only the averaging node itself rounds ties differently (fed onnxruntime's inputs)
        diverging = {t.op_type for t in report.tensors if t.local_identical < t.elements}
        assert diverging <= {"AveragePool", "Resize"}, report.to_text()
        assert out.share >= 0.8  # 2x2 average: 1 window in 4 is a tie, half of those differ
    else:
        assert out.share >= MIN_IDENTICAL, report.to_text()
        assert report.first_divergent is None, report.to_text()
    assert np.isfinite(c.sim.run(c.sim._feeds({q.graph.input[0].name: np.zeros(case.shape, np.float32)}))[0]).all()
