"""Scale: a ConvNeXt-B-sized model (110 M parameters, random weights) through both paths, with
peak memory per step, and calibration memory for 64 vs 1024 samples.

    python -m bench.scale              # everything; writes docs/RELIABILITY.md's scale section data
    python -m bench.scale --quick      # 16-sample calibration runs only (a smoke test)

Every step runs in its own process; the parent reads the child's peak RSS from the kernel
(wait4 rusage: ru_maxrss), and the child samples its own RSS every 20 ms with the phase it is in
(the phases are named after the functions they wrap), so a step over budget says where.
Budget: peak RSS <= 3 x the float model's size + a fixed margin (MARGIN_MIB: the interpreter,
torch, onnx and onnxruntime with nothing loaded measure about 0.5 GiB here).
Results: docs/reliability/scale.json, and the table printed at the end (pasted into
docs/RELIABILITY.md with the command that produced it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARGIN_MIB = 1024
RESOLUTION = 64
BATCH = 16
CLASSES = 21841  # the ImageNet-22k head: ConvNeXt-B-22k has 110 M parameters

# ---- the model ---------------------------------------------------------------------------------


def convnext_b(classes: int = CLASSES):
    """ConvNeXt-B (Liu et al. 2022): depths 3-3-27-3, widths 128-256-512-1024, 7x7 depthwise
    convs, LayerNorm, 4x inverted MLP with GELU, layer scale; random weights."""
    import torch
    from torch import nn

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim)
            self.pwconv1 = nn.Linear(dim, 4 * dim)
            self.pwconv2 = nn.Linear(4 * dim, dim)
            self.gamma = nn.Parameter(torch.full((dim,), 1e-6 * 1e5))  # layer scale (larger than 1e-6 so blocks matter)

        def forward(self, x):
            y = self.dwconv(x).permute(0, 2, 3, 1)
            y = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(y))))
            return x + (self.gamma * y).permute(0, 3, 1, 2)

    dims, depths = (128, 256, 512, 1024), (3, 3, 27, 3)
    layers = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0])]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        if i:
            layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
        layers += [Block(dim) for _ in range(depth)]

    class ConvNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.norm = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], classes)

        def forward(self, x):
            return self.head(self.norm(self.features(x).mean((2, 3))))

    torch.manual_seed(0)
    return ConvNeXt().eval()


def batches(n_samples: int, seed: int = 0, batch: int = BATCH):
    """Calibration batches generated on the fly: the data itself never accumulates."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for start in range(0, n_samples, batch):
        yield torch.randn(min(batch, n_samples - start), 3, RESOLUTION, RESOLUTION, generator=g)


# ---- memory sampling in the child --------------------------------------------------------------


class Sampler:
    """RSS every 20 ms, attributed to the phase the main thread is in."""

    def __init__(self):
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.02):
            self.note()

    def note(self):
        r = self.rss()
        if r > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = r

    @contextlib.contextmanager
    def during(self, phase: str):
        outer = self.phase
        self.note()
        self.phase = phase
        if phase not in self.order:
            self.order.append(phase)
        try:
            yield
        finally:
            self.note()
            self.phase = outer

    def wrap(self, owner, name: str, label: str | None = None):
        """Attribute the memory of every call of owner.name to a phase of that name."""
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapped(*a, **k):
            with self.during(label or name):
                return fn(*a, **k)

        setattr(owner, name, wrapped)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def instrument(s: Sampler) -> None:
    """Phases for the backend's steps (the names of the functions they wrap)."""
    import onnx
    import onnx_ir as ir

    import importlib

    from onnx_backend import calibrator, markers, quantizer

    export = importlib.import_module("torchq.export")  # the module (torchq.export is also a function)

    s.wrap(export, "export_float_with_markers", "torch.onnx.export")
    s.wrap(export, "quantize_with_report")
    s.wrap(export, "save_model", "save_model")
    s.wrap(markers, "strip_markers")
    for name in ("load_model", "upgrade_opset", "optimize_ir", "plan_quantization", "apply_plan", "apply_pending"):
        if hasattr(quantizer, name):
            s.wrap(quantizer, name)
    s.wrap(onnx.shape_inference, "infer_shapes")
    s.wrap(onnx.checker, "check_model")
    s.wrap(ir.serde, "deserialize_model")
    s.wrap(ir.serde, "serialize_model")
    commands = importlib.import_module("torchq.commands.quantize_onnx")
    for name in ("validate", "save_model", "calibrate_file", "quantize_with_report"):
        s.wrap(commands, name)
    s.wrap(calibrator.Calibrator, "collect_data")
    s.wrap(calibrator.Calibrator, "compute_range")
    s.wrap(calibrator.Calibrator, "_make_session", "onnxruntime session")
    s.wrap(calibrator, "activation_tensors")
    cal_cmd = importlib.import_module("torchq.commands.calibrate")
    s.wrap(cal_cmd, "prepare_graph")


