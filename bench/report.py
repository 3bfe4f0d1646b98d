"""Assemble docs/BENCHMARKS.md from the sections' markdown."""

from __future__ import annotations

import datetime
from pathlib import Path

TITLES = {
    "imagenet": "0. ImageNet-pretrained EfficientNet-Lite0 / Lite1, as users run them (issue 16)",
    "accuracy": "1. Accuracy: trained models on real data, and pretrained weights (issue 6)",
    "seed": "2. The reference product's model families (random weights)",
    "onnx": "3. ONNX in, quantized ONNX out: torchq's backend vs onnxruntime's quantizer (issue 3)",
    "zoo": "4. Latency of the test zoo (issue 2)",
    "robustness": "5. No calibration method collapses: real OCR models and a hard-swish net (issue 18)",
    "compatibility": "6. Compatibility: the architectures users bring (issue 16)",
    "qat": "6. Quantization-aware fine-tuning: MiniLM and EfficientNet-Lite0 (issue 20)",
}

WHY_SLOW = """\
## Why INT8 is slow in onnxruntime on x86

Measured here, reproducible with `SessionOptions.optimized_model_filepath` (the op counts in the
tables above come from it):

1. **onnxruntime's x86 CPU kernels fuse QDQ groups only with uint8 activations.** Its
   `QDQS8ToU8Transformer` rewrites an int8 `QuantizeLinear -> DequantizeLinear` pair to uint8
   (zero point + 128), after which `Conv`/`Add`/`MatMul`/`MaxPool` groups become
   `QLinearConv`/`QLinearAdd`/`QGemm`/`NhwcMaxPool`. It does so **only when the QuantizeLinear
   feeds exactly one DequantizeLinear**. A tensor with several consumers (every residual branch
   point: the block input feeds conv1 *and* the skip Add or the downsample conv; MaxPool outputs
   feeding two branches) keeps an int8 Q whose output `EnsureUniqueDQForNodeUnit` splits into
   one DQ per consumer; that Q is then skipped by the conversion, and every consumer of it stays
   a float `Conv`/`Add` between Q/DQ. In ResNet50 this leaves 20 of 53 convolutions and all 16
   residual adds in float, plus the Q/DQ conversions around them; onnxruntime's own
   `quantize_static` output (QInt8 activations) shows exactly the same 20 float convs and 16 float
   adds, so this is not specific to torchq's placement.
2. **Per-consumer Q nodes do not help.** Duplicating the Q per consumer with the same scale
   initializers is undone by onnxruntime's common-subexpression elimination; with separately
   named (equal-valued) initializers all 53 convs fuse, but the Add feeding two Qs then no longer
   matches the single-output QDQ Add pattern, so the 16 adds stay float.
3. **Storing the same activations as uint8 fuses everything, so torchq does that for
   onnxruntime.** `QuantConfig(activation_dtype="uint8")` (or
   `ModelEditor.convert_activation_dtype(TensorType.UINT8)` on an existing model) stores the
   identical grid as uint8 (q and the zero point both shifted by 128; weights stay int8), and
   every conv, add and pool fuses (ResNet50: 53 `QLinearConv`, 16 `QLinearAdd`, `NhwcMaxPool`,
   `QGemm`; only the input Q and the output DQ remain). The latency targets above are judged on
   that model; the int8-stored model (the TFLite spec's storage, what the NPU takes) is shown
   beside it.
4. **What is left on depthwise and SiLU networks is onnxruntime's kernels.** With uint8 storage
   every conv, sigmoid and multiply of EfficientNet-B0 fuses into an integer kernel, and its 1x1
   convolutions run 2.7x faster than float; but onnxruntime's integer depthwise convolutions take
   1.75x, and its SiLU (`QLinearSigmoid` + `QLinearMul`, where float runs one fused `QuickGelu`)
   1.7x the float kernels' time, and the two are 65 % of the INT8 model's time
   ([bench/op_profile.md](bench/op_profile.md), `python -m bench.op_profile`). Placement cannot
   change which kernels onnxruntime has: B0 stays near 0.8 of float while ResNet50 (dense convs
   only) reaches 0.28. Placement did matter once: on Warboy a depthwise Conv past 128 groups runs on
   the host, and its ReLU6 used to stay an int8 op between two quantizations (a `DequantizeLinear ->
   QuantizeLinear` requantization in onnxruntime); it is now absorbed into the quantize step of the
   conv's output, which is the clamp (digits_mobilenet INT8 / float 0.95 -> 0.76, same process). On
   the int8-stored model (what the NPU takes) item 1 adds to this: `x * sigmoid(x)` and the SE block
   read their inputs twice, so nearly every activation of an EfficientNet-style network is a branch
   point and its consumers stay float between Q/DQ.
5. **Transformers keep float islands in both quantizers.** LayerNormalization (and GELU, which
   onnxruntime has no integer kernel for) run in float between Q/DQ in torchq's and onnxruntime's
   models alike. torchq quantizes a Linear's output after its bias Add (the exporter emits
   MatMul + Add for 3-D inputs), so onnxruntime runs those as `MatMulIntegerToFloat`; onnxruntime's
   own quantizer puts a Q/DQ between MatMul and Add and gets `QLinearMatMul`.
6. **Tiny models are overhead-bound.** The digits models run in 0.1–0.5 ms; per-node dispatch and
   the NCHW↔NHWC transposes that onnxruntime inserts around integer convolutions cost as much as the
   arithmetic, so their ratios say little about int8 speed.
7. **Two threads on this machine are not a speed-up measurement.** The machine has 2 cores shared
   with other jobs; when another process is busy, 2-thread runs are slower than 1-thread runs for
   float and INT8 alike. The 1-thread columns are the reliable ones.
"""


