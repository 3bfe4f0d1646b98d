"""Section: ONNX in, quantized ONNX out (issue 3) -- torchq's backend (Calibrator + quantize) vs
onnxruntime.quantization.quantize_static on float ONNX models with real trained weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .common import Settings, fmt, for_onnxruntime, latency_ms, quiet, run_batched, run_measured, session, sqnr_db, table
from .peers import ORT_METHODS, ort_calibrate_only, ort_quantize

QUICK_METHODS = ("MIN_MAX_ASYM", "MSE_SYM")
OUR_METHODS = ("MIN_MAX_ASYM", "MIN_MAX_SYM", "ENTROPY_ASYM", "ENTROPY_SYM", "PERCENTILE_ASYM", "PERCENTILE_SYM", "MSE_ASYM", "MSE_SYM", "SQNR_ASYM", "SQNR_SYM")
MEMORY_MODEL = "digits_resnet"  # the model whose calibration memory is measured at 64 and 1024 samples


@dataclass
class OnnxRow:
    name: str
    metric: str
    float_metric: float
    ours: dict = field(default_factory=dict)  # method -> (sqnr, metric)
    ours_calib_s: float = float("nan")  # one streaming pass, all methods share it
    ours_select_s: dict = field(default_factory=dict)  # method -> range selection + quantize s
    ours_range_s: dict = field(default_factory=dict)  # method -> range selection alone
    ort_calib_s: dict = field(default_factory=dict)  # method -> onnxruntime's calibration alone
    ort: dict = field(default_factory=dict)  # method -> (sqnr, metric) or error
    ort_s: dict = field(default_factory=dict)
    ort_rules: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    techniques: dict = field(default_factory=dict)  # variant -> (sqnr, metric, seconds), on the best method


def _eval_feeds(subject) -> dict[str, np.ndarray]:
    """Held-back inputs for SQNR: the digits test split, or the MiniLM evaluation sentences."""
    if subject.name.startswith("all-MiniLM"):
        from . import minilm

        a, b = minilm.evaluation_sentences()
        ids, mask = minilm.tokenize(a + b)
        return {"input_ids": ids, "attention_mask": mask}
    from . import digits

    return {"image": digits.test_set()[0]}


def _outputs(model, feeds) -> np.ndarray:
    return run_batched(session(model), feeds, batch=64)[0]


def _median_run(fn, runs: int):
    """fn()'s last result and the median of its wall times over `runs` calls (one call is noise)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, float(np.median(times))


def _calibration_times(ours, theirs, methods, runs: int):
    """(our last Calibrator, our median seconds, {method: onnxruntime's median seconds}), the two
    tools' calibrations taking turns: a slower stretch of the machine slows both, not the one
    that happened to run then. A method onnxruntime fails on has no time (its quantize_static
    error says why)."""
    ours_s, theirs_s, failed = [], {m: [] for m in methods}, set()
    for _ in range(runs):
        t0 = time.perf_counter()
        cal = ours()
        ours_s.append(time.perf_counter() - t0)
        for method in methods:
            if method in failed:
                continue
            try:
                with quiet():
                    theirs_s[method].append(theirs(method))
            except Exception:
                failed.add(method)
    return cal, float(np.median(ours_s)), {m: float(np.median(t)) for m, t in theirs_s.items() if t and m not in failed}


# What the technique pipeline adds to the best of the ten methods, each a flag of `torchq
# quantize-onnx` (docs/ACCURACY.md): the pipeline alone leaves attention masks out of the ranges
# they would otherwise set; bias correction then removes each layer's mean INT8 error.
TECHNIQUE_VARIANTS = {"pipeline": {}, "pipeline + bias correction": {"bias_correction": True}}


def _with_techniques(model: onnx.ModelProto, feeds, method: str, ref: np.ndarray, evals, subject) -> dict:
    """{variant: (SQNR dB, task metric, seconds)}: `method` (a CalibrationMethod name) again through
    onnx_backend.techniques with each of TECHNIQUE_VARIANTS, on the same samples and target."""
    from onnx_backend import CalibrationMethod
    from onnx_backend.techniques.pipeline import Options, quantize_with_techniques

    chosen = CalibrationMethod[method]
    out = {}
    for variant, flags in TECHNIQUE_VARIANTS.items():
        t0 = time.perf_counter()
        with quiet():
            qm, _ = quantize_with_techniques(model, feeds, Options(method=chosen.method.value, symmetric=chosen.symmetric, target="warboy", **flags))
        seconds = time.perf_counter() - t0
        out[variant] = (sqnr_db(ref, _outputs(qm, evals)), subject.evaluate(qm), seconds)
    return out


