"""Regression tests for the spine bugs the reliability properties and the fuzzer found.

Each test names the bug it pins; docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import numpy as np
import torch

from onnx_backend.statistics import TensorStatistics
from torchq.observer import Observer


def test_negative_value_whose_scaled_bin_underflows_lands_in_bin_minus_one():
    # Bug: with bins 2**e wide (e > 0), x * 2**-e underflows to -0.0 for a tiny negative x, so
    # floor() put it in bin 0 while the exact bin is -1: TensorStatistics.update crashed with a
    # broadcast error and the torch observer built a different histogram.
    x = np.array([-1e38, -1e-40], np.float32)
    s = TensorStatistics()
    s.update(x)
    assert s.counts.sum() == 2 and s.counts[-1] == 1  # the tiny value is in the last bin, -1
    assert s.offset + s.counts.size == 0
    obs = Observer("k", 4096)
    obs.update(torch.from_numpy(x))
    assert obs.to_statistics().to_dict() == s.to_dict()
    halves = TensorStatistics()
    halves.update(x[1:])
    halves.update(x[:1])
    assert halves.to_dict() == s.to_dict()
