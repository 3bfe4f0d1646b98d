"""torchq calibrate: run an ONNX model on calibration data and write the chosen ranges."""

from __future__ import annotations

import onnx_ir as ir

from onnx_backend import Calibrator, get_pure_input_names, save_ranges
from onnx_backend.calibrator import CalibrationMethod
from onnx_backend.optimize import prepare_graph
from onnx_backend.range_selection import DEFAULT_PERCENTILE, DEFAULT_SQNR_GAMMA

from ..config import QuantConfig

from ._common import METHOD_CHOICES, add_data_args, check_output_path, iter_samples, method_arg


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate a float ONNX model and write a ranges file", description=__doc__)
    p.add_argument("model", help="float ONNX model")
    add_data_args(p)
    p.add_argument("--method", type=method_arg, default="mse_asym", metavar="METHOD", help=f"one of {', '.join(METHOD_CHOICES)} (default mse_asym)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE, help=f"for percentile methods (default {DEFAULT_PERCENTILE})")
    p.add_argument("--sqnr-gamma", type=float, default=DEFAULT_SQNR_GAMMA, help=f"weight of clipping noise in the sqnr methods, > 0 (default {DEFAULT_SQNR_GAMMA})")
    p.add_argument("-o", "--output", required=True, help="ranges file to write (.json or .yaml)")
    p.set_defaults(run=run)


def calibrate_file(args, config: QuantConfig):
    """Calibrate `args.model` on `args.data` as `config` asks: the graph quantize_onnx would
    prepare (config's opset and graph optimization), the Calibrator streaming the samples
    (constant memory), config's method. Returns (prepared model, ranges, samples)."""
    model = ir.serde.serialize_model(prepare_graph(args.model, config.opset, optimize=config.optimize))
    method = CalibrationMethod.from_parts(config.method, config.symmetric)
    calibrator = Calibrator(model, method, percentage=config.percentile, sqnr_gamma=config.sqnr_gamma, histogram_bins=config.histogram_bins, quiet=args.quiet or None)
    calibrator.collect_data(iter_samples(args.data, get_pure_input_names(model), args.batch_size, args.max_samples))
    return model, calibrator.compute_range(), calibrator.samples


def run(args) -> None:
    out = check_output_path(args.output)
    config = QuantConfig(method=args.method.method.value, symmetric=args.method.symmetric, percentile=args.percentile, sqnr_gamma=args.sqnr_gamma)
    _, ranges, samples = calibrate_file(args, config)
    save_ranges(ranges, out)
    print(f"calibrated {len(ranges)} tensors on {samples} samples with {ranges.method}; ranges written to {out}")
