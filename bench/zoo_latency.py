"""Section: INT8 vs float latency in onnxruntime for the test zoo (issue 2, "Speed that matters"),
batch 1, one and two threads, with what onnxruntime left unfused."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from .common import ROOT, Settings, fused_op_counts, latency_ms, quiet, table, for_onnxruntime


def _zoo():
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from zoo import ZOO  # tests/zoo.py: the architectures the spine is tested on

    return ZOO


@dataclass
class ZooRow:
    name: str
    latency: dict = field(default_factory=dict)
    unfused: dict = field(default_factory=dict)
    error: str = ""


def _unfused(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if not (k.startswith("com.microsoft.Q") or k.startswith("com.microsoft.Nhwc") or k in ("Transpose",))}


def measure(name: str, entry, settings: Settings, workdir: Path) -> ZooRow:
    import torchq

    row = ZooRow(name)
    model = entry.model()
    example = entry.inputs(torch.Generator().manual_seed(5))
    ex1 = tuple(t[:1] for t in example)
    with quiet(), torch.no_grad():
        fp = torch.onnx.export(model, ex1, dynamo=True, opset_version=18, input_names=entry.input_names, output_names=entry.output_names, optimize=True, verbose=False).model_proto
        q = torchq.quantize(model, entry.calibration(8), ex1, input_names=entry.input_names, output_names=entry.output_names, quiet=True)
    feeds = {n: t.numpy() for n, t in zip(entry.input_names, ex1)}
    u8 = for_onnxruntime(q)
    for t in (1, 2):
        row.latency[("float", t)] = latency_ms(fp, feeds, t, settings)
        row.latency[("int8", t)] = latency_ms(q, feeds, t, settings)
        row.latency[("u8", t)] = latency_ms(u8, feeds, t, settings)
    row.unfused = _unfused(fused_op_counts(q, workdir / "zoo" / f"{name}.fused.onnx"))
    return row


def render(rows: list[ZooRow]) -> str:
    out = [
        "Each zoo model (tests/zoo.py) quantized by `torchq.quantize` with the default config, batch 1. "
        "INT8 = `QuantConfig(activation_dtype=\"uint8\")`, torchq's model for onnxruntime on x86; the int8-stored model (the spec's storage) is shown for comparison. "
        "Tiny models: per-node overhead dominates, so these ratios say more about fusion than about int8 arithmetic. "
        "Last column: ops left outside integer kernels in the INT8 model after onnxruntime's optimizations.\n"
    ]
    rows_t = []
    for r in rows:
        if r.error:
            rows_t.append([r.name, "—", "—", "—", "—", "—", "—", "—", f"error: {r.error}"])
            continue
        f1, q1, u1 = (r.latency[(w, 1)] for w in ("float", "int8", "u8"))
        f2, q2, u2 = (r.latency[(w, 2)] for w in ("float", "int8", "u8"))
        rows_t.append([r.name, f1, u1, u1 / f1, q1 / f1, f2, u2, u2 / f2, ", ".join(f"{k} {v}" for k, v in r.unfused.items()) or "none"])
    out.append(table(["model", "float ms (1T)", "INT8 ms (1T)", "INT8 ÷ float (1T)", "int8 storage ÷ float (1T)", "float ms (2T)", "INT8 ms (2T)", "INT8 ÷ float (2T)", "not fused (int8 storage)"], rows_t))
    return "\n".join(out)


def run_section(settings: Settings, workdir: Path, log=print) -> tuple[str, list[ZooRow]]:
    torch.set_num_threads(1)
    zoo = _zoo()
    names = ["residual"] if settings.quick else list(zoo)
    rows = []
    for name in names:
        log(f"[zoo] {name}")
        try:
            rows.append(measure(name, zoo[name], settings, workdir))
        except Exception as exc:
            rows.append(ZooRow(name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"))
    return render(rows), rows