ACCURACY_FINDINGS = """\
## What loses accuracy, and why

Diagnosed on this run's models (the tables above give the numbers):

1. **Entropy on depthwise / ReLU6 networks.** On digits_mobilenet both entropy variants lose about
   12 points. The first depthwise ReLU6 output (range [0, 6], half its values exactly 0) gets
   [0, 1.05] and 8.6 % of its values clipped. NVIDIA's pytorch-quantization KL search run on the same
   histogram (2048 bins, zero bin flattened, 256 levels) picks 1.03: this is the KL criterion itself,
   not an implementation slip. (A real slip did exist: without flattening the spike at 0, KL cut
   every post-ReLU range to about 1/8 of its maximum and the digits CNN fell from 99.3 % to 59 %;
   fixed on this branch and, independently, on main.) min_max, percentile, mse and sqnr do not
   have the problem; per-tensor method choice (issue 7) is the natural fix.
2. **The sentence encoder with padded batches.** BERT's additive attention mask (-10000 on padding)
   is added to the attention scores, so their calibrated range becomes about [-10006, 0]
   (asymmetric) or ±10100 (symmetric): a step of ~40 where the real scores span about ±10. With only
   the Softmax group quantized (its input Q/DQ and the spec's fixed 1/256 output) the embeddings'
   cosine to float already falls to ~0.46, while fake-quantizing only the softmax output to 1/256 in
   PyTorch keeps 0.99998: the damage is the mask-dominated input range. Every quantizer suffers
   (onnxruntime and PT2E included). This table is plain calibration; `attention_masks` (or any
   accuracy technique) keeps the mask out of the scores' statistics: cosine 0.94-0.95, and 0.99 with
   the accuracy-targeted fallback (docs/ACCURACY_TABLE.md). Without padding (one sentence per batch)
   the best cosine to the float embeddings is about 0.95 for torchq, 0.87 for PT2E and 0.85 for
   onnxruntime (whose Entropy and Percentile calibrators crash on sentences of different lengths).
   torchq's edge there: the residual sums before each LayerNorm, which have a few huge channels,
   run on the host with the LayerNorm instead of being quantized; what is left is mostly the second
   Linear of each MLP (docs/ACCURACY.md).
3. **SiLU / squeeze-excitation with random weights.** On EfficientNet-B0 and V2-S onnxruntime's
   quantizer reaches a higher output SQNR than torchq's default MSE ranges; torchq's min-max and
   SQNR ranges close part of the gap (B0 10.7 vs 11.0 dB, V2-S 9.3 vs 10.8 dB; the seed table above). Its models break the fixed-output rule on
   every Sigmoid (see the validator table): they give the gate a calibrated, finer scale, where the
   TFLite spec fixes 1/256 for Sigmoid outputs. That is the likely cause (SE gates sit in a narrow
   band around 0.5); it is the price of the spec, and worth a per-target switch if the NPU allows.
"""


