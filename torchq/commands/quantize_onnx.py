"""torchq quantize-onnx: float ONNX in, TFLite-spec INT8 QDQ ONNX out."""

from __future__ import annotations

import argparse
import json

from onnx_backend import ConfigError, load_ranges, quantize_with_report, save_model, validate
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
    p.add_argument("--no-mean-correction", action="store_true", help="leave out the analytic bias correction of weight rounding (on by default)")
    p.add_argument("--report", help="also write a JSON report of what stayed in float and why")
    t = p.add_argument_group("accuracy techniques (need --data; see docs/ACCURACY.md)")
    t.add_argument("--auto-method", action="store_true", help="per tensor, the method (of the ten) that best preserves its readers' outputs")
    t.add_argument("--equalization", action="store_true", help="cross-layer equalization + high-bias absorption")
    t.add_argument("--bias-correction", action="store_true", help="empirical bias correction")
    t.add_argument("--adaround", action="store_true", help="learned weight rounding (AdaRound)")
    t.add_argument("--adaround-iterations", type=int, default=1000, help="AdaRound steps per layer (default 1000)")
    t.add_argument("--smoothquant", metavar="ALPHA|auto", type=_alpha, help="SmoothQuant with this alpha, or auto per layer")
    t.add_argument("--attention-masks", action="store_true", help="leave additive attention masks out of the ranges")
    p.add_argument("-o", "--output", required=True, help="quantized ONNX model to write")
    p.set_defaults(run=run)


def _alpha(value: str):
    if value == "auto":
        return value
    try:
        a = float(value)
    except ValueError:
        a = -1.0
    if not 0 < a < 1:
        raise argparse.ArgumentTypeError(f"smoothquant must be 'auto' or a number in (0, 1), got {value!r}")
    return a


def _techniques(args) -> dict:
    chosen = {
        "equalization": args.equalization,
        "bias_correction": args.bias_correction,
        "adaround": args.adaround,
        "smoothquant": args.smoothquant,
        "attention_masks": args.attention_masks,
    }
    chosen = {k: v for k, v in chosen.items() if v not in (False, None)}
    if args.auto_method:
        chosen["method"] = "auto"
    return chosen


def run_techniques(args, chosen: dict, out) -> None:
    from onnx_backend import get_pure_input_names, load_model

    from ..config import make_config
    from ..techniques import quantize_onnx
    from ._common import iter_samples

    if args.ranges:
        raise ConfigError("the accuracy techniques calibrate on data: give --data instead of --ranges")
    model = load_model(args.model)
    samples = list(iter_samples(args.data, get_pure_input_names(model), args.batch_size, args.max_samples))
    method = chosen.pop("method", args.method.method.value)
    config = make_config(
        method=method,
        symmetric=args.method.symmetric,
        percentile=args.percentile,
        per_channel=not args.per_tensor,
        target=None if args.target == "all" else args.target,
        activation_dtype=args.activation_dtype,
        exclude=args.exclude,
        adaround_iterations=args.adaround_iterations,
        mean_correction=not args.no_mean_correction,
        **chosen,
    )
    qmodel, report = quantize_onnx(model, samples, config)
    save_model(qmodel, out)
    if args.report:
        write_text_atomic(args.report, json.dumps(report.to_dict(), indent=1) + "\n")
    broken = validate(qmodel)
    print(report.quantization.describe().splitlines()[0])
    print(f"techniques: {', '.join(sorted(report.steps))}")
    print(f"spec check: {'all rules hold' if not broken else f'{len(broken)} broken rules'}; written to {out}")


def run(args) -> None:
    out = check_output_path(args.output)
    if args.report:
        check_output_path(args.report)  # before anything is written: no model without its report
    chosen = _techniques(args)
    if chosen:
        run_techniques(args, chosen, out)
        return
    if args.ranges:
        model, ranges = args.model, load_ranges(args.ranges)
    else:
        model, ranges, _ = calibrate_file(args)
    target = None if args.target == "all" else args.target
    qmodel, report = quantize_with_report(
        model, ranges, per_channel=not args.per_tensor, target=target, exclude_nodes=args.exclude, activation_dtype=args.activation_dtype, mean_correction=not args.no_mean_correction
    )
    save_model(qmodel, out)
    if args.report:
        write_text_atomic(args.report, json.dumps(report.to_dict(), indent=1) + "\n")
    broken = validate(qmodel)
    print(report.describe().splitlines()[0])
    print(f"spec check: {'all rules hold' if not broken else f'{len(broken)} broken rules'}; written to {out}")
