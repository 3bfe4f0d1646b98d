"""Entropy range selection is not fooled by the spike at 0 of post-ReLU tensors."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_backend.range_selection import select_range
from onnx_backend.statistics import TensorStatistics


@pytest.mark.parametrize("symmetric", [False, True])
def test_relu_output_is_not_clipped_to_a_fraction_of_its_range(symmetric):
    # half the mass exactly at 0, half a unit half-normal: what a ReLU after BatchNorm produces
    x = np.maximum(np.random.default_rng(0).standard_normal(1_000_000), 0).astype(np.float32)
    stats = TensorStatistics()
    stats.update(x)
    lo, hi = select_range(stats, "entropy", symmetric)
    assert lo == 0.0
    assert hi >= 3.0, hi  # without the zero-spike correction KL picks about 1.4 (clips ~16 % of the positives)
    assert (x > hi).mean() / (x > 0).mean() < 0.005


def test_two_sided_distribution_unchanged_in_spirit():
    # a Gaussian has no spike at 0: entropy keeps roughly +-4 to 5 sigma, both edges
    y = np.random.default_rng(1).standard_normal(1_000_000).astype(np.float32)
    stats = TensorStatistics()
    stats.update(y)
    lo, hi = select_range(stats, "entropy", False)
    assert -5.5 < lo < -3.0 and 3.0 < hi < 5.5
