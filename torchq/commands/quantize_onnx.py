"""torchq quantize-onnx: float ONNX in, TFLite-spec INT8 QDQ ONNX out."""

from __future__ import annotations

import json

from onnx_backend import load_ranges, quantize_with_report, save_model, validate
from onnx_backend.model_io import write_text_atomic

from ._common import METHOD_CHOICES, check_output_path, method_arg
from .calibrate import calibrate_file


def register(sub) -> None:
    p = sub.add_parser("quantize-onnx", help="quantize a float ONNX model (calibrating it, or from a ranges file)", description=__doc__)
    p.add_argument("model", help="float ONNX model")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ranges", help="ranges file written by `torchq calibrate` (skips calibration)")
    group.add_argument("--data", metavar="DIR_OR_NPZ", help="calibration data (see `torchq calibrate --help`)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per run when --data is one .npz (default 1)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many runs")
    p.add_argument("--method", type=method_arg, default="mse_asym", metavar="METHOD", help=f"one of {', '.join(METHOD_CHOICES)} (default mse_asym)")
    p.add_argument("--percentile", type=float, default=99.99, help="for percentile methods (default 99.99)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per output channel")
    p.add_argument("--activation-dtype", choices=["int8", "uint8"], default="int8", help="int8 (the spec, the NPU; default) or uint8: the same grid with zero points + 128, which onnxruntime needs on x86 to fuse every quantized op")
    p.add_argument("--target", default="warboy", help="which ops run in int8: warboy, tflite, or all (default warboy)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="node names or op types kept in float (repeatable)")
    p.add_argument("--report", help="also write a JSON report of what stayed in float and why")
    p.add_argument("-o", "--output", required=True, help="quantized ONNX model to write")
    p.set_defaults(run=run)


def run(args) -> None:
    out = check_output_path(args.output)
    if args.ranges:
        model, ranges = args.model, load_ranges(args.ranges)
    else:
        model, ranges, _ = calibrate_file(args)
    target = None if args.target == "all" else args.target
    qmodel, report = quantize_with_report(
        model, ranges, per_channel=not args.per_tensor, target=target, exclude_nodes=args.exclude, activation_dtype=args.activation_dtype
    )
    save_model(qmodel, out)
    if args.report:
        write_text_atomic(args.report, json.dumps(report.to_dict(), indent=1) + "\n")
    broken = validate(qmodel)
    print(report.describe().splitlines()[0])
    print(f"spec check: {'all rules hold' if not broken else f'{len(broken)} broken rules'}; written to {out}")