ENTRY_POINTS = """\
## The models, for recipes and for reuse

Each trained model's factory, calibration data and evaluation are importable (`module:name`):

| model | factory | calibration | evaluation |
|---|---|---|---|
| digits plain CNN / ResNet / MobileNetV2 / EfficientNet / ViT | `bench.digits:cnn_model`, `:resnet_model`, `:mobilenet_model`, `:efficientnet_model`, `:vit_model` (trained once, cached) | `bench.digits:calibration_loader` ((image, label) batches) | `bench.digits:evaluate` (top-1 %, torch module or ONNX) |
| all-MiniLM-L6-v2 | `bench.minilm:load_model` | `bench.minilm:calibration_loader` ((input_ids, attention_mask) batches) | `bench.minilm:evaluate` (paraphrase top-1 %) |
| the reference product's families | `bench.seed_models:ResNet50`, `:efficientnet_b0`, `:efficientnet_v2_s`, `:ConvNeXt`, `:RetinaNet`, `:SSDMobileNet`, `:SSDResNet34`, `:YOLOv5`, `:YOLOX` (random init; `bench.seed_models:randomized` sets BatchNorm statistics) | `bench.images:calibration_loader` (crops of real photos) | none (no pretrained weights offline) |
"""


def _yes(ok: bool) -> str:
    return "met" if ok else "**missed**"


