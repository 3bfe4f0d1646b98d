"""Section: the reference product's model families with random weights (no pretrained weights
can be had offline). Each is exported, quantized by torchq, spec-validated, checked against the
Warboy target, and compared with its float model on real-photo crops: output SQNR, latency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from . import images
from . import seed_models as sm
from .common import Settings, fmt, fused_op_counts, latency_ms, run_batched, session, sqnr_db, table, for_onnxruntime
from .subjects import Subject, export_float, quantize_ours

# name -> (factory, full-run input size, the original's input size, outputs)
FAMILIES = {
    "ResNet50 v1.5": (sm.ResNet50, 224, 224, ["logits"]),
    "EfficientNet-B0": (sm.efficientnet_b0, 224, 224, ["logits"]),
    "EfficientNetV2-S": (sm.efficientnet_v2_s, 224, 384, ["logits"]),
    "ConvNeXt-T": (sm.ConvNeXt, 224, 224, ["logits"]),
    "RetinaNet (ResNet50-FPN)": (sm.RetinaNet, 320, 800, ["cls_logits", "box_regression"]),
    "SSD-MobileNet v1": (sm.SSDMobileNet, 300, 300, ["cls_logits", "box_regression"]),
    "SSD-ResNet34": (sm.SSDResNet34, 384, 1200, ["cls_logits", "box_regression"]),
    "YOLOv5s": (sm.YOLOv5, 320, 640, ["detections"]),
    "YOLOX-s": (sm.YOLOX, 320, 640, ["detections"]),
}
QUICK = {"ResNet50 v1.5": 64}
METHOD = ("mse", False)  # torchq's default, through the PyTorch path
EXTRA_METHODS = ("PERCENTILE_ASYM", "MIN_MAX_ASYM", "SQNR_ASYM")  # through the ONNX path, same data
PEER_METHODS = ("MinMax", "Percentile")  # onnxruntime quantize_static, same float model and data
N_CALIB, N_EVAL = 16, 4


@dataclass
class SeedRow:
    name: str
    size: int
    original: int
    params_m: float
    export_s: float = float("nan")
    quantize_s: float = float("nan")
    int8_nodes: int = 0
    float_nodes: int = 0
    float_reasons: dict = field(default_factory=dict)
    violations: int = -1
    npu: str = ""
    sqnr: dict = field(default_factory=dict)
    method_sqnr: dict = field(default_factory=dict)  # method -> min SQNR over outputs
    latency: dict = field(default_factory=dict)
    leftover: dict = field(default_factory=dict)
    error: str = ""


def _subject(name: str, size: int, calib: torch.Tensor, example: torch.Tensor) -> Subject:
    factory, _, _, outputs = FAMILIES[name]
    return Subject(
        name=name,
        family=name,
        build=factory,
        calibration=lambda: [(calib[i : i + 4],) for i in range(0, len(calib), 4)],
        example=lambda: (example,),
        input_names=["image"],
        output_names=outputs,
    )


def _npu_summary(qmodel, report_int8: int, report_float: int) -> str:
    """npu.check's verdict where that module exists (it lands with the NPU work), and the planner's
    own count (QuantizationReport, target warboy) in every case."""
    planner = f"planner: {report_int8} int8 / {report_float} float nodes"
    try:
        from npu.check import check
    except ImportError:
        return planner
    try:
        return f"{check(qmodel, target='warboy').headline()}; {planner}"
    except Exception as exc:  # report, never crash the benchmark
        return f"npu.check failed: {type(exc).__name__}: {exc}; {planner}"


def _other_methods(row: SeedRow, float_path: Path, calib: torch.Tensor, feeds: dict, ref: list, settings: Settings, scratch: Path) -> None:
    """Min output SQNR of a few more torchq methods (ONNX path) and of onnxruntime's quantizer."""
    from onnx_backend import CalibrationMethod, Calibrator, quantize

    from .common import quiet
    from .peers import ort_quantize

    samples = [{"image": calib[i : i + 1].numpy()} for i in range(len(calib))]
    model = onnx.load(str(float_path))
    cal = Calibrator(model, CalibrationMethod.MIN_MAX_ASYM, quiet=True)
    cal.collect_data(samples)
    for name in EXTRA_METHODS[:1] if settings.quick else EXTRA_METHODS:
        cal.calibration_method = CalibrationMethod[name]
        with quiet():
            qm = quantize(model, cal.compute_range(), target="warboy")
        got = run_batched(session(qm), feeds, batch=1)
        row.method_sqnr[name.lower()] = min(sqnr_db(r, q) for r, q in zip(ref, got))
    for method in PEER_METHODS[:1] if settings.quick else PEER_METHODS:
        try:
            with quiet():
                ort_quantize(float_path, samples, method, scratch)
            got = run_batched(session(scratch), feeds, batch=1)
            row.method_sqnr[f"onnxruntime {method}"] = min(sqnr_db(r, q) for r, q in zip(ref, got))
        except Exception as exc:
            row.method_sqnr[f"onnxruntime {method}"] = f"error: {type(exc).__name__}"