def best_method(r: OnnxRow) -> str:
    """The name of our method with the highest output SQNR."""
    return max(r.ours, key=lambda k: r.ours[k][0])


def best_with_techniques(r: OnnxRow) -> tuple[str, float] | None:
    """(label, SQNR) of the best of the ten methods and the technique variants, or None for a row
    measured before the variants existed."""
    techniques = getattr(r, "techniques", {})
    if not techniques:
        return None
    method = best_method(r)
    candidates = {method.lower(): r.ours[method][0], **{f"{method.lower()}, {v}": s[0] for v, s in techniques.items()}}
    label = max(candidates, key=candidates.get)
    return label, candidates[label]


def measure(subject, float_path: Path, settings: Settings, workdir: Path, log=print) -> OnnxRow:
    from onnx_backend import CalibrationMethod, Calibrator, quantize, validate

    feeds = subject.calibration_feeds()
    evals = _eval_feeds(subject)
    ref = _outputs(float_path, evals)
    row = OnnxRow(subject.name, subject.metric, subject.evaluate(float_path))
    model = onnx.load(str(float_path))

    def calibrate():
        cal = Calibrator(model, CalibrationMethod.MSE_ASYM, quiet=True)
        cal.collect_data(feeds)
        return cal

    ort_methods = ORT_METHODS[:1] if settings.quick else ORT_METHODS
    cal, row.ours_calib_s, row.ort_calib_s = _calibration_times(calibrate, lambda method: ort_calibrate_only(float_path, feeds, method), ort_methods, settings.calibration_runs)
    best, best_key = None, -np.inf
    for name in QUICK_METHODS if settings.quick else OUR_METHODS:
        cal.calibration_method = CalibrationMethod[name]  # statistics are method-independent: select again
        ranges, row.ours_range_s[name] = _median_run(cal.compute_range, settings.calibration_runs)
        t1 = time.perf_counter()
        with quiet():
            qm = quantize(model, ranges, target="warboy")
        row.ours_select_s[name] = row.ours_range_s[name] + time.perf_counter() - t1
        s = sqnr_db(ref, _outputs(qm, evals))
        row.ours[name] = (s, subject.evaluate(qm))
        if s > best_key:
            best, best_key = qm, s
    log(f"  ours: calibration {row.ours_calib_s:.1f} s, best SQNR {best_key:.1f} dB")
    row.techniques = _with_techniques(model, feeds, best_method(row), ref, evals, subject)
    best_ort, best_ort_key = None, -np.inf
    for method in ort_methods:
        out = workdir / f"{subject.name}.onnxpath.ort_{method}.onnx"
        try:
            with quiet():
                qm, secs = ort_quantize(float_path, feeds, method, out)
            s = sqnr_db(ref, _outputs(out, evals))
            row.ort[method] = (s, subject.evaluate(out))
            row.ort_s[method] = secs
            rules: dict[str, int] = {}
            for v in validate(qm):
                rules[v.rule] = rules.get(v.rule, 0) + 1
            row.ort_rules[method] = rules
            if s > best_ort_key:
                best_ort, best_ort_key = out, s
        except Exception as exc:
            row.ort[method] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    ex = subject.example_feeds()
    row.latency["float"] = latency_ms(float_path, ex, 1, settings)
    row.latency["ours"] = latency_ms(for_onnxruntime(best), ex, 1, settings)  # as deployed on x86 (uint8 storage)
    if best_ort is not None:
        row.latency["ort"] = latency_ms(best_ort, ex, 1, settings)
    return row