# ---- the steps (each in its own process) -------------------------------------------------------


def step_imports(work: Path, s: Sampler) -> dict:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    import torchq  # noqa: F401

    return {}


def step_model(work: Path, s: Sampler) -> dict:
    with s.during("build model"):
        model = convnext_b()
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "float_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def step_export_float(work: Path, s: Sampler) -> dict:
    """The float ONNX and its calibration data for the ONNX path (setup, not budgeted)."""
    import numpy as np
    import torch

    model = convnext_b()
    x = next(batches(1))
    with s.during("torch.onnx.export"), torch.no_grad():
        torch.onnx.export(model, (x,), str(work / "float.onnx"), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    np.savez(work / "cal8.npz", x=torch.cat(list(batches(8))).numpy())
    return {"float_onnx_bytes": (work / "float.onnx").stat().st_size}


def step_torch_quantize(work: Path, s: Sampler, exporter: str) -> dict:
    import torch

    import torchq

    instrument(s)
    with s.during("build model"):
        model = convnext_b()
    t = time.perf_counter()
    with s.during("prepare"):
        torchq.prepare(model, torchq.QuantConfig(method="mse", target=None))
    with s.during("calibrate"), torch.no_grad():
        torchq.calibrate(model, list(batches(8)))
    with s.during("export"):
        q = torchq.export(model, next(batches(1)), work / f"torch_{exporter}.int8.onnx", dynamo=exporter == "dynamo")
    torchq.unprepare(model)
    return {"seconds": round(time.perf_counter() - t, 1), "int8_bytes": (work / f"torch_{exporter}.int8.onnx").stat().st_size, "nodes": len(q.graph.node)}


def step_onnx_quantize(work: Path, s: Sampler) -> dict:
    from torchq.cli import main

    instrument(s)
    t = time.perf_counter()
    out = work / "onnx_path.int8.onnx"
    code = main(["--quiet", "quantize-onnx", str(work / "float.onnx"), "--data", str(work / "cal8.npz"), "--method", "mse_asym", "--target", "all", "-o", str(out)])  # --batch-size 1, the default
    assert code == 0, code
    return {"seconds": round(time.perf_counter() - t, 1), "int8_bytes": out.stat().st_size}


def step_torch_calibrate(work: Path, s: Sampler, n: int) -> dict:
    import torch

    import torchq

    model = convnext_b()
    torchq.prepare(model, torchq.QuantConfig(method="mse", target=None))
    t = time.perf_counter()
    with s.during("calibrate"), torch.no_grad():
        count = torchq.calibrate(model, batches(n))
    session, _ = torchq.prepare.__globals__["session_of"](model)
    obs_bytes = sum(o.counts.numel() * 8 for o in session.observers.values() if o.counts is not None)
    return {"batches": count, "samples": n, "seconds": round(time.perf_counter() - t, 1), "observers": len(session.observers), "histogram_bytes": obs_bytes}


def step_onnx_calibrate(work: Path, s: Sampler, n: int, batch: int = BATCH) -> dict:
    from onnx_backend import Calibrator, CalibrationMethod

    calibrator = Calibrator(str(work / "float.onnx"), CalibrationMethod.MSE_ASYM, quiet=True)
    t = time.perf_counter()
    with s.during("collect_data"):
        calibrator.collect_data([b.numpy()] for b in batches(n, batch=batch))
    with s.during("compute_range"):
        ranges = calibrator.compute_range()
    hist = sum(st.counts.nbytes for st in calibrator.statistics.values())
    return {"samples": n, "seconds": round(time.perf_counter() - t, 1), "tensors": len(ranges), "histogram_bytes": hist}


STEPS = {
    "imports": step_imports,
    "model": step_model,
    "export_float": step_export_float,
    "torch_quantize_torchscript": lambda w, s: step_torch_quantize(w, s, "torchscript"),
    "torch_quantize_dynamo": lambda w, s: step_torch_quantize(w, s, "dynamo"),
    "onnx_quantize": step_onnx_quantize,
    "torch_calibrate_64": lambda w, s: step_torch_calibrate(w, s, 64),
    "torch_calibrate_1024": lambda w, s: step_torch_calibrate(w, s, 1024),
    "onnx_calibrate_64": lambda w, s: step_onnx_calibrate(w, s, 64),
    "onnx_calibrate_1024": lambda w, s: step_onnx_calibrate(w, s, 1024),
    "onnx_calibrate_64_batch_1": lambda w, s: step_onnx_calibrate(w, s, 64, batch=1),
    "onnx_calibrate_64_batch_4": lambda w, s: step_onnx_calibrate(w, s, 64, batch=4),
    "torch_calibrate_16": lambda w, s: step_torch_calibrate(w, s, 16),
    "onnx_calibrate_16": lambda w, s: step_onnx_calibrate(w, s, 16),
}


def child(step: str, work: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "2")))
    with Sampler() as s:
        info = STEPS[step](work, s)
        s.note()
    info["phases_mib"] = {p: round(s.peaks[p] / 2**20) for p in s.order if p in s.peaks}
    print(json.dumps(info))


