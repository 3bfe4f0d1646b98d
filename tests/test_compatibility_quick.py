"""The quick subset of the compatibility suite (bench/compatibility.py, docs/COMPATIBILITY.md):
real torchvision / timm / HF architectures with photo BatchNorm statistics, a detection head and
YOLOX's concatenated output, through torchq's public API with the default configuration. Each
INT8 model keeps the spec (0 violations) and every output's SQNR (detectors: each output, each
part of a concatenated one) is at least onnxruntime quantize_static's (QDQ, per-channel, MinMax,
the same calibration batches) - 1 dB, in onnxruntime's default session.

The dynamo exporter costs most of the time: every model goes through dynamo=False, three of them
through dynamo too; the full table runs both on every model (`make bench`)."""

from __future__ import annotations

from functools import lru_cache

import pytest

pytest.importorskip("torchvision", reason="the compatibility suite needs torchvision (pip install -e '.[dev]')")
pytest.importorskip("timm", reason="the compatibility suite needs timm (pip install -e '.[dev]')")

from bench import compatibility as compat  # noqa: E402
from bench.compat_models import ARCHES, QUICK  # noqa: E402

# one worker runs them all: each model is built and quantized by onnxruntime once, for both exporters
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compat_quick")]
DYNAMO_TOO = ("resnet18", "yolox_s", "hf_bert")
CASES = [(name, "torchscript") for name in QUICK] + [(name, "dynamo") for name in DYNAMO_TOO]


@lru_cache(maxsize=1)  # the cases run model by model; one model held at a time
def _prepared(name: str):
    case = compat.prepare(ARCHES[name])  # the full table's samples: its rows and these agree
    assert not case.row.error, case.row.error
    peer = compat.run_tool(case, "onnxruntime")
    assert peer.ok, peer.error
    return case, peer


def test_the_quick_subset_covers_the_families():
    assert len(QUICK) >= 8 and set(DYNAMO_TOO) <= set(QUICK)
    families = {ARCHES[n].family for n in QUICK}
    assert {"torchvision", "torchvision-detection", "timm", "reference", "hf"} <= families, families


@pytest.mark.parametrize("name,exporter", sorted(CASES, key=lambda c: QUICK.index(c[0])))
def test_keeps_the_spec_and_the_sqnr_floor(name, exporter):
    case, peer = _prepared(name)
    run = compat.run_tool(case, exporter)
    assert run.ok, run.error
    assert run.violations == [], run.violations[:5]
    assert set(run.sqnr) == set(peer.sqnr) and run.sqnr, (run.sqnr, peer.sqnr)
    low = {k: (v, peer.sqnr[k]) for k, v in run.sqnr.items() if v < peer.sqnr[k] - compat.FLOOR_DB}
    assert not low, f"SQNR (ours, onnxruntime) below the floor: {low}"
    assert all(why for why in run.float_tensors.values())  # every float tensor says why
