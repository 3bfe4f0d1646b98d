"""Range selection against closed-form cases."""

import numpy as np
import pytest

from onnx_backend.range_selection import Method, expected_noise, select_range
from onnx_backend.statistics import TensorStatistics

METHODS = [m.value for m in Method]
CLIPPING = ["percentile", "mse", "entropy", "sqnr"]


def stats_of(x):
    s = TensorStatistics()
    s.update(np.asarray(x, np.float32))
    return s


@pytest.fixture(scope="module")
def heavy_tailed():
    # Student-t with 4 degrees of freedom: heavy tails, yet a finite clipping error (df <= 2 has
    # an infinite one, and then keeping every outlier really is the MSE optimum).
    rng = np.random.default_rng(1)
    return stats_of(rng.standard_t(df=4, size=200_000))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_every_range_contains_zero_and_stays_within_data(method, symmetric, heavy_tailed):
    lo, hi = select_range(heavy_tailed, method, symmetric)
    assert lo <= 0 <= hi
    assert lo >= heavy_tailed.min - 1e-6 and hi <= heavy_tailed.max + 1e-6 or symmetric
    if symmetric:
        assert lo == -hi


def test_min_max_is_the_observed_range(heavy_tailed):
    assert select_range(heavy_tailed, "min_max") == (heavy_tailed.min, heavy_tailed.max)
    a = max(-heavy_tailed.min, heavy_tailed.max)
    assert select_range(heavy_tailed, "min_max", True) == (-a, a)


@pytest.mark.parametrize("method", CLIPPING)
@pytest.mark.parametrize("symmetric", [False, True])
def test_heavy_tails_are_clipped_by_every_method_but_min_max(method, symmetric, heavy_tailed):
    lo, hi = select_range(heavy_tailed, method, symmetric)
    mlo, mhi = select_range(heavy_tailed, "min_max", symmetric)
    margin = 5 * (mhi - mlo) / 255  # five quantization steps of the min-max range
    assert lo > mlo + margin and hi < mhi - margin  # both tails clipped, not just rounded


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_rare_isolated_outliers_are_clipped_to_the_bulk(method):
    rng = np.random.default_rng(6)
    s = stats_of(np.concatenate([rng.normal(size=200_000), rng.uniform(-30, 30, 20)]))
    lo, hi = select_range(s, method)
    assert -6 < lo < -3 and 3 < hi < 6


def test_percentile_of_uniform_is_closed_form():
    x = np.linspace(-1, 3, 400_001)
    lo, hi = select_range(stats_of(x), "percentile", percentile=99.0)
    assert lo == pytest.approx(-1 + 0.02, abs=2e-3) and hi == pytest.approx(3 - 0.02, abs=2e-3)
    a = select_range(stats_of(x), "percentile", True, percentile=50.0)[1]
    assert a == pytest.approx(np.percentile(np.abs(x), 50), abs=2e-3)


@pytest.mark.parametrize("method", CLIPPING)
def test_uniform_data_is_barely_clipped(method):
    x = np.random.default_rng(2).uniform(-1, 1, 200_000)
    lo, hi = select_range(stats_of(x), method)
    assert lo < -0.9 and hi > 0.9


def test_mse_clips_a_gaussian_near_the_known_optimum():
    # For 8 bits the MSE-optimal symmetric clip of N(0, 1) is about 3.9 sigma.
    x = np.random.default_rng(3).normal(size=1_000_000)
    a = select_range(stats_of(x), "mse", True)[1]
    assert 3.4 < a < 4.4


def test_mse_minimises_its_noise_model(heavy_tailed):
    lo, hi = select_range(heavy_tailed, "mse")
    best = expected_noise(heavy_tailed, lo, hi)
    for f in (0.5, 0.8, 1.25, 2.0):
        assert best <= expected_noise(heavy_tailed, lo * f, hi * f) + 1e-12


@pytest.mark.parametrize("implementation", ["compiled kernel", "numpy blocks"])
@pytest.mark.parametrize("gamma", [1.0, 3.0])
@pytest.mark.parametrize("data", ["heavy tailed", "uniform (flat noise: ties)"])
def test_noise_search_picks_the_whole_grids_first_minimum(heavy_tailed, data, gamma, implementation, monkeypatch):
    from onnx_backend import range_selection as rs

    if implementation == "numpy blocks":
        monkeypatch.setattr(rs, "_search", None)
    else:
        assert rs._search is not None, "the compiled search kernels are not built"
    stats = heavy_tailed if data == "heavy tailed" else stats_of(np.linspace(-1, 1, 4096))
    lo_idx, hi_idx = rs._two_sided_grid(stats, rs.MAX_GRID)
    noise = rs._noise_two_sided(rs._tail_sums(stats.counts), lo_idx, hi_idx, gamma)  # the grid at once
    i, j = np.unravel_index(int(np.argmin(noise)), noise.shape)
    edges = stats.edges()
    assert lo_idx.size * hi_idx.size >= 2 * rs.NOISE_BLOCK_ELEMENTS  # several blocks (numpy)
    assert rs._min_noise_window(stats, gamma) == (float(edges[lo_idx[i]]), float(edges[hi_idx[j]]))


def test_sqnr_is_not_an_alias_of_mse(heavy_tailed):
    mse = select_range(heavy_tailed, "mse")
    sqnr = select_range(heavy_tailed, "sqnr")
    assert sqnr != mse and sqnr[1] - sqnr[0] > mse[1] - mse[0]  # clipping weighs 3x: wider
    assert select_range(heavy_tailed, "sqnr", sqnr_gamma=1.0) == mse  # gamma 1 is exactly MSE


def test_entropy_has_a_real_asymmetric_variant():
    rng = np.random.default_rng(4)
    skewed = stats_of(np.concatenate([rng.normal(-0.5, 0.3, 100_000), rng.exponential(2.0, 100_000)]))
    lo, hi = select_range(skewed, "entropy")
    slo, shi = select_range(skewed, "entropy", True)
    assert -lo < hi and (lo, hi) != (slo, shi) and slo == -shi


@pytest.mark.parametrize("method", METHODS)
def test_never_negative_tensor_uses_zero_to_a(method):
    x = np.maximum(np.random.default_rng(5).normal(size=100_000), 0)
    for symmetric in (False, True):
        lo, hi = select_range(stats_of(x), method, symmetric)
        assert lo == 0.0 and 0 < hi <= x.max() + 1e-6


def test_all_zero_tensor():
    assert select_range(stats_of(np.zeros(10)), "mse") == (0.0, 0.0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        select_range(stats_of([1.0]), "nope")
    with pytest.raises(ValueError, match="percentile"):
        select_range(stats_of([1.0, 2.0]), "percentile", percentile=0)
    with pytest.raises(ValueError, match="no calibration data"):
        select_range(TensorStatistics(), "mse")


@pytest.mark.parametrize("method", ["entropy", "mse", "sqnr"])
def test_range_searches_in_threads_choose_what_they_choose_one_by_one(method):
    from onnx_backend.parallel import map_in_threads
    from onnx_backend.range_selection import is_slow_search

    rng = np.random.default_rng(7)
    tensors = [stats_of(rng.standard_t(df=3 + i % 5, size=20_000) * (1 + i) + i % 3) for i in range(12)]
    one_by_one = [select_range(s, method) for s in tensors]
    assert is_slow_search(method, symmetric=False)
    assert map_in_threads(lambda s: select_range(s, method), tensors) == one_by_one
    assert map_in_threads(lambda s: select_range(s, method), tensors, threads=False) == one_by_one
