"""The compiled parts of torchq, both optional kernels with numpy fallbacks:

* onnx_backend/_binning.c -- histogram binning (statistics; numpy is 3.6-4.6x slower);
* onnx_backend/_search.c -- the entropy (KL) and two-sided mse/sqnr range searches
  (range_selection; numpy is 3.2-7x slower).

Both measured by `python -m bench.binning` (docs/bench/binning.md).

Everything else is in pyproject.toml. Without a C compiler the install still succeeds and the
numpy code runs instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # -fno-trapping-math: float-to-int conversions may be vectorized (2.2x faster binning; the
        # kernel checks every value's bin itself and raises no floating-point exceptions).
        Extension("onnx_backend._binning", ["onnx_backend/_binning.c"], extra_compile_args=["-O3", "-fopenmp-simd", "-fno-trapping-math"], optional=True),
        # -ffp-contract=off: no fused multiply-adds, so the noise grid gives numpy's doubles;
        # -fopenmp-simd: the `omp simd` reduction may be vectorized (no OpenMP runtime).
        Extension("onnx_backend._search", ["onnx_backend/_search.c"], extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp-simd"], optional=True),
    ]
)