def summary(results: dict) -> str:
    """The issues' targets, each judged from the measured rows."""
    import numpy as np

    lines = ["## Targets at a glance", "", "| target | verdict | detail |", "|---|---|---|"]
    for r in results.get("imagenet") or []:
        ours = {c.setting: c.result for c in r.cells if c.tool == "torchq" and c.result is not None}
        peers = [c.result.top1 for c in r.cells if c.tool != "torchq" and c.result is not None]
        default = ours.get("mse_asym")
        if default is not None:
            met = default.top1 >= 98 and default.top5 >= 100 and all(default.top1 >= p for p in peers)
            worst = min(ours, key=lambda k: ours[k].top1)
            lines.append(
                f"| {r.model}: default config ≥ 98 % top-1 agreement, 100 % top-5, ahead of onnxruntime and PT2E ({r.evaluation} crops, onnxruntime default session) | {_yes(met)} | "
                f"default {default.top1:.1f} % / {default.top5:.1f} %; peers " + ", ".join(f"{c.tool} {c.result.top1:.1f} %" for c in r.cells if c.tool != "torchq" and c.result is not None)
                + f"; best torchq setting {max(ours, key=lambda k: ours[k].top1)} {max(a.top1 for a in ours.values()):.1f} %, worst {worst} {ours[worst].top1:.1f} % |"
            )
    acc = results.get("accuracy") or []
    if acc:
        cnn = [r for r in acc if r.conv_net]
        ratios = {r.subject: r.best_ours()[1] / r.float_onnx * 100 for r in cnn}
        lines.append(f"| INT8 ÷ float ≥ 99.5 % on every CNN (best method) | {_yes(all(v >= 99.5 for v in ratios.values()))} | " + ", ".join(f"{k} {v:.2f} %" for k, v in ratios.items()) + " |")
        beat = {}
        for r in acc:
            key = (lambda d: max(v[0] for k, v in d.items() if not k.startswith("ort_") and k != "pt2e")) if r.cosine else None
            ours = key(r.cosine) if key else r.best_ours()[1]
            peers = []
            if r.cosine:
                peers = [v[0] for k, v in r.cosine.items() if k.startswith("ort_") or k == "pt2e"]
            else:
                peers = [v for v in (r.best_ort()[1], r.pt2e if isinstance(r.pt2e, float) else np.nan) if np.isfinite(v)]
            beat[r.subject] = all(ours >= p - 1e-9 for p in peers)
        lines.append(f"| torchq best ≥ each peer's best, every model | {_yes(all(beat.values()))} | " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in beat.items()) + " (cosine for the sentence encoder) |")
    lat = {}
    for r in acc:
        if r.conv_net and ("float", 1) in r.latency:
            lat[r.subject] = r.latency[("ours_u8", 1)] / r.latency[("float", 1)]
    for r in results.get("seed") or []:
        if not r.error:
            lat[r.name] = r.latency[("u8", 1)] / r.latency[("float", 1)]
    if lat:
        lines.append(f"| INT8 ÷ float latency ≤ 0.7 on conv nets, batch 1, 1 thread (activation_dtype uint8) | {_yes(all(v <= 0.7 for v in lat.values()))} | " + ", ".join(f"{k} {v:.2f}" for k, v in lat.items()) + " |")
    onnx = results.get("onnx") or {}
    rows = onnx.get("rows") or []
    if rows:
        best = {r.name: (max(v[0] for v in r.ours.values()), max([v[0] for v in r.ort.values() if isinstance(v, tuple)] or [-np.inf])) for r in rows}
        fid = {k: ours >= theirs for k, (ours, theirs) in best.items()}
        lines.append(f"| ONNX path: best fidelity (SQNR) ≥ onnxruntime's best | {_yes(all(fid.values()))} | " + ", ".join(f"{k} {'yes' if v else 'no'} ({best[k][0]:.2f} vs {best[k][1]:.2f} dB)" for k, v in fid.items()) + " |")
        from .onnx_path import best_with_techniques

        with_t = {r.name: (t, best[r.name][1]) for r in rows if (t := best_with_techniques(r))}
        if with_t:
            lines.append(f"| ONNX path: best fidelity with the technique flags (attention masks, bias correction) ≥ onnxruntime's best | {_yes(all(t[1] >= theirs for t, theirs in with_t.values()))} | " + ", ".join(f"{k} {'yes' if t[1] >= theirs else 'no'} ({t[1]:.2f} vs {theirs:.2f} dB)" for k, (t, theirs) in with_t.items()) + " |")
        speed = {}
        for r in rows:
            ent = getattr(r, "ort_calib_s", {}).get("Entropy")
            hist = [r.ours_calib_s + s for m, s in getattr(r, "ours_range_s", {}).items() if not m.startswith("MIN_MAX")]
            if ent and hist:
                speed[r.name] = ent / max(hist)
        if speed:
            lines.append(f"| ONNX path: histogram methods calibrate ≥ 5× faster than onnxruntime's Entropy calibration | {_yes(all(v >= 5 for v in speed.values()))} | " + ", ".join(f"{k} {v:.1f}×" for k, v in speed.items()) + " |")
        faster = {r.name: r.latency["ours"] <= r.latency["ort"] for r in rows if "ort" in r.latency}
        lines.append(f"| ONNX path: torchq INT8 (uint8 storage) runs faster than onnxruntime's INT8 (1 thread) | {_yes(all(faster.values()))} | " + ", ".join(f"{k} {r.latency['ours']:.3f} vs {r.latency['ort']:.3f} ms" for r in rows for k in [r.name] if "ort" in r.latency) + " |")
    compat = results.get("compatibility") or []
    if compat:
        failing = [r.name for r in compat if r.verdict() != "pass"]
        lines.append(
            f"| Compatibility: ≥ 45 architectures, both exporters, 0 spec violations, SQNR ≥ onnxruntime − 1 dB (docs/COMPATIBILITY.md) | {_yes(len(compat) >= 45 and not failing)} | "
            f"{len(compat) - len(failing)} of {len(compat)} pass" + (f"; not: {', '.join(failing)}" if failing else "") + " |"
        )
    mem = onnx.get("memory") or []
    ours = [m for m in mem if m[0].startswith("torchq") and not isinstance(m[4], str)]
    if ours:
        by_tool: dict[str, dict[int, float]] = {}
        for m in mem:
            if not isinstance(m[4], str):
                by_tool.setdefault(m[0], {})[m[1]] = m[4]
        flat = {t: v for t, v in by_tool.items() if t.startswith("torchq") and len(v) == 2}
        detail = "; ".join(f"{t}: " + " → ".join(f"{v:.0f} MiB" for _, v in sorted(d.items())) for t, d in by_tool.items())
        ok = all(abs(list(d.values())[1] - list(d.values())[0]) < 0.25 * max(list(d.values())[0], 20) for d in flat.values())
        lines.append(f"| calibration memory flat from 64 to 1024 samples (work above imports) | {_yes(ok)} | {detail} |")
    return "\n".join(lines) + "\n"


