"""No range method clips away most of a tensor's signal, on the distributions that made them
collapse on real models (issue 18): a gate far from 0 (a squeeze-excitation hard-sigmoid), a
hard-swish output (a mass of tiny negatives, the energy in a sparse positive tail), a bimodal
logit far from 0 (a CTC blank), a conv output with a sparse wide tail, a ReLU output that is
almost all exact zeros. Entropy still minimises its KL divergence, among admissible ranges."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_backend import range_selection as rs
from onnx_backend.range_selection import expected_noise, select_range
from onnx_backend.statistics import TensorStatistics


def _hardswish(z: np.ndarray) -> np.ndarray:
    return z * np.clip(z + 3, 0, 6) / 6


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        # entropy chose [0, 0.3]: every value clipped
        "gate far from zero": rng.uniform(0.3, 0.72, 8000),
        # symmetric entropy chose +-0.377: 5 % of the values, 32 % of the energy clipped
        "hard-swish output": _hardswish(rng.normal(-2.0, 1.6, 1_000_000)),
        # entropy chose [-3.6, 0]: both modes clipped, 100 % of the values
        "bimodal logit far from zero": np.concatenate([rng.normal(-8, 1, 200_000), rng.normal(12, 1, 2_000)]),
        "sparse wide tail": np.concatenate([rng.normal(0, 0.3, 970_000), rng.normal(0, 6, 30_000)]),
        # percentile chose [0, 0.004]: the 99.99th percentile lay inside the spike of zeros
        "almost all exact zeros": np.concatenate([np.zeros(999_950), np.abs(rng.normal(0, 5, 50))]),
    }


DISTRIBUTIONS = _distributions()


def _stats(x: np.ndarray, bins: int = 4096) -> TensorStatistics:
    s = TensorStatistics(bins)
    s.update(x.astype(np.float32))
    return s


def _clipped_energy(x: np.ndarray, lo: float, hi: float) -> float:
    x = x.astype(np.float64)
    return float(np.sum((x - np.clip(x, lo, hi)) ** 2) / np.sum(x * x))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("method", ["percentile", "mse", "sqnr", "entropy"])
@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_no_method_clips_away_the_signal(name, method, symmetric):
    x = DISTRIBUTIONS[name]
    lo, hi = select_range(_stats(x), method, symmetric)
    assert _clipped_energy(x, lo, hi) < 0.02, (lo, hi)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_entropy_clips_only_rare_values_or_beats_min_max(name, symmetric):
    """The admissible set: at most 0.01 % of the values clipped, or an expected clip + rounding
    noise no larger than min-max's (bin-centre estimates, so a little slack)."""
    x = DISTRIBUTIONS[name]
    s = _stats(x)
    lo, hi = select_range(s, "entropy", symmetric)
    rare = np.mean((x < lo) | (x > hi)) <= 2 * rs.ENTROPY_FREE_CLIP_SHARE
    mm = select_range(s, "min_max", symmetric)
    assert rare or expected_noise(s, lo, hi) <= 1.05 * expected_noise(s, *mm), (lo, hi, mm)


def test_entropy_is_the_kl_minimum_over_admissible_thresholds():
    """Symmetric entropy of the hard-swish output equals an exhaustive search of the KL over every
    admissible threshold (the coarse-to-fine search is exhaustive at this size), and the bound
    is active: KL alone would clip more."""
    x = DISTRIBUTIONS["hard-swish output"]
    s = _stats(x, bins=2048)
    counts, width = s.folded_abs()
    levels = rs.SYMMETRIC_LEVELS
    flat = rs._without_zero_spike(counts, 0)
    k = rs._subdivision(flat, levels)
    split, values = rs._split_bins(flat, k), rs._split_bins(counts, k)
    n = split.size
    assert n - levels + 1 <= 64 * rs.ZOOM_GRID  # one round scores every threshold
    ends = np.arange(levels, n + 1)
    kl = rs._kl_windows_numpy(rs._PrefixSums.of(split), np.zeros_like(ends), ends, levels)
    noise = rs._noise_one_sided(values, levels, 1.0)
    outside = np.array([values[e:].sum() for e in ends])
    allowed = rs._admissible(noise[ends - 1], noise[-1], outside, float(values.sum()))
    best = ends[np.argmin(np.where(allowed, kl, np.inf))] * width / k
    assert select_range(s, "entropy", True)[1] == pytest.approx(best, rel=1e-12)
    unconstrained = ends[np.argmin(kl)] * width / k
    assert unconstrained < 0.7 * best
    assert _clipped_energy(x, -unconstrained, unconstrained) > 5 * _clipped_energy(x, -best, best)


def test_percentile_of_a_relu_output_ignores_the_exact_zeros():
    """Half the values exactly 0: the percentile is that of the non-zero values."""
    rng = np.random.default_rng(4)
    positive = np.abs(rng.normal(size=500_000))
    x = np.concatenate([np.zeros(500_000), positive])
    hi = select_range(_stats(x), "percentile", percentile=99.0)[1]
    assert hi == pytest.approx(np.percentile(positive, 99.0), rel=0.01)