def measure(name: str, size: int, settings: Settings, workdir: Path, log=print) -> SeedRow:
    factory, _, original, outputs = FAMILIES[name]
    calib = images.crops(N_CALIB if not settings.quick else 4, size, seed=0)
    evals = images.crops(N_EVAL if not settings.quick else 2, size, seed=1)
    torch.manual_seed(0)
    model = sm.randomized(factory(), calib)
    row = SeedRow(name, size, original, sum(p.numel() for p in model.parameters()) / 1e6)
    subject = _subject(name, size, calib, evals[:1])
    safe = name.split(" ")[0].replace("/", "_")
    float_path, int8_path = workdir / f"{safe}.float.onnx", workdir / f"{safe}.int8.onnx"
    t0 = time.perf_counter()
    export_float(subject, model, float_path)
    row.export_s = time.perf_counter() - t0
    res = quantize_ours(subject, model, *METHOD, path=int8_path)
    row.quantize_s = res.seconds
    row.int8_nodes, row.float_nodes, row.violations = res.int8_nodes, res.float_nodes, len(res.violations)
    row.npu = _npu_summary(res.model, res.int8_nodes, res.float_nodes)
    feeds = {"image": evals.numpy()}
    ref = run_batched(session(float_path), feeds, batch=1)
    got = run_batched(session(int8_path), feeds, batch=1)
    row.sqnr = {o: sqnr_db(r, q) for o, r, q in zip(outputs, ref, got)}
    row.method_sqnr[f"{METHOD[0]}_{'sym' if METHOD[1] else 'asym'}"] = min(row.sqnr.values())
    _other_methods(row, float_path, calib, feeds, ref, settings, workdir / f"{safe}.peer.onnx")
    ex = {"image": evals[:1].numpy()}
    u8_path = workdir / f"{safe}.int8.u8act.onnx"
    onnx.save(for_onnxruntime(res.model), str(u8_path))
    for t in (1,):  # one thread: two threads on this shared 2-core machine measure the neighbours
        row.latency[("float", t)] = latency_ms(float_path, ex, t, settings)
        row.latency[("int8", t)] = latency_ms(int8_path, ex, t, settings)
        row.latency[("u8", t)] = latency_ms(u8_path, ex, t, settings)
    counts = fused_op_counts(int8_path, workdir / "fused" / f"{safe}.int8.onnx")
    row.leftover = {k: v for k, v in counts.items() if k in ("QuantizeLinear", "DequantizeLinear") or not (k.startswith("com.microsoft.Q") or k.startswith("com.microsoft.Nhwc"))}
    log(f"  {name}: export {row.export_s:.1f} s, quantize {row.quantize_s:.1f} s, SQNR {', '.join(f'{v:.1f}' for v in row.sqnr.values())} dB, latency 1T {row.latency[('float', 1)]:.1f} -> {row.latency[('int8', 1)]:.1f} ms")
    return row