def memory_scaling(float_path: Path, counts: tuple[int, ...], quick: bool = False) -> list[list]:
    """Peak RSS of fresh processes calibrating on N digits samples (one sample per batch)."""
    rows = []
    tools = [("torchq Calibrator MSE_ASYM", "onnx-digits", "mse_asym"), ("torchq Calibrator ENTROPY_ASYM", "onnx-digits", "entropy_asym")]
    tools += [(f"onnxruntime {m}", "ort-digits", m) for m in ORT_METHODS]
    if quick:
        tools = [tools[0], tools[2]]
    for n in counts:
        for tool, cmd, method in tools:
            args = [cmd, str(float_path), str(n), method]
            r = run_measured("bench.worker", args)
            if "error" in r:
                rows.append([tool, n, "—", "—", "—", r["error"][:120]])
            else:
                rows.append([tool, n, r["seconds"], r["peak_rss_mib"], r["peak_rss_mib"] - r["rss_after_imports_mib"], ""])
    return rows


def render(rows: list[OnnxRow], mem_rows: list[list], mem_model: str, calibration_runs: int = Settings.calibration_runs) -> str:
    out = [
        "Float ONNX models with real trained weights (the trained digits models' exports and the pretrained MiniLM), the same "
        "calibration and evaluation data for both tools. torchq: `Calibrator` (one streaming pass; each method is then a range "
        "selection over the same statistics) + `quantize(..., target=\"warboy\")`. onnxruntime: `quantize_static`, QDQ, QInt8 "
        "activations and weights, per-channel, after `quant_pre_process`. SQNR: model output vs the float model's, over the "
        "whole held-back set.\n"
    ]
    rows_t = []
    for r in rows:
        bm = best_method(r)
        ort_ok = {k: v for k, v in r.ort.items() if isinstance(v, tuple)}
        om = max(ort_ok, key=lambda k: ort_ok[k][0]) if ort_ok else None
        with_t = best_with_techniques(r)
        rows_t.append(
            [
                r.name,
                f"{fmt(r.ours[bm][0], 1)} ({bm.lower()})",
                f"{fmt(ort_ok[om][0], 1)} ({om})" if om else "error",
                "yes" if om is None or r.ours[bm][0] >= ort_ok[om][0] else "**no**",
                f"{fmt(with_t[1], 1)} ({with_t[0]})" if with_t else "—",
                "—" if with_t is None else "yes" if om is None or with_t[1] >= ort_ok[om][0] else "**no**",
                f"{r.metric}: {fmt(r.float_metric)}",
                fmt(r.ours[bm][1]),
                fmt(ort_ok[om][1]) if om else "—",
                fmt(r.latency["ours"] / r.latency["float"]),
                fmt(r.latency["ort"] / r.latency["float"]) if "ort" in r.latency else "—",
            ]
        )
    out.append(table(["model", "torchq best SQNR dB (method)", "onnxruntime best SQNR dB", "torchq ≥ onnxruntime", "torchq best with techniques SQNR dB", "with techniques ≥ onnxruntime", "float metric", "torchq metric", "onnxruntime metric", "torchq INT8 (uint8 storage) ÷ float latency (1T)", "onnxruntime INT8 ÷ float latency (1T)"], rows_t))
    out.append(
        "\n'With techniques': the best method again through `onnx_backend.techniques` (`torchq quantize-onnx --data ...`), "
        "which leaves attention masks out of the ranges they would otherwise set, alone and with `--bias-correction`; "
        "the best of the three is shown. onnxruntime's quantizer has neither.\n"
    )
    t_heads = ["model", "best method", *(f"{v}: SQNR dB / metric / s" for v in TECHNIQUE_VARIANTS)]
    t_cells = [[r.name, best_method(r).lower(), *(f"{fmt(r.techniques[v][0], 1)} / {fmt(r.techniques[v][1])} / {fmt(r.techniques[v][2], 1)}" if v in r.techniques else "—" for v in TECHNIQUE_VARIANTS)] for r in rows if getattr(r, "techniques", None)]
    if t_cells:
        out.append(table(t_heads, t_cells))
    out.append("\n#### Every method: output SQNR dB / task metric\n")
    heads = ["model"] + [m.lower() for m in OUR_METHODS] + [f"ort {m}" for m in ORT_METHODS]
    cells = []
    for r in rows:
        c = [r.name] + [f"{fmt(r.ours[m][0], 1)} / {fmt(r.ours[m][1])}" if m in r.ours else "—" for m in OUR_METHODS]
        c += [f"{fmt(r.ort[m][0], 1)} / {fmt(r.ort[m][1])}" if isinstance(r.ort.get(m), tuple) else "—" if m not in r.ort else "error" for m in ORT_METHODS]
        cells.append(c)
    out.append(table(heads, cells))
    out.append("\n#### Calibration wall time (same samples)\n")
    out.append(
        f"Calibration alone, each the median of {calibration_runs} runs, the two tools taking turns: torchq = `Calibrator(...)` + one streaming `collect_data` pass (shared by all ten methods) + "
        "`compute_range` for the method; onnxruntime = `create_calibrator` + `collect_data` + `compute_data` on the pre-processed model. "
        "Target: our histogram methods calibrate ≥ 5× faster than onnxruntime's Entropy. The last columns are whole quantizations "
        "(torchq: calibration + range selection + `quantize`; onnxruntime: `quantize_static` with its pre-processing).\n"
    )
    t_rows = []
    for r in rows:
        hist = [r.ours_calib_s + s for m, s in r.ours_range_s.items() if not m.startswith("MIN_MAX")] or [float("nan")]
        ent = r.ort_calib_s.get("Entropy")
        whole = [r.ours_calib_s + s for s in r.ours_select_s.values()]
        t_rows.append(
            [r.name, r.ours_calib_s, fmt(max(hist)), *(fmt(r.ort_calib_s.get(m)) for m in ORT_METHODS), fmt(ent / max(hist)) if ent else "—", _speedups(r, ent), fmt(float(np.median(whole))), *(fmt(r.ort_s.get(m)) for m in ORT_METHODS)]
        )
    out.append(
        table(
            ["model", "torchq collect s", "torchq slowest histogram method: collect + select s", *(f"onnxruntime {m} calibration s" for m in ORT_METHODS), "ort Entropy ÷ torchq slowest", "ort Entropy ÷ torchq " + " · ".join(m.lower() for m in SPEEDUP_METHODS), "torchq whole quantization s (median)", *(f"onnxruntime {m} quantize_static s" for m in ORT_METHODS)],
            t_rows,
        )
    )
    out.append(f"\n#### Peak memory of calibration: 64 vs 1024 samples ({mem_model}, fresh process per run, one sample per batch)\n")
    out.append("Peak RSS (VmHWM) of `python -m bench.worker onnx-digits|ort-digits ...`; 'work' = peak minus the RSS right after imports.\n")
    out.append(table(["tool", "samples", "wall s", "peak RSS MiB", "work MiB", "note"], mem_rows))
    out.append("\n#### Spec rules onnxruntime's output breaks (onnx_backend.validate)\n")
    v_rows = []
    for r in rows:
        for m, rules in r.ort_rules.items():
            v_rows.append([r.name, m, ", ".join(f"{k}: {v}" for k, v in sorted(rules.items())) or "none"])
    out.append(table(["model", "onnxruntime method", "violations by rule"], v_rows))
    return "\n".join(out)


