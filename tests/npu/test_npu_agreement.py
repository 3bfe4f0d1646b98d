"""The simulator agrees with onnxruntime on the whole test zoo, both exporters, both configs.

Criterion (per model output, compared as the int8 values its final QuantizeLinear produces):
at least 99.9 % identical and no value more than one quantization step apart. Every
intermediate quantized tensor is held to the same criterion, so a regression names its node.
"""

from __future__ import annotations

import pytest

from npu.compare import MAX_STEPS, MIN_IDENTICAL, Comparator
from tests.npu.zoo_models import zoo_feeds
from tests.zoo import ZOO

NO_INTEGER_KERNEL = {"LayerNormalization"}  # runs on the host (float) even where the target accepts it


@pytest.mark.slow
@pytest.mark.parametrize("target", [None, "warboy"], ids=["target_none", "default_config"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_agrees_with_onnxruntime(quantized_zoo, name, dynamo, target):
    model = quantized_zoo(name, dynamo, target)
    c = Comparator(model, target)
    for seed in (123, 124):
        c.add(zoo_feeds(name, seed))
    report = c.report
    for t in report.outputs:
        assert t.share >= MIN_IDENTICAL and t.max_steps <= MAX_STEPS, report.to_text()
    assert report.first_divergent is None, report.to_text()
    # integers really ran: every op the check puts on the NPU has an integer kernel here
    from npu.check import classify

    rows, _ = classify(c.sim.qm, c.sim.target)
    on_npu = {r.node for r in rows if r.placement == "npu"}
    host = {n for n, (kind, _) in c.sim.placement.items() if kind == "host"}
    op_of = {n.name: n.op_type for n in c.sim.qm.nodes}
    assert {op_of[n] for n in on_npu & host} <= NO_INTEGER_KERNEL, c.sim.placement