# ---- the parent --------------------------------------------------------------------------------


def run_step(step: str, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("SCALE_THREADS", "2"))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "--child", step, "--work", str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} failed:\n{err[-4000:]}")
    info = json.loads(out.strip().splitlines()[-1])
    info["peak_rss_mib"] = round(usage.ru_maxrss / 1024)  # Linux: KiB
    info["wall_seconds"] = round(time.perf_counter() - start, 1)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", default=str(ROOT / "out" / "scale"))
    p.add_argument("--quick", action="store_true", help="small calibration runs only")
    p.add_argument("--steps", nargs="*", help=f"a subset of: {', '.join(STEPS)}")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, work)
        return 0
    steps = args.steps or (
        ["imports", "model", "export_float", "torch_calibrate_16", "onnx_calibrate_16"]
        if args.quick
        else ["imports", "model", "export_float", "torch_quantize_torchscript", "torch_quantize_dynamo", "onnx_quantize", "torch_calibrate_64", "torch_calibrate_1024",
              "onnx_calibrate_64", "onnx_calibrate_1024", "onnx_calibrate_64_batch_1", "onnx_calibrate_64_batch_4"]
    )
    results = {}
    for step in steps:
        print(f"... {step}", file=sys.stderr, flush=True)
        results[step] = run_step(step, work)
        print(f"    {json.dumps(results[step])}", file=sys.stderr, flush=True)
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    float_mib = results.get("model", {}).get("float_bytes", 0) / 2**20
    budget = 3 * float_mib + MARGIN_MIB
    meta = {
        "command": "python -m bench.scale" + (" --quick" if args.quick else "") + (f" --steps {' '.join(args.steps)}" if args.steps else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
        "threads": int(os.environ.get("SCALE_THREADS", "2")),
        "float_mib": round(float_mib),
        "budget_mib": round(budget),
        "margin_mib": MARGIN_MIB,
    }
    out = ROOT / "docs" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\n{meta['command']}  ({meta['machine']}, {meta['threads']} threads)")
    if "model" in results:
        print(f"model: ConvNeXt-B, {results['model']['parameters'] / 1e6:.1f} M parameters, float32 {float_mib:.0f} MiB, input {RESOLUTION}x{RESOLUTION}; budget 3 x {float_mib:.0f} + {MARGIN_MIB} = {budget:.0f} MiB")
    print(f"| step | peak RSS (MiB) | within budget | wall (s) | largest phases (MiB) |")
    print("|---|---:|---|---:|---|")
    for step, r in results.items():
        phases = sorted(r.get("phases_mib", {}).items(), key=lambda kv: -kv[1])[:3]
        within = "" if step in ("imports", "model", "export_float") or not float_mib else ("yes" if r["peak_rss_mib"] <= budget else "**no**")
        print(f"| {step} | {r['peak_rss_mib']} | {within} | {r['wall_seconds']} | {', '.join(f'{k} {v}' for k, v in phases)} |")


if __name__ == "__main__":
    sys.exit(main())