def render(rows: list[SeedRow]) -> str:
    out = [
        "No pretrained weights for these families can be had offline, so **no accuracy is claimed**: weights are random, "
        "BatchNorm affine parameters random, BatchNorm running statistics estimated on crops of the two real photographs "
        "scikit-learn ships. Fidelity is the output SQNR of the INT8 model against the float model (both in onnxruntime) on "
        f"{N_EVAL} other crops; torchq's default method ({METHOD[0]}, {'symmetric' if METHOD[1] else 'asymmetric'}), "
        f"{N_CALIB} calibration crops. Detection models end at their raw head outputs (no box decoding or NMS). "
        "Input sizes are smaller than the originals' where noted, to fit the run in this machine's budget.\n"
    ]
    rows_t = []
    for r in rows:
        if r.error:
            rows_t.append([r.name, f"{r.size}", fmt(r.params_m, 1), "—", "—", "—", "—", f"error: {r.error}", "—"])
            continue
        size = f"{r.size}" + ("" if r.size == r.original else f" (orig. {r.original})")
        rows_t.append(
            [r.name, size, fmt(r.params_m, 1), fmt(r.export_s, 1), fmt(r.quantize_s, 1), "all rules hold" if r.violations == 0 else f"**{r.violations} violations**", r.npu, ", ".join(f"{k} {fmt(v, 1)}" for k, v in r.sqnr.items()), "accuracy n/a (random weights)"]
        )
    out.append(table(["model", "input", "params (M)", "float export s", "torchq quantize s", "spec (validate)", "NPU (warboy)", "output SQNR dB", "task metric"], rows_t))
    out.append("\n#### Output SQNR (dB, worst output) by method, torchq vs onnxruntime on the same float model and crops\n")
    out.append("Random-weight networks are far more sensitive to quantization noise than trained ones (nothing in them is redundant), so absolute SQNRs are low; the comparison between quantizers on the same model is what carries information.\n")
    keys = list(dict.fromkeys(k for r in rows for k in r.method_sqnr))
    out.append(table(["model"] + keys, [[r.name] + [r.method_sqnr.get(k) if not isinstance(r.method_sqnr.get(k), str) else r.method_sqnr[k] for k in keys] for r in rows if not r.error]))
    out.append("\n#### Latency in onnxruntime, batch 1, one thread (target INT8 ÷ float ≤ 0.7)\n")
    lat = []
    for r in rows:
        if r.error:
            continue
        for t in (1,):
            f, q, u = r.latency[("float", t)], r.latency[("int8", t)], r.latency[("u8", t)]
            lat.append([r.name, t, f, u, u / f, "yes" if u / f <= 0.7 else "**no**", q / f])
    out.append(table(["model", "threads", "float ms", "torchq INT8 ms (uint8 storage)", "INT8 ÷ float", "≤ 0.7", "int8 storage ÷ float"], lat))
    out.append("\n#### Ops onnxruntime could not fuse into integer kernels (int8-stored model, after its optimizations)\n")
    out.append(table(["model", "float or Q/DQ ops left"], [[r.name, ", ".join(f"{k} {v}" for k, v in r.leftover.items()) or "none"] for r in rows if not r.error]))
    return "\n".join(out)


def run_section(settings: Settings, workdir: Path, log=print) -> tuple[str, list[SeedRow]]:
    torch.set_num_threads(1)
    workdir = workdir / "seed"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    todo = QUICK if settings.quick else {n: f[1] for n, f in FAMILIES.items()}
    for name, size in todo.items():
        log(f"[seed] {name} at {size}x{size}")
        try:
            rows.append(measure(name, size, settings, workdir, log))
        except Exception as exc:  # one family's failure is a result, not the end of the run
            import traceback

            traceback.print_exc()
            rows.append(SeedRow(name, size, FAMILIES[name][2], float("nan"), error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
    return render(rows), rows
