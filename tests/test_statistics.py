"""Streaming, mergeable statistics: exactness, order independence, bounded memory."""

import numpy as np
import pytest
import torch

from onnx_backend import statistics
from onnx_backend.statistics import MASK_MAGNITUDE, NonFiniteError, TensorStatistics, bin_batch, bin_batch_numpy, bin_of, required_exponent
from torchq.observer import Observer


def _stats(*batches, bins=4096):
    s = TensorStatistics(bins)
    for b in batches:
        s.update(b)
    return s


def assert_same_statistics(a: TensorStatistics, b: TensorStatistics):
    assert (a.min, a.max, a.count, a.exponent, a.offset, a.mask_low, a.mask_high) == (b.min, b.max, b.count, b.exponent, b.offset, b.mask_low, b.mask_high)
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


def test_nan_is_an_error():
    with pytest.raises(NonFiniteError):
        _stats(np.array([1.0, np.nan]))
    with pytest.raises(NonFiniteError):
        _stats(np.array([-np.inf, np.nan]))  # a mask value beside it does not hide it


@pytest.mark.parametrize("binning", ["compiled kernel", "numpy"])
def test_nan_in_a_later_batch_is_an_error_and_changes_nothing(rng, monkeypatch, binning):
    if binning == "numpy":
        monkeypatch.setattr(statistics, "_binning", None)
    s = _stats(rng.normal(size=1000))
    before = s.copy()
    for where in (37, 9000):  # inside the current bins (the kernel's in-place path), in a later tile
        batch = rng.normal(size=10_000) * 0.1
        batch[where], batch[5] = np.nan, -np.inf
        with pytest.raises(NonFiniteError):
            s.update(batch)
        assert_same_statistics(s, before)


FMIN = np.finfo(np.float32).min


def _masked_batches(rng) -> list[np.ndarray]:
    """Padded-attention-like float32 batches: -inf, finfo.min (also scaled by 1/8, as before a
    softmax), +inf, and a batch of nothing but mask values first and in the middle."""
    out = [np.full(64, -np.inf, np.float32)]
    for k in range(5):
        b = rng.normal(size=6000).astype(np.float32) * (1 + 3 * k)
        b[rng.integers(0, b.size, 300)] = -np.inf
        b[rng.integers(0, b.size, 80)] = FMIN
        b[rng.integers(0, b.size, 40)] = FMIN * np.float32(0.125)
        b[rng.integers(0, b.size, 20)] = np.inf
        out.append(b)
        if k == 2:
            out.append(np.float32([FMIN, np.inf, -np.inf]))
    return out


@pytest.mark.parametrize("path", ["compiled kernel", "numpy", "observer, CPU tensors", "observer, torch ops (other devices)"])
def test_mask_values_are_counted_and_left_out(rng, monkeypatch, path):
    batches = _masked_batches(rng)
    kept = np.concatenate([b[np.abs(b) < MASK_MAGNITUDE] for b in batches])
    want = _stats(kept)
    want.mask_low = sum(int(np.count_nonzero(b <= -MASK_MAGNITUDE)) for b in batches)
    want.mask_high = sum(int(np.count_nonzero(b >= MASK_MAGNITUDE)) for b in batches)
    assert want.mask_low > 1000 and want.mask_high > 50 and np.isfinite(want.min) and want.max < 100
    if path in ("numpy", "observer, torch ops (other devices)"):
        monkeypatch.setattr(statistics, "_binning", None)
    if path.startswith("observer"):
        obs = Observer("k", 4096)
        for b in batches:
            obs.update(torch.from_numpy(b))
        got = obs.to_statistics()
    else:
        got = _stats(*batches)
    assert_same_statistics(got, want)


def test_only_mask_values_give_no_range_but_are_counted():
    s = _stats(np.float32([-np.inf, FMIN]), np.float32([np.inf]))
    assert s.empty and s.observed and (s.mask_low, s.mask_high, s.count) == (2, 1, 0)
    obs = Observer("k", 4096)
    obs.update(torch.tensor([-np.inf, np.inf]))
    assert obs.empty and obs.observed and (obs.mask_low, obs.mask_high) == (1, 1)


def test_values_below_the_mask_magnitude_are_data():
    x = np.float32([-1e9, -1e4, 1e30, -1e36, 0.5])  # additive masks of -1e4 / -1e9 are data here
    s = _stats(x)
    assert (s.min, s.max, s.count, s.masked) == (float(x.min()), float(x.max()), 5, 0)


def test_mask_counts_merge_and_round_trip(rng):
    batches = _masked_batches(rng)
    whole = _stats(*batches)
    halves = _stats(*batches[:3]).merge(_stats(*batches[3:]))
    assert_same_statistics(halves, whole)
    assert_same_statistics(TensorStatistics().merge(_stats(batches[0])), _stats(batches[0]))  # mask values only
    assert_same_statistics(TensorStatistics.from_dict(whole.to_dict()), whole)
    old = whole.to_dict()
    del old["mask_low"], old["mask_high"]  # a file written before mask values were counted
    loaded = TensorStatistics.from_dict(old)
    assert loaded.masked == 0 and (loaded.min, loaded.max, loaded.count) == (whole.min, whole.max, whole.count)


