"""The one compiled part of torchq: the histogram binning kernel (onnx_backend/_binning.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler the
install still succeeds and statistics.bin_batch falls back to numpy (1.5-1.9x slower,
docs/bench/binning.md).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("onnx_backend._binning", ["onnx_backend/_binning.c"], extra_compile_args=["-O3"], optional=True)])
