"""The plots of docs/BENCHMARKS.md (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_heatmap(rows, path: Path) -> Path | None:
    if not rows:
        return None
    plt = _plt()
    methods = list(dict.fromkeys(k for r in rows for k in r.ours))
    labels = methods + ["onnxruntime best", "PT2E"]
    data = np.full((len(rows), len(labels)), np.nan)
    for i, r in enumerate(rows):
        f = r.float_onnx or np.nan
        for j, m in enumerate(methods):
            data[i, j] = r.ours.get(m, np.nan) / f * 100
        data[i, -2] = r.best_ort()[1] / f * 100
        data[i, -1] = (r.pt2e / f * 100) if isinstance(r.pt2e, float) else np.nan
    fig, ax = plt.subplots(figsize=(1.0 * len(labels) + 2, 0.6 * len(rows) + 1.8))
    im = ax.imshow(np.clip(data, 90, 101), cmap="RdYlGn", vmin=95, vmax=100.5, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r.subject for r in rows], fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, "—" if np.isnan(data[i, j]) else f"{data[i, j]:.1f}", ha="center", va="center", fontsize=7)
    ax.set_title("INT8 metric ÷ float metric (%)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_bars(acc_rows, seed_rows, path: Path) -> Path | None:
    names, ours, u8 = [], [], []
    for r in acc_rows or []:
        if ("float", 1) in r.latency:
            names.append(r.subject)
            ours.append(r.latency[("ours", 1)] / r.latency[("float", 1)])
            u8.append(r.latency.get(("ours_u8", 1), np.nan) / r.latency[("float", 1)])
    for r in seed_rows or []:
        if not r.error:
            names.append(r.name)
            ours.append(r.latency[("int8", 1)] / r.latency[("float", 1)])
            u8.append(r.latency[("u8", 1)] / r.latency[("float", 1)])
    if not names:
        return None
    plt = _plt()
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(0.55 * len(names) + 3, 4))
    ax.bar(x - 0.2, ours, 0.4, label="torchq INT8, int8 storage (TFLite spec, the NPU)")
    ax.bar(x + 0.2, u8, 0.4, label="torchq INT8, activation_dtype uint8 (for onnxruntime x86)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.7, color="r", ls="--", lw=0.8, label="target 0.7")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("INT8 ÷ float latency\n(onnxruntime, batch 1, 1 thread)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_bars(onnx_rows_mem, path: Path) -> Path | None:
    if not onnx_rows_mem:
        return None
    plt = _plt()
    tools = list(dict.fromkeys(r[0] for r in onnx_rows_mem))
    counts = sorted({r[1] for r in onnx_rows_mem})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(tools))
    for k, n in enumerate(counts):
        vals = [next((r[4] for r in onnx_rows_mem if r[0] == t and r[1] == n and not isinstance(r[4], str)), np.nan) for t in tools]
        ax.bar(x + (k - 0.5) * 0.4, vals, 0.4, label=f"{n} samples")
    ax.set_xticks(x, tools, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("peak RSS − RSS after imports (MiB)")
    ax.set_title("Calibration memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make(results: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    acc = results.get("accuracy")
    p = accuracy_heatmap(acc, folder / "accuracy.png") if acc else None
    if p:
        out["accuracy"] = p
    p = latency_bars(acc, results.get("seed"), folder / "latency.png")
    if p:
        out["latency"] = p
    mem = (results.get("onnx") or {}).get("memory")
    p = memory_bars(mem, folder / "memory.png") if mem else None
    if p:
        out["memory"] = p
    return out
