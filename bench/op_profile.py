"""Where the time of an INT8 model goes in onnxruntime, kind of kernel by kind of kernel, beside the
float model's: why INT8 ÷ float latency meets 0.7 on some conv nets and misses it on others.

    PYTHONPATH=$PWD python -m bench.op_profile [--no-write] [--runs N] [--models NAME ...]

Each model is exported to float ONNX, calibrated and quantized by torchq's ONNX path (Calibrator,
mse_asym, target warboy) and stored with uint8 activations for onnxruntime's x86 kernels
(bench.common.for_onnxruntime), as in docs/BENCHMARKS.md's latency tables. onnxruntime's
profiler (one intra-op thread, all graph optimizations) times every kernel of the graph it runs
after its fusions; kernels are grouped by what they compute (GROUPS). The profiler adds a cost
per kernel, so its sums exceed the plain latency, which is measured apart (median of plain runs).
Weights are random (BatchNorm statistics from real inputs): kernel times depend on shapes, not
on values. Prints the tables and writes docs/bench/op_profile.md with them and this command.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .common import Settings, for_onnxruntime, latency_ms, quiet, session, table

ROOT = Path(__file__).resolve().parent.parent
RUNS = 50  # profiled runs per model


@dataclass(frozen=True)
class ProfiledModel:
    name: str
    build: Callable[[], tuple[torch.nn.Module, torch.Tensor]]  # (model, calibration images)


def _digits(name: str) -> Callable[[], tuple[torch.nn.Module, torch.Tensor]]:
    def build():
        from . import digits

        return digits.build_model(name).eval(), torch.from_numpy(digits.calibration_arrays(32))

    return build


def _seed(factory_name: str, size: int) -> Callable[[], tuple[torch.nn.Module, torch.Tensor]]:
    def build():
        from . import images
        from . import seed_models as sm

        calib = images.crops(8, size, seed=0)
        torch.manual_seed(0)
        return sm.randomized(getattr(sm, factory_name)(), calib).eval(), calib

    return build


MODELS = {
    m.name: m
    for m in (
        ProfiledModel("digits_mobilenet", _digits("mobilenet")),
        ProfiledModel("digits_efficientnet", _digits("efficientnet")),
        ProfiledModel("EfficientNet-B0", _seed("efficientnet_b0", 224)),
        ProfiledModel("ResNet50 v1.5", _seed("ResNet50", 224)),
    )
}

_CONVS = {"Conv", "QLinearConv"}
# (group, test on (op type, group attribute, kernel shape)), first match wins. Float SiLU is one
# fused kernel (onnxruntime's QuickGelu: x * sigmoid(x)); in INT8 it is a sigmoid and a multiply,
# like a squeeze-excitation gate, so sigmoids and multiplies are one group on both sides.
GROUPS: tuple[tuple[str, Callable[[str, int, tuple[int, ...]], bool]], ...] = (
    ("depthwise conv", lambda op, group, kernel: op in _CONVS and group > 1),
    ("1x1 conv", lambda op, group, kernel: op in _CONVS and all(k == 1 for k in kernel)),
    ("k x k conv", lambda op, group, kernel: op in _CONVS),
    ("SiLU, sigmoid, multiply", lambda op, group, kernel: op in {"QuickGelu", "Sigmoid", "QLinearSigmoid", "Mul", "QLinearMul"}),
    ("add", lambda op, group, kernel: op in {"Add", "QLinearAdd", "Sum"}),
    ("pooling", lambda op, group, kernel: "Pool" in op or op == "ReduceMean"),
    ("gemm / matmul", lambda op, group, kernel: op in {"Gemm", "QGemm", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulIntegerToFloat"}),
    ("layout (reorder, transpose)", lambda op, group, kernel: op in {"ReorderInput", "ReorderOutput", "Transpose"}),
    ("quantize / dequantize", lambda op, group, kernel: op in {"QuantizeLinear", "DequantizeLinear"}),
    ("other", lambda op, group, kernel: True),
)


def kernel_group(node: onnx.NodeProto) -> str:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    group, kernel = int(attrs.get("group", 1)), tuple(attrs.get("kernel_shape", ()))
    return next(name for name, test in GROUPS if test(node.op_type, group, kernel))


def profile(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Microseconds per run spent in each kernel group, from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory(prefix="torchq-op-profile-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        sess = session(model, 1, optimized_path=optimized, profile_prefix=Path(tmp) / "profile")
        groups = {n.name: kernel_group(n) for n in onnx.load(str(optimized)).graph.node}
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_group: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_group[groups.get(e["name"][: -len("_kernel_time")], "other")] += e["dur"] / runs
    return dict(per_group)


def _float_and_int8(entry: ProfiledModel) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """The float export and torchq's INT8 model (uint8 storage), and a batch-1 input."""
    from onnx_backend import CalibrationMethod, Calibrator, quantize

    model, calib = entry.build()
    with tempfile.TemporaryDirectory() as tmp, quiet():
        path = Path(tmp) / "float.onnx"
        torch.onnx.export(model, (calib[:1],), str(path), input_names=["image"], output_names=["out"], dynamic_axes={"image": {0: "batch"}}, dynamo=False)
        float_model = onnx.load(str(path))
    cal = Calibrator(float_model, CalibrationMethod.MSE_ASYM, quiet=True)
    cal.collect_data([[calib[i : i + 1].numpy()] for i in range(len(calib))])
    with quiet():
        int8 = for_onnxruntime(quantize(float_model, cal.compute_range(), target="warboy"))
    return float_model, int8, {"image": calib[:1].numpy()}