SPEEDUP_METHODS = ("PERCENTILE_ASYM", "MSE_ASYM", "SQNR_ASYM", "ENTROPY_ASYM")


def _speedups(r: OnnxRow, ort_entropy_s: float | None) -> str:
    """onnxruntime's Entropy calibration time over ours (collect + range selection), per method."""
    if not ort_entropy_s:
        return "—"
    return " · ".join(fmt(ort_entropy_s / (r.ours_calib_s + r.ours_range_s[m]), 1) if m in r.ours_range_s else "—" for m in SPEEDUP_METHODS)


def run_section(settings: Settings, workdir: Path, subjects, log=print) -> tuple[str, dict]:
    from .subjects import export_float

    torch.set_num_threads(1)
    workdir = workdir / "accuracy"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    mem_path = None
    for subject in subjects:
        log(f"[onnx path] {subject.name}")
        float_path = workdir / f"{subject.name}.float.onnx"
        if not float_path.is_file():
            export_float(subject, subject.build(), float_path)
        rows.append(measure(subject, float_path, settings, workdir, log))
        if subject.name == MEMORY_MODEL or mem_path is None and subject.name.startswith("digits"):
            mem_path = float_path
    counts = (8, 16) if settings.quick else (64, 1024)
    mem_rows = memory_scaling(mem_path, counts, settings.quick) if mem_path is not None else []
    return render(rows, mem_rows, mem_path.name if mem_path else "—", settings.calibration_runs), {"rows": rows, "memory": mem_rows, "memory_model": mem_path.name if mem_path else "—"}
