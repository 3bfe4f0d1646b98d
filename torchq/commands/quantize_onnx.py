"""torchq quantize-onnx: float ONNX in, TFLite-spec INT8 QDQ ONNX out."""

from __future__ import annotations

import argparse
import json

from onnx_backend import ConfigError, load_ranges, quantize_with_report, save_model, validate
from onnx_backend.model_io import write_text_atomic

from ..config import QuantConfig, make_config
from ..recipes import parse_override
from ._common import METHOD_CHOICES, check_output_path, method_arg
from .calibrate import calibrate_file

_DEFAULT = QuantConfig()  # every default shown in --help is QuantConfig's


def register(sub) -> None:
    p = sub.add_parser("quantize-onnx", help="quantize a float ONNX model (calibrating it, or from a ranges file)", description=__doc__)
    p.add_argument("model", help="float ONNX model")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ranges", help="ranges file written by `torchq calibrate` (skips calibration)")
    group.add_argument("--data", metavar="DIR_OR_NPZ", help="calibration data (see `torchq calibrate --help`)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per run when --data is one .npz (default 1)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many runs")
    p.add_argument("--method", type=method_arg, default=None, metavar="METHOD", help=f"one of {', '.join(METHOD_CHOICES)} (default {_DEFAULT.method}_{'sym' if _DEFAULT.symmetric else 'asym'})")
    p.add_argument("--percentile", type=float, default=None, help=f"for percentile methods (default {_DEFAULT.percentile})")
    p.add_argument("--sqnr-gamma", type=float, default=None, help=f"weight of clipping noise in the sqnr methods, > 0 (default {_DEFAULT.sqnr_gamma})")
    p.add_argument("--per-tensor", action="store_true", default=None, help="one weight scale per tensor instead of per output channel")
    p.add_argument("--activation-dtype", choices=["int8", "uint8"], default=None, help="int8 (the spec, the NPU; default) or uint8: the same grid with zero points + 128, which onnxruntime needs on x86 to fuse every quantized op")
    p.add_argument("--target", default=None, help=f"which ops run in int8: warboy, tflite, or all (default {_DEFAULT.target or 'all'})")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB", help="node names or op types kept in float (repeatable; QuantConfig.exclude_nodes)")
    p.add_argument("--no-mean-correction", action="store_true", default=None, help="leave out the analytic bias correction of weight rounding (on by default)")
    p.add_argument("--report", help="also write a JSON report of what stayed in float and why")
    p.add_argument(
        "--set",
        dest="config_set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any QuantConfig field (the keys of a recipe's quantization section, and opset), the value read as YAML, "
        "e.g. --set histogram_bins=2048 --set smoothquant=0.5; repeatable",
    )
    t = p.add_argument_group("accuracy techniques (need --data; see docs/ACCURACY.md)")
    t.add_argument("--auto-method", action="store_true", default=None, help="per tensor, the method (of the ten) that best preserves its readers' outputs")
    t.add_argument("--equalization", action="store_true", default=None, help="cross-layer equalization + high-bias absorption")
    t.add_argument("--bias-correction", action="store_true", default=None, help="empirical bias correction")
    t.add_argument("--adaround", action="store_true", default=None, help="learned weight rounding (AdaRound)")
    t.add_argument("--adaround-iterations", type=int, default=None, help=f"AdaRound steps per layer (default {_DEFAULT.adaround_iterations})")
    t.add_argument("--smoothquant", metavar="ALPHA|auto", type=_alpha, help="SmoothQuant with this alpha, or auto per layer")
    t.add_argument("--attention-masks", action="store_true", default=None, help="leave additive attention masks out of the ranges")
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


def config_from_args(args) -> QuantConfig:
    """The QuantConfig these flags ask for: QuantConfig's defaults, each flag given, then each
    --set FIELD=VALUE. The flags are shorthands for fields; --set reaches every field."""
    fields: dict = {}
    if args.method is not None:
        fields["method"], fields["symmetric"] = args.method.method.value, args.method.symmetric
    shorthands = {
        "percentile": args.percentile,
        "sqnr_gamma": args.sqnr_gamma,
        "per_channel": False if args.per_tensor else None,
        "mean_correction": False if args.no_mean_correction else None,
        "activation_dtype": args.activation_dtype,
        "exclude_nodes": args.exclude,
        "equalization": args.equalization,
        "bias_correction": args.bias_correction,
        "adaround": args.adaround,
        "adaround_iterations": args.adaround_iterations,
        "smoothquant": args.smoothquant,
        "attention_masks": args.attention_masks,
    }
    fields |= {k: v for k, v in shorthands.items() if v is not None}
    if args.target is not None:
        fields["target"] = None if args.target == "all" else args.target
    if args.auto_method:
        fields["method"] = "auto"
    for text in args.config_set:
        key, value = parse_override(text)
        if len(key) != 1 or key[0] not in QuantConfig.model_fields:
            raise ConfigError(f"--set {text}: not a QuantConfig field; fields: {', '.join(QuantConfig.model_fields)}")
        fields[key[0]] = value
    return make_config(**fields)


def run_techniques(args, config: QuantConfig, out) -> None:
    from onnx_backend import get_pure_input_names, load_model

    from ..techniques import quantize_onnx
    from ._common import iter_samples

    if args.ranges:
        raise ConfigError("the accuracy techniques calibrate on data: give --data instead of --ranges")
    model = load_model(args.model)
    samples = list(iter_samples(args.data, get_pure_input_names(model), args.batch_size, args.max_samples))
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
    config = config_from_args(args)
    config.check_for_onnx_model()
    if config.needs_samples:
        run_techniques(args, config, out)
        return
    # Without techniques the samples stream through the Calibrator (constant memory) on the graph
    # quantize_onnx prepares: the same model, byte for byte (tests/interfaces/test_same_request_same_bytes.py).
    if args.ranges:
        model, ranges = args.model, load_ranges(args.ranges)
    else:
        model, ranges, _ = calibrate_file(args, config)
    qmodel, report = quantize_with_report(
        model, ranges, per_channel=config.per_channel, target=config.target, exclude_nodes=config.exclude_nodes,
        opset=config.opset, optimize=config.optimize, activation_dtype=config.activation_dtype, mean_correction=config.mean_correction,
    )
    save_model(qmodel, out)
    if args.report:
        write_text_atomic(args.report, json.dumps(report.to_dict(), indent=1) + "\n")
    broken = validate(qmodel)
    print(report.describe().splitlines()[0])
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"spec check: {'all rules hold' if not broken else f'{len(broken)} broken rules'}; written to {out}")
