"""Streaming, mergeable statistics: exactness, order independence, bounded memory."""

import numpy as np
import pytest
import torch

from onnx_backend.statistics import NonFiniteError, TensorStatistics, required_exponent
from torchq.observer import Observer


def _stats(*batches, bins=4096):
    s = TensorStatistics(bins)
    for b in batches:
        s.update(b)
    return s


def assert_same_statistics(a: TensorStatistics, b: TensorStatistics):
    assert (a.min, a.max, a.count, a.exponent, a.offset) == (b.min, b.max, b.count, b.exponent, b.offset)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_order_and_sharding_do_not_matter(rng):
    batches = [rng.normal(size=5000) * s for s in (0.01, 1.0, 30.0, 0.5)]
    forward, backward = _stats(*batches), _stats(*reversed(batches))
    left, right = _stats(*batches[:2]), _stats(*batches[2:])
    assert_same_statistics(forward, backward)
    assert_same_statistics(forward, left.merge(right))


def test_exponent_depends_only_on_global_range(rng):
    x = rng.uniform(-3, 7, size=10000)
    s = _stats(x[:10], x[10:])
    assert s.exponent == required_exponent(s.min, s.max, s.max_bins)
    assert s.counts.size <= s.max_bins and s.counts.sum() == x.size


def test_memory_does_not_grow_with_batches(rng):
    s = TensorStatistics(1024)
    sizes = []
    for i in range(50):
        s.update(rng.normal(size=1000) * (1 + i))
        sizes.append(s.counts.nbytes)
    assert max(sizes) <= 1024 * 8


def test_constant_and_zero_tensors():
    s = _stats(np.full(10, 3.0))
    assert s.min == s.max == 3.0 and s.counts.sum() == 10
    z = _stats(np.zeros(5))
    assert z.counts.tolist() == [5]


def test_non_finite_is_an_error():
    with pytest.raises(NonFiniteError):
        _stats(np.array([1.0, np.nan]))
    with pytest.raises(NonFiniteError):
        _stats(np.array([np.inf]))


def test_round_trip_through_dict(rng):
    s = _stats(rng.laplace(size=3000))
    assert_same_statistics(s, TensorStatistics.from_dict(s.to_dict()))


def test_torch_observer_builds_exactly_the_numpy_statistics(rng):
    batches = [rng.normal(size=(4, 7)).astype(np.float32) * s for s in (1.0, 10.0, 0.1)]
    obs = Observer("k", 4096)
    for b in batches:
        obs.update(torch.from_numpy(b))
    assert_same_statistics(obs.to_statistics(), _stats(*batches))


def test_torch_observer_accepts_half_precision(rng):
    x = torch.from_numpy(rng.normal(size=100).astype(np.float32)).half()
    obs = Observer("k", 4096)
    obs.update(x)
    assert_same_statistics(obs.to_statistics(), _stats(x.float().numpy()))


def test_folded_histogram_is_bounded_for_data_far_from_zero():
    s = _stats(np.float32(1.0) + np.linspace(0, 1e-6, 1000, dtype=np.float32))
    counts, width = s.folded_abs()
    assert counts.size <= s.max_bins and counts.sum() == 1000
    assert counts.size * width >= s.max