def assemble(texts: dict[str, str], figures: dict[str, Path], *, command: str, machine: str, seconds: float, section_time: dict[str, float], quick: bool, results: dict | None = None, stamps: dict[str, str] | None = None) -> str:
    date = datetime.date.today().isoformat()
    lines = [
        "# Benchmarks" + (" (quick mode: tiny settings, numbers are not meaningful)" if quick else ""),
        "",
        f"Generated by `{command}` (also `make bench`) on {date}, in {seconds / 60:.1f} minutes; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in section_time.items())
        + ".",
        f"Machine: {machine}. Latency: onnxruntime CPU, batch 1, `intra_op_num_threads` 1 and 2, all graph optimizations.",
        "Trained weights are cached in `bench/.cache` (delete it to retrain; training is deterministic). Raw numbers: `bench/results.json` beside this file.",
        *(
            [
                "Sections not measured by this command come from the cache of earlier `python -m bench.run` runs of this checkout, measured at: "
                + ", ".join(f"{k} {v}" for k, v in stamps.items())
                + "."
            ]
            if stamps
            else []
        ),
        "",
        "Everything below is measured by the scripts in `bench/`; nothing is typed in by hand except the two explanations at the end",
        "([why INT8 is slow in onnxruntime on x86](#why-int8-is-slow-in-onnxruntime-on-x86), [what loses accuracy](#what-loses-accuracy-and-why)),",
        "whose numbers come from these tables and from the diagnostics they describe.",
        "",
    ]
    if results:
        lines += [summary(results), ""]
    for key, title in TITLES.items():
        if key not in texts:
            continue
        lines += [f"## {title}", ""]
        if key == "accuracy" and "accuracy" in figures:
            lines += [f"![INT8 ÷ float metric per model and method](bench/{figures['accuracy'].name})", ""]
        if key == "seed" and "latency" in figures:
            lines += [f"![INT8 ÷ float latency](bench/{figures['latency'].name})", ""]
        if key == "onnx" and "memory" in figures:
            lines += [f"![Calibration memory, 64 vs 1024 samples](bench/{figures['memory'].name})", ""]
        lines += [texts[key], ""]
    lines += [WHY_SLOW, ACCURACY_FINDINGS, ENTRY_POINTS]
    return "\n".join(lines)
