"""How fast the integer simulator runs a ResNet-18-sized model at 224x224, and how well it
agrees with onnxruntime there.

    PYTHONPATH=$PWD python bench/simulate_speed.py [--runs 3] [--threads 1] [--no-write]

Defines ResNet-18 itself (torchvision is not importable here), quantizes it with torchq
(default QuantConfig: target warboy, random calibration data: this measures speed, not
accuracy), then times `npu.Simulator` (compile once, run) against onnxruntime on the same
model, and compares the two tensor by tensor. Prints a table and rewrites the marked section
of docs/NPU.md with it and this command.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- simulate-speed:begin -->", "<!-- simulate-speed:end -->"


def _threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def resnet18():
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    torch.manual_seed(0)
    model = ResNet18()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as a trained model has
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
    return model.eval()


def quantize(model, size: int):
    import torch

    import torchq
    from onnx_backend import assert_valid

    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(1, 3, size, size, generator=g),) for _ in range(4)]
    torchq.prepare(model, torchq.QuantConfig())
    torchq.calibrate(model, data, quiet=True)
    q, _ = torchq.export_with_report(model, data[0], input_names=["x"], output_names=["y"])
    torchq.unprepare(model)
    assert_valid(q)
    return q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS / onnxruntime / torch threads (default 1)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=2, help="inputs for the agreement rows")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/NPU.md")
    args = ap.parse_args(argv)
    _threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import onnxruntime as ort
    import torch

    from npu import Simulator
    from npu.compare import Comparator
    from onnx_backend.model_io import write_text_atomic

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    q = quantize(resnet18(), args.size)
    t_quant = time.perf_counter() - t0
    x = np.random.default_rng(3).standard_normal((1, 3, args.size, args.size)).astype(np.float32)

    t0 = time.perf_counter()
    sim = Simulator(q)  # target warboy, single rounding
    t_compile = time.perf_counter() - t0
    sim_times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        sim.run({"x": x})
        sim_times.append(time.perf_counter() - t0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(q.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    session.run(None, {"x": x})  # warm-up
    ort_times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        ort_times.append(time.perf_counter() - t0)

    samples = [{"x": np.random.default_rng(seed).standard_normal((1, 3, args.size, args.size)).astype(np.float32)} for seed in range(4, 4 + args.samples)]
    agreement = {}
    for level in ("all", "disabled"):
        c = Comparator(q, ort_optimization=level)
        for feeds in samples:
            c.add(feeds)
        agreement[level] = c.report
    # onnxruntime against itself: all graph optimizations (fused integer kernels) vs none
    opts_off = ort.SessionOptions()
    opts_off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts_off.intra_op_num_threads = args.threads
    opts_off.log_severity_level = 3
    off = ort.InferenceSession(q.SerializeToString(), opts_off, providers=["CPUExecutionProvider"])
    out_scale = float(sim.qm.qparams(sim.qm.dq_of(sim.qm.graph.outputs[0])).scale)
    self_same = np.mean([np.mean(np.rint(session.run(None, f)[0] / out_scale) == np.rint(off.run(None, f)[0] / out_scale)) for f in samples])
    report = agreement["all"]
    (out,) = report.outputs
    (out_off,) = agreement["disabled"].outputs
    worst_local = min(report.tensors, key=lambda t: (t.local_share, -t.local_max_steps))
    kinds = sim.summary()["nodes"]

    cpu = platform.processor() or platform.machine()
    rows = [
        ("model", f"ResNet-18, 1x3x{args.size}x{args.size}, {len(q.graph.node)} nodes in the QDQ model"),
        ("simulator nodes", f"{kinds.get('int8', 0)} in integers, {kinds.get('host', 0)} on the host"),
        ("quantize (torchq, 4 calibration batches)", f"{t_quant:.1f} s"),
        ("Simulator(model): compile", f"{t_compile:.2f} s"),
        (f"simulate, median of {args.runs}", f"{np.median(sim_times):.2f} s"),
        (f"onnxruntime, median of {args.runs}", f"{1000 * np.median(ort_times):.0f} ms"),
        ("logits identical, simulator vs onnxruntime (all optimizations)", f"{100 * out.share:.1f} %, max {out.max_steps} step"),
        ("logits identical, simulator vs onnxruntime (no optimizations)", f"{100 * out_off.share:.1f} %, max {out_off.max_steps} step"),
        ("logits identical, onnxruntime all vs none", f"{100 * self_same:.1f} %"),
        ("every node's own arithmetic agrees (local)", "yes" if report.locally_agrees else "no"),
        ("least locally identical tensor", f"{worst_local.tensor} ({worst_local.op_type}): {worst_local.local_identical} of {worst_local.elements} identical, max {worst_local.local_max_steps} step"),
    ]
    width = max(len(r[0]) for r in rows)
    table = "\n".join(["| measurement | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    if not args.no_write:
        doc = ROOT / "docs" / "NPU.md"
        text = doc.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            cmd = "PYTHONPATH=$PWD python bench/simulate_speed.py" + (f" --runs {args.runs}" if args.runs != 3 else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
            section = f"{BEGIN}\nMeasured with `{cmd}` ({args.threads} thread, {cpu}, Python {platform.python_version()}, numpy {np.__version__}, onnxruntime {ort.__version__}):\n\n{table}\n{END}"
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
            write_text_atomic(doc, text)
            print(f"updated {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
