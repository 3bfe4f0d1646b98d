"""torchq report: where an INT8 model loses accuracy, tensor by tensor.

Runs the float and the INT8 ONNX model on the same data and writes, into the output folder:
  report.md / report.html   per-tensor SQNR (worst first), the layers that lose the most,
                            weights' and activations' clipping, ranges per method for the worst tensors
  report.json               everything above as data
  sqnr_per_layer.png        SQNR of every quantized activation, in graph order
  hist_<tensor>.png         for the tensors whose own quantization is worst: the float histogram,
                            the range used, the range each method would choose
"""

from __future__ import annotations

from ..report import compare
from ..report_render import write_report
from ._common import add_data_args, iter_samples


def register(sub) -> None:
    p = sub.add_parser("report", help="compare a float and an INT8 ONNX model tensor by tensor; write Markdown/HTML/PNG", description=__doc__)
    p.add_argument("float_model", metavar="FLOAT.onnx", help="the float ONNX model")
    p.add_argument("int8_model", metavar="INT8.onnx", help="its quantized (QDQ) ONNX model")
    add_data_args(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write the report into (created if missing)")
    p.add_argument("--top", type=_count, default=6, metavar="N", help="how many tensors (worst own quantization first) get a histogram and per-method ranges (default 6)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--sensitivity", action="store_true",
        help="also quantize the float model one layer at a time (and all but one layer) with torchq's defaults: per-layer output SQNR (two quantizations per layer)",
    )
    p.set_defaults(run=run)


def _count(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return n


def run(args) -> None:
    from onnx_backend import get_pure_input_names, load_model

    inputs = get_pure_input_names(load_model(args.float_model))
    samples = iter_samples(args.data, inputs, args.batch_size, args.max_samples)
    if args.sensitivity:
        samples = list(samples)  # read twice
    report = compare(args.float_model, args.int8_model, samples, top=args.top, quiet=True if args.quiet else None)
    if args.sensitivity:
        from ..techniques import sensitivity

        report.sensitivity = sensitivity(args.float_model, samples).to_dict()
    files = write_report(report, args.output, plots=not args.no_plots)
    for line in _summary(report):
        print(line)
    print(f"report written to {files['html']} and {files['markdown']} ({len(files) - 3} plots)")


def _summary(report) -> list[str]:
    lines = []
    worst = report.worst(5)
    lines.append(f"{len(report.worst())} activations, {len(report.worst(kind='weight'))} weights compared on {report.samples} samples; worst first:")
    for t in worst:
        lines.append(f"  {t.sqnr_db:7.1f} dB  {t.name} ({t.op_type}), own {t.own_sqnr_db:.1f} dB, {t.clipped * 100:.2f} % clipped")
    hurt = [layer for layer in report.layers if layer.lost_db is not None and layer.lost_db > 0][:3]
    if hurt:
        lines.append("most SQNR lost at: " + ", ".join(f"{layer.node} -> {layer.output} ({layer.op_type}, {layer.lost_db:.1f} dB)" for layer in hurt))
    if report.sensitivity is not None and report.sensitivity["layers"]:
        top = report.sensitivity["layers"][0]
        lines.append(f"most sensitive layer: {top['layer']} ({top['op']}): all but it quantized {top['all_but_this_quantized']:.1f} dB, everything {report.sensitivity['quantized']:.1f} dB")
    own = report.worst(1, own=True)
    if own:
        t = own[0]
        lines.append(f"worst own quantization: {t.name} ({t.op_type}), {t.own_sqnr_db:.1f} dB, {t.clipped * 100:.2f} % clipped by range {_rng(t.range)}")
        better = max(report.method_ranges.get(t.name, []), key=lambda m: m.sqnr_db, default=None)
        if better is not None and better.sqnr_db > t.own_sqnr_db + 1:
            lines.append(f"  {better.method} would choose {_rng(better.range)}: {better.sqnr_db:.1f} dB on this tensor")
    return lines


def _rng(r) -> str:
    return f"[{r[0]:.4g}, {r[1]:.4g}]"
