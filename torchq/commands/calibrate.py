"""torchq calibrate: run an ONNX model on calibration data and write the chosen ranges."""

from __future__ import annotations

from onnx_backend import Calibrator, get_pure_input_names, optimize_model, save_ranges
from onnx_backend.range_selection import DEFAULT_PERCENTILE, DEFAULT_SQNR_GAMMA
from onnx_backend.statistics import DEFAULT_BINS

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


def calibrate_file(args, method, percentile: float, sqnr_gamma: float, histogram_bins: int = DEFAULT_BINS):
    model = optimize_model(args.model)
    calibrator = Calibrator(model, method, percentage=percentile, sqnr_gamma=sqnr_gamma, histogram_bins=histogram_bins, quiet=args.quiet or None)
    calibrator.collect_data(iter_samples(args.data, get_pure_input_names(model), args.batch_size, args.max_samples))
    return model, calibrator.compute_range(), calibrator.samples


def run(args) -> None:
    out = check_output_path(args.output)
    _, ranges, samples = calibrate_file(args, args.method, args.percentile, args.sqnr_gamma)
    save_ranges(ranges, out)
    print(f"calibrated {len(ranges)} tensors on {samples} samples with {ranges.method}; ranges written to {out}")
