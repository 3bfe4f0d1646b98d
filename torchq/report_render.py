"""Writing a QuantReport: Markdown, HTML, JSON and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from onnx_backend.errors import OutputPathError
from onnx_backend.model_io import atomic_output, write_text_atomic

from .report import QuantReport, TensorResult

MAX_BARS = 60  # tensors in the per-layer plot; beyond this, the worst ones (in graph order)
TABLE_ROWS = 30
GOOD_DB, POOR_DB = 30.0, 15.0  # colour bands of the plots and tables


def _fmt_db(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:.1f}"


def _pct(v: float) -> str:
    return "0" if v == 0 else f"{v * 100:.3g} %"


def _rng(r: tuple[float, float]) -> str:
    return f"[{r[0]:.4g}, {r[1]:.4g}]"


def _band(db: float) -> str:
    return "good" if db >= GOOD_DB else "fair" if db >= POOR_DB else "poor"


def _slug(name: str) -> str:
    # named after the tensor only, so a rerun overwrites its own plots
    return f"hist_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:80]}.png"


# ---- plots ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write a figure atomically."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def _finite(v: float, cap: float) -> float:
    return cap if v == math.inf else 0.0 if v == -math.inf else v


def plot_layers(report: QuantReport, path: Path, highlight: set[str]) -> Path:
    """Horizontal bars: SQNR of each quantized activation in graph order (input at the top); the
    dot is the tensor's own quantization alone, so a long gap between bar and dot is error
    carried in from earlier layers."""
    plt = _pyplot()
    acts = sorted((t for t in report.tensors if t.kind == "activation"), key=lambda t: t.order)
    shown = acts
    if len(acts) > MAX_BARS:
        keep = {t.name for t in report.worst(MAX_BARS)}
        shown = [t for t in acts if t.name in keep]
    finite = [v for t in shown for v in (t.sqnr_db, t.own_sqnr_db) if math.isfinite(v)]
    cap = max(finite + [GOOD_DB + 10]) + 5
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.32 * len(shown)))
    y = np.arange(len(shown))
    colors = ["#d62728" if t.name in highlight else "#1f77b4" for t in shown]
    ax.barh(y, [_finite(t.sqnr_db, cap) for t in shown], color=colors, height=0.7, label="SQNR of the INT8 model's tensor (all error so far)")
    ax.scatter([_finite(t.own_sqnr_db, cap) for t in shown], y, color="black", marker="D", s=16, zorder=3, label="this tensor's own quantization alone")
    ax.set_yticks(y, [f"{t.name}  ({t.op_type})" for t in shown], fontsize=8)
    ax.invert_yaxis()
    for x, style in ((POOR_DB, ":"), (GOOD_DB, "--")):
        ax.axvline(x, color="grey", linestyle=style, linewidth=0.8)
    ax.set_xlim(0, cap)
    ax.set_xlabel("SQNR vs the float model (dB, higher is better)")
    title = "Per-layer SQNR, in graph order"
    if len(shown) < len(acts):
        title += f" ({len(shown)} worst of {len(acts)} tensors)"
    ax.set_title(title + f"\nred: the {len(highlight)} with the worst own quantization (histograms in the report)", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.9 / (1.4 + 0.32 * len(shown))), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


_METHOD_COLORS = {"min_max": "#2ca02c", "percentile": "#9467bd", "mse": "#ff7f0e", "entropy": "#8c564b", "sqnr": "#17becf"}


def _rebinned(stats, bars: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """The histogram merged into about `bars` bars between the observed min and max."""
    edges = stats.edges()
    counts = stats.counts.astype(np.float64)
    nz = np.flatnonzero(counts)
    lo, hi = edges[nz[0]], edges[nz[-1] + 1]
    centres = (edges[:-1] + edges[1:]) / 2
    new_edges = np.linspace(lo, hi, bars + 1)
    merged, _ = np.histogram(centres, bins=new_edges, weights=counts)
    return merged, new_edges


def plot_histogram(report: QuantReport, t: TensorResult, rank: int, path: Path) -> Path:
    """The float values of one tensor with the range the INT8 model uses (shaded) and the range
    each method would choose (dashed: asymmetric, dotted: symmetric)."""
    plt = _pyplot()
    stats = report.statistics[t.name]
    counts, edges = _rebinned(stats)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.stairs(counts, edges, fill=True, color="#9ecae1", label="float values (calibration data)")
    ax.set_yscale("log")
    ax.axvspan(t.range[0], t.range[1], color="#fdae6b", alpha=0.25, label=f"INT8 range used {_rng(t.range)}")
    ymax = counts.max() * 3
    groups: dict[tuple, list] = {}  # methods that pick the same range share one line
    for m in report.method_ranges.get(t.name, []):
        groups.setdefault(m.range, []).append(m)
    for rng, ms in groups.items():
        base = ms[0].method.removesuffix("_sym")
        style = ":" if all(m.method.endswith("_sym") for m in ms) else "--"
        edges_to_draw = [x for x in rng if x != 0.0]  # every method's range contains 0; a line there says nothing
        ax.vlines(edges_to_draw, 0.8, ymax, colors=_METHOD_COLORS.get(base, "k"), linestyles=style, linewidth=1.2, label=f"{', '.join(m.method for m in ms)}: {_rng(rng)}, {_fmt_db(ms[0].sqnr_db)} dB")
    ax.set_ylim(0.8, ymax * 1.5)
    span = max(edges[-1], t.range[1]) - min(edges[0], t.range[0])
    ax.set_xlim(min(edges[0], t.range[0]) - 0.03 * span, max(edges[-1], t.range[1]) + 0.03 * span)
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    ax.set_title(
        f"#{rank} {t.name} ({t.op_type}): SQNR {_fmt_db(t.sqnr_db)} dB, own {_fmt_db(t.own_sqnr_db)} dB, {_pct(t.clipped)} clipped",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, title="range by method (est. SQNR)", title_fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


# ---- text -----------------------------------------------------------------------------------------


def _summary_lines(report: QuantReport) -> list[str]:
    acts = report.worst()
    out = report.worst(1)
    lines = [f"{len(acts)} quantized activations and {sum(t.kind == 'weight' for t in report.tensors)} weights compared on {report.samples} samples."]
    if out:
        final = [t for t in acts if t.order == max(a.order for a in acts)]
        lines.append(f"Worst tensor: `{out[0].name}` ({out[0].op_type}) at {_fmt_db(out[0].sqnr_db)} dB.")
        if final:
            lines.append(f"Last quantized tensor: `{final[0].name}` at {_fmt_db(final[0].sqnr_db)} dB.")
    hurt = [layer for layer in report.layers if layer.lost_db is not None and layer.lost_db > 0][:1]
    if hurt:
        lines.append(f"Most SQNR lost at node `{hurt[0].node}` ({hurt[0].op_type}, output `{hurt[0].output}`): {_fmt_db(hurt[0].lost_db)} dB.")
    own = report.worst(1, own=True)
    if own:
        lines.append(f"Worst own quantization: `{own[0].name}`, {_fmt_db(own[0].own_sqnr_db)} dB with {_pct(own[0].clipped)} of its values clipped by {_rng(own[0].range)}.")
    return lines


SENSITIVITY_NOTE = (
    "Each layer quantized alone (the rest float) and every layer but it quantized, with torchq's default settings "
    "(asymmetric MSE, target warboy) on the report's samples; the metric is the output SQNR against float (dB). "
    "Most harmful first: the largest gain from keeping the layer float."
)


def _sensitivity_rows(sensitivity: dict) -> list[tuple[str, str, str, str]]:
    return [(r["layer"], r["op"], _fmt_db(r["only_this_quantized"]), _fmt_db(r["all_but_this_quantized"])) for r in sensitivity["layers"][:TABLE_ROWS]]


def _sensitivity_markdown(sensitivity: dict | None) -> list[str]:
    if sensitivity is None:
        return []
    lines = ["", "## Sensitivity: each layer alone, and all but it", "", SENSITIVITY_NOTE, f"Everything quantized: {_fmt_db(sensitivity['quantized'])} dB.", ""]
    lines += ["| layer | op | only this quantized (dB) | all but this quantized (dB) |", "|---|---|---|---|"]
    lines += [f"| `{layer}` | {op} | {only} | {all_but} |" for layer, op, only, all_but in _sensitivity_rows(sensitivity)]
    return lines


def markdown(report: QuantReport, plots: dict[str, str]) -> str:
    lines = [f"# INT8 vs float: `{report.int8_model}`", "", f"Float model `{report.float_model}`. " + " ".join(_summary_lines(report)), ""]
    if "layers" in plots:
        lines += [f"![per-layer SQNR]({plots['layers']})", ""]
    lines += ["## Layers that lose the most", "", "SQNR lost = worst SQNR among the node's quantized inputs minus its output's SQNR.", ""]
    lines += ["| node | op | inputs (dB) | output (dB) | lost (dB) | weights (dB) |", "|---|---|---|---|---|---|"]
    for layer in report.layers[:TABLE_ROWS]:
        lines.append(f"| `{layer.node}` | {layer.op_type} | {_fmt_db(layer.input_sqnr_db)} | {_fmt_db(layer.output_sqnr_db)} | {_fmt_db(layer.lost_db)} | {_fmt_db(layer.weight_sqnr_db)} |")
    lines += _sensitivity_markdown(report.sensitivity)
    lines += ["", "## Activations, worst first", ""]
    lines += ["| tensor | op | SQNR (dB) | own (dB) | clipped | range | scale | zero point |", "|---|---|---|---|---|---|---|---|"]
    for t in report.worst()[:TABLE_ROWS]:
        lines.append(f"| `{t.name}` | {t.op_type} | {_fmt_db(t.sqnr_db)} | {_fmt_db(t.own_sqnr_db)} | {_pct(t.clipped)} | {_rng(t.range)} | {t.scale:.4g} | {t.zero_point} |")
    lines += ["", "## Weights, worst first", ""]
    lines += ["| weight | used by | SQNR (dB) | clipped | per-channel |", "|---|---|---|---|---|"]
    for t in report.worst(kind="weight")[:TABLE_ROWS]:
        lines.append(f"| `{t.name}` | `{t.producer}` ({t.op_type}) | {_fmt_db(t.sqnr_db)} | {_pct(t.clipped)} | {'yes' if t.per_channel else 'no'} |")
    lines += ["", "## Ranges by method, for the tensors whose own quantization is worst", ""]
    for i, (name, ranges) in enumerate(report.method_ranges.items(), 1):
        t = next(x for x in report.tensors if x.name == name)
        lines += [f"### {i}. `{name}` (used {_rng(t.range)}, SQNR {_fmt_db(t.sqnr_db)} dB, own {_fmt_db(t.own_sqnr_db)} dB)", ""]
        if name in plots:
            lines += [f"![histogram of {name}]({plots[name]})", ""]
        lines += ["| method | range | est. SQNR (dB) | clipped |", "|---|---|---|---|"]
        lines += [f"| {m.method} | {_rng(m.range)} | {_fmt_db(m.sqnr_db)} | {_pct(m.clipped)} |" for m in ranges]
        lines.append("")
    if report.unmatched:
        lines += ["## Not compared", "", "| INT8 tensor | why |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in sorted(report.unmatched.items())]
        lines.append("")
    lines += [
        "---",
        "SQNR = 10 log10(sum f^2 / sum (f - q)^2) over all samples, f the float model's tensor, q the INT8 model's "
        "dequantized tensor; *own* applies only this tensor's quantization to f. *clipped* is the share of f outside the "
        "quantized range. Estimated SQNR per method is computed on the histogram. Full data: report.json.",
        "",
    ]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:.9em}
.good{background:#e5f5e0}.fair{background:#fff7bc}.poor{background:#fdd0a2}img{max-width:100%;border:1px solid #eee}"""