@pytest.mark.parametrize("binning", ["compiled kernel", "numpy"])
def test_relu_statistics_from_the_input_are_those_of_the_output(rng, monkeypatch, binning):
    if binning == "numpy":
        monkeypatch.setattr(statistics, "_binning", None)
    batches = [rng.normal(size=3000).astype(np.float32) * s - o for s, o in ((1.0, 0.0), (0.5, 0.2), (3.0, 1.0), (0.1, 5.0))]
    from_input = TensorStatistics()
    for b in batches:  # a growing range, batches inside the current bins, one all negative
        from_input.update(b, relu=True)
    assert_same_statistics(from_input, _stats(*(np.maximum(b, 0) for b in batches)))
    bad = batches[0].copy()
    bad[7] = np.nan  # max(NaN, 0) must not hide a NaN
    before = from_input.copy()
    with pytest.raises(NonFiniteError):
        from_input.update(bad, relu=True)
    assert_same_statistics(from_input, before)


def test_round_trip_through_dict(rng):
    s = _stats(rng.laplace(size=3000))
    assert_same_statistics(s, TensorStatistics.from_dict(s.to_dict()))


@pytest.mark.parametrize("binning", ["compiled kernel (CPU tensors)", "torch ops (other devices)"])
def test_torch_observer_builds_exactly_the_numpy_statistics(rng, monkeypatch, binning):
    if binning.startswith("torch"):
        monkeypatch.setattr(statistics, "_binning", None)  # what a GPU tensor goes through, on the CPU
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


def _reference_counts(x: np.ndarray, exponent: int) -> tuple[np.ndarray, int]:
    """Per-value bin_of: the definition the binning kernels implement."""
    index = np.array([bin_of(float(v), exponent) for v in x.ravel()], dtype=np.int64)
    first = int(index.min())
    return np.bincount(index - first), first


def _binning_cases(rng):
    relu = np.maximum(rng.normal(size=10_007), 0).astype(np.float32)
    tiny_negatives = np.concatenate([rng.normal(size=3001).astype(np.float32) * 1e6, np.float32([-1e-30, -1e-45, -0.0, 1e-45])])
    far_from_zero = np.float32(3.0e5) + rng.uniform(0, 1, size=999).astype(np.float32)
    return {
        "relu float32": (relu, None),
        "normal float64": (rng.normal(size=4097), None),
        "exponent > 0, values underflowing to bin -1": (tiny_negatives, None),
        "huge": ((rng.normal(size=2000) * 1e30).astype(np.float32), None),
        "far from zero": (far_from_zero, None),
        "fewer values than lanes": (np.float32([-2.5, 7.0, 0.0]), None),
        "exponent coarser than the data needs": (rng.normal(size=5000).astype(np.float32), 3),
        "non-contiguous": (rng.normal(size=(64, 33)).astype(np.float32)[:, ::2], None),
        "big-endian": (rng.normal(size=777).astype(">f4"), None),
    }


def test_compiled_binning_kernel_is_built():
    # setup.py builds it as optional (an install without a compiler still works); the test
    # environment must have it, or the benchmarks measure the slower numpy fallback.
    assert statistics._binning is not None


@pytest.mark.parametrize("case", ["relu float32", "normal float64", "exponent > 0, values underflowing to bin -1", "huge", "far from zero", "fewer values than lanes", "exponent coarser than the data needs", "non-contiguous", "big-endian"])
def test_binning_kernels_count_every_value_in_its_bin(rng, case):
    x, exponent = _binning_cases(rng)[case]
    lo, hi = float(x.min()), float(x.max())
    e = required_exponent(lo, hi, 4096) if exponent is None else exponent
    want, want_first = _reference_counts(x, e)
    counts, first = bin_batch(x.ravel() if x.ndim == 1 else x.reshape(-1), e, lo, hi)
    assert first == want_first
    np.testing.assert_array_equal(counts, want)
    native = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("=")).ravel()
    np.testing.assert_array_equal(bin_batch_numpy(native, e, bin_of(lo, e), bin_of(hi, e)), want)
    if statistics._binning is not None:  # the kernel's own min and max, taken while it counts
        assert statistics._count_into(np.zeros_like(counts), native, e, first) == (lo, hi, 0, 0)


@pytest.mark.skipif(statistics._binning is None, reason="the compiled kernel is not built (test_compiled_binning_kernel_is_built says so)")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binning_kernel_counts_mask_values_apart(dtype):
    x = np.array([0.5, -np.inf, 2.5, FMIN, np.inf, -MASK_MAGNITUDE, MASK_MAGNITUDE, 1.5], dtype)
    counts = np.zeros(3, dtype=np.int64)  # bins 0, 1, 2: every finite value below 2**120 fits
    assert statistics._binning.count(x, 1.0, 0, False, counts, False, MASK_MAGNITUDE) == (0.5, 2.5, 3, 2)
    assert counts.tolist() == [1, 1, 1]
    relu = np.zeros(3, dtype=np.int64)  # max(-inf, 0) is 0, a value; +inf stays a mask value
    assert statistics._binning.count(x, 1.0, 0, False, relu, True, MASK_MAGNITUDE) == (0.0, 2.5, 0, 2)
    assert relu.tolist() == [4, 1, 1]


@pytest.mark.skipif(statistics._binning is None, reason="the compiled kernel is not built (test_compiled_binning_kernel_is_built says so)")
@pytest.mark.parametrize("x", [np.float32([0.5, 3.5]), np.float32([0.5, np.nan]), np.float64([0.5, 1e30]), np.float64([-0.5])], ids=["above", "NaN", "large but not a mask value", "below"])
def test_binning_kernel_refuses_values_outside_its_bins(x):
    counts = np.zeros(3, dtype=np.int64)  # bins 0, 1, 2
    assert statistics._binning.count(x, 1.0, 0, False, counts, False, MASK_MAGNITUDE) is None
    assert counts.sum() == 0  # each tile is checked before it is counted: this one-tile batch left none