def measure(names=None, runs: int = RUNS) -> list[dict]:
    settings = Settings()
    results = []
    for name in names or MODELS:
        float_model, int8, feeds = _float_and_int8(MODELS[name])
        results.append(
            {
                "model": name,
                "float ms": latency_ms(float_model, feeds, 1, settings),
                "int8 ms": latency_ms(int8, feeds, 1, settings),
                "float": profile(float_model, feeds, runs),
                "int8": profile(int8, feeds, runs),
            }
        )
    return results


def render(results: list[dict]) -> str:
    out = [table(["model", "float ms", "INT8 ms (uint8 storage)", "INT8 ÷ float"], [[r["model"], r["float ms"], r["int8 ms"], r["int8 ms"] / r["float ms"]] for r in results])]
    for r in results:
        total = sum(r["int8"].values()) or 1.0
        rows = []
        for name, _ in GROUPS:
            f, q = r["float"].get(name, 0.0), r["int8"].get(name, 0.0)
            if f or q:
                rows.append([name, f, q, q / f if f else "—", f"{100 * q / total:.0f} %"])
        out.append(f"\n**{r['model']}** (profiled kernel time, µs per run)\n")
        out.append(table(["kernels", "float µs", "INT8 µs", "INT8 ÷ float", "share of INT8 time"], rows))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write docs/bench/op_profile.md")
    ap.add_argument("--runs", type=int, default=RUNS, help=f"profiled runs per model (default {RUNS})")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), help="only these models")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    text = render(measure(args.models, args.runs))
    print(text)
    if not args.no_write:
        from onnx_backend.model_io import write_text_atomic

        command = "PYTHONPATH=$PWD python -m bench.op_profile" + (f" --runs {args.runs}" if args.runs != RUNS else "") + (" --models " + " ".join(args.models) if args.models else "")
        header = (
            "# Where INT8 time goes in onnxruntime, by kind of kernel\n\n"
            f"`{command}` ({time.perf_counter() - started:.0f} s on this machine; one intra-op thread, batch 1).\n"
            "torchq's ONNX path (mse_asym, target warboy, activations stored as uint8 for onnxruntime's x86 kernels)\n"
            "against the float model, kernel by kernel from onnxruntime's profiler, grouped by what the kernels\n"
            "compute. The profiler adds a cost per kernel, so its sums exceed the plain latencies of the first table.\n"
            "Weights are random (kernel times depend on shapes, not values). See bench/op_profile.py.\n\n"
        )
        write_text_atomic(ROOT / "docs" / "bench" / "op_profile.md", header + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