def _cell(v: str, cls: str = "") -> str:
    return f'<td class="{cls}">{v}</td>' if cls else f"<td>{v}</td>"


def html_page(report: QuantReport, plots: dict[str, str]) -> str:
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>torchq report: {e(report.int8_model)}</title><style>{_CSS}</style>"]
    parts.append(f"<h1>INT8 vs float: <code>{e(report.int8_model)}</code></h1><p>Float model <code>{e(report.float_model)}</code>. ")
    parts.append(" ".join(e(line).replace("`", "") for line in _summary_lines(report)) + "</p>")
    if "layers" in plots:
        parts.append(f"<img src='{e(plots['layers'])}' alt='per-layer SQNR'>")
    parts.append("<h2>Layers that lose the most</h2><p>SQNR lost = worst SQNR among the node's quantized inputs minus its output's SQNR.</p>")
    parts.append("<table><tr><th>node</th><th>op</th><th>inputs (dB)</th><th>output (dB)</th><th>lost (dB)</th><th>weights (dB)</th></tr>")
    for layer in report.layers[:TABLE_ROWS]:
        parts.append(
            "<tr>" + _cell(f"<code>{e(layer.node)}</code>") + _cell(e(layer.op_type)) + _cell(_fmt_db(layer.input_sqnr_db), "num")
            + _cell(_fmt_db(layer.output_sqnr_db), "num " + _band(layer.output_sqnr_db)) + _cell(_fmt_db(layer.lost_db), "num") + _cell(_fmt_db(layer.weight_sqnr_db), "num") + "</tr>"
        )
    parts.append("</table>")
    if report.sensitivity is not None:
        parts.append(f"<h2>Sensitivity: each layer alone, and all but it</h2><p>{e(SENSITIVITY_NOTE)} Everything quantized: {_fmt_db(report.sensitivity['quantized'])} dB.</p>")
        parts.append("<table><tr><th>layer</th><th>op</th><th>only this quantized (dB)</th><th>all but this quantized (dB)</th></tr>")
        parts += ["<tr>" + _cell(f"<code>{e(layer)}</code>") + _cell(e(op)) + _cell(only, "num") + _cell(all_but, "num") + "</tr>" for layer, op, only, all_but in _sensitivity_rows(report.sensitivity)]
        parts.append("</table>")
    parts.append("<h2>Activations, worst first</h2>")
    parts.append("<table><tr><th>tensor</th><th>op</th><th>SQNR (dB)</th><th>own (dB)</th><th>clipped</th><th>range</th><th>scale</th><th>zero point</th></tr>")
    for t in report.worst():
        parts.append(
            "<tr>" + _cell(f"<code>{e(t.name)}</code>") + _cell(e(t.op_type)) + _cell(_fmt_db(t.sqnr_db), "num " + _band(t.sqnr_db))
            + _cell(_fmt_db(t.own_sqnr_db), "num " + _band(t.own_sqnr_db)) + _cell(_pct(t.clipped), "num") + _cell(_rng(t.range)) + _cell(f"{t.scale:.4g}", "num") + _cell(str(t.zero_point), "num") + "</tr>"
        )
    parts.append("</table><h2>Weights, worst first</h2><table><tr><th>weight</th><th>used by</th><th>SQNR (dB)</th><th>clipped</th><th>per-channel</th></tr>")
    for t in report.worst(kind="weight"):
        parts.append("<tr>" + _cell(f"<code>{e(t.name)}</code>") + _cell(f"<code>{e(t.producer)}</code> ({e(t.op_type)})") + _cell(_fmt_db(t.sqnr_db), "num " + _band(t.sqnr_db)) + _cell(_pct(t.clipped), "num") + _cell("yes" if t.per_channel else "no") + "</tr>")
    parts.append("</table><h2>Ranges by method, for the tensors whose own quantization is worst</h2>")
    for i, (name, ranges) in enumerate(report.method_ranges.items(), 1):
        t = next(x for x in report.tensors if x.name == name)
        parts.append(f"<h3>{i}. <code>{e(name)}</code> (used {_rng(t.range)}, SQNR {_fmt_db(t.sqnr_db)} dB)</h3>")
        if name in plots:
            parts.append(f"<img src='{e(plots[name])}' alt='histogram of {e(name)}'>")
        parts.append("<table><tr><th>method</th><th>range</th><th>est. SQNR (dB)</th><th>clipped</th></tr>")
        for m in ranges:
            parts.append("<tr>" + _cell(e(m.method)) + _cell(_rng(m.range)) + _cell(_fmt_db(m.sqnr_db), "num " + _band(m.sqnr_db)) + _cell(_pct(m.clipped), "num") + "</tr>")
        parts.append("</table>")
    if report.unmatched:
        parts.append("<h2>Not compared</h2><table><tr><th>INT8 tensor</th><th>why</th></tr>")
        parts += ["<tr>" + _cell(f"<code>{e(k)}</code>") + _cell(e(v)) + "</tr>" for k, v in sorted(report.unmatched.items())]
        parts.append("</table>")
    parts.append("<p><small>SQNR = 10 log10(&Sigma;f&sup2; / &Sigma;(f &minus; q)&sup2;) over all samples; <i>own</i> applies only this tensor's quantization to f; "
                 "<i>clipped</i> is the share of f outside the quantized range. Full data: report.json.</small></p>")
    return "\n".join(parts) + "\n"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(report: QuantReport, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """report.md, report.html, report.json and the PNGs in `out_dir` (created if missing)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot create the report folder ({exc.strerror or exc})") from None
    written: dict[str, Path] = {}
    names: dict[str, str] = {}
    if plots:
        worst = [name for name in report.method_ranges if name in report.statistics and report.statistics[name].count]  # own-SQNR order
        written["layers"] = plot_layers(report, out / "sqnr_per_layer.png", set(worst))
        names["layers"] = "sqnr_per_layer.png"
        for i, name in enumerate(worst, 1):
            t = next(x for x in report.tensors if x.name == name)
            file = _slug(name)
            written[name] = plot_histogram(report, t, i, out / file)
            names[name] = file
    written["json"] = write_text_atomic(out / "report.json", json.dumps(_json_safe(report.to_dict()), indent=1) + "\n")
    written["markdown"] = write_text_atomic(out / "report.md", markdown(report, names))
    written["html"] = write_text_atomic(out / "report.html", html_page(report, names))
    return written
