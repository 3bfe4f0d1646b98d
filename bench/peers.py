"""The peers, run on the same models and data as torchq.

* onnxruntime.quantization.quantize_static: QDQ, int8 activations and weights, per-channel
  weights, each of MinMax / Entropy / Percentile (its defaults otherwise), after its own
  recommended pre-processing (quant_pre_process: shape inference + graph optimization).
* PyTorch's PT2E flow with torchao's XNNPACK-style quantizer (symmetric int8 per-channel weights,
  int8 activations): torch.export -> prepare_pt2e -> calibration -> convert_pt2e. torch 2.13 no
  longer ships torch.ao's PT2E module; torchao (pinned in pyproject's `bench` extra) does. torchao
  keeps its XNNPACK quantizer under torchao.testing.pt2e since the real one moved to ExecuTorch.
  The converted model is evaluated in PyTorch (reference Q/DQ arithmetic): there is no
  supported path from it to an onnxruntime model, so it has no latency column.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

ORT_METHODS = ("MinMax", "Entropy", "Percentile")


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._it = iter(list(feeds))

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - called by some onnxruntime versions
        pass


def ort_preprocess(float_path: str | Path, out_path: str | Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(float_path), str(out_path), skip_symbolic_shape=False)
    except Exception:  # symbolic shape inference fails on some graphs; onnxruntime says to skip it then
        quant_pre_process(str(float_path), str(out_path), skip_symbolic_shape=True)
    return Path(out_path)


@contextlib.contextmanager
def working_directory(path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def ort_quantize(float_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]], method: str, out_path: str | Path) -> tuple[onnx.ModelProto, float]:
    """quantize_static on the pre-processed float model; returns (model, wall seconds)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    float_path, out_path = Path(float_path).resolve(), Path(out_path).resolve()  # before the chdir
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, working_directory(tmp):  # its shape inference leaves temporary files in the working directory
        pre = ort_preprocess(float_path, Path(tmp) / "pre.onnx")
        quantize_static(
            str(pre),
            str(out_path),
            _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
        )
    seconds = time.perf_counter() - t0
    return onnx.load(str(out_path)), seconds


def pt2e_quantize(model, calibration: Iterable[tuple], example_inputs: tuple, dynamic_dims: tuple[int, ...] = (0,)):
    """torchao PT2E with the XNNPACK-style symmetric quantizer; returns (GraphModule, seconds).

    Raises whatever torch.export / torchao raise: the caller reports it in the table.
    """
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    t0 = time.perf_counter()
    # AUTO: torch.export decides which of these axes are dynamic and what relates them
    # (ids and mask share batch and length; positions cap the length at 512)
    dims = tuple({d: torch.export.Dim.AUTO for d in dynamic_dims} for _ in example_inputs) if dynamic_dims else None
    exported = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dims).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for args in calibration:
            prepared(*args)
    converted = convert_pt2e(prepared)
    return converted, time.perf_counter() - t0


def ort_calibrate_only(float_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]], method: str) -> float:
    """Wall seconds of onnxruntime's calibration alone (create_calibrator + collect_data +
    compute_data on the pre-processed model): what torchq's Calibrator is compared with."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    with tempfile.TemporaryDirectory() as tmp:
        pre = ort_preprocess(float_path, Path(tmp) / "pre.onnx")
        t0 = time.perf_counter()
        calibrator = create_calibrator(str(pre), augmented_model_path=str(Path(tmp) / "augmented.onnx"), calibrate_method=getattr(CalibrationMethod, method))
        calibrator.collect_data(_Reader(feeds))
        calibrator.compute_data()
        return time.perf_counter() - t0
