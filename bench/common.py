"""Shared measurement helpers: onnxruntime sessions, latency, SQNR, peak RSS, markdown tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_backend.qmath import sqnr_db  # noqa: F401 -- the one SQNR, used by the benchmarks through here

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TORCHQ_BENCH_CACHE", ROOT / "bench" / ".cache"))
DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Settings:
    """How much work each section does: the full run or the quick one used by the tests."""

    quick: bool = False
    latency_runs: int = 200  # timed runs per latency measurement (median reported)
    latency_budget_s: float = 2.0  # ... or fewer, when this much time is spent
    calibration_runs: int = 3  # timed calibrations per tool and model (median reported)
    cache: Path = CACHE

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick=True, latency_runs=5, latency_budget_s=0.2, calibration_runs=1, cache=CACHE / "quick")
        return cls()


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """torchq's INT8 model as deployed on onnxruntime x86: activations stored as uint8 (the same
    grid; `QuantConfig(activation_dtype="uint8")` writes the identical model)."""
    from onnx_backend import ModelEditor, TensorType

    out = onnx.ModelProto()
    out.CopyFrom(model)
    ModelEditor(out).convert_activation_dtype(TensorType.UINT8)
    return out


def model_bytes(model: onnx.ModelProto | bytes | str | Path) -> bytes | str:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, Path):
        return str(model)
    return model


def session(model, threads: int = 1, optimized_path: str | Path | None = None, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, profile_prefix: str | Path | None = None) -> ort.InferenceSession:
    """A CPU session; `optimized_path` writes the graph onnxruntime actually runs (after fusion);
    `profile_prefix` turns on onnxruntime's profiler (its file: `end_profiling()`)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(model_bytes(model), opts, providers=["CPUExecutionProvider"])


def run(model, feeds: Mapping[str, np.ndarray], threads: int = 1) -> list[np.ndarray]:
    return session(model, threads).run(None, dict(feeds))


def run_batched(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Run a session over feeds whose first axis is the sample axis, `batch` samples at a time."""
    n = len(next(iter(feeds.values())))
    outs: list[list[np.ndarray]] = []
    for i in range(0, n, batch):
        outs.append(sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()}))
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def latency_ms(model, feeds: Mapping[str, np.ndarray], threads: int, settings: Settings) -> float:
    """Median wall time of one run (ms) after warm-up, in onnxruntime with all optimizations."""
    sess = session(model, threads)
    feeds = dict(feeds)
    for _ in range(max(3, settings.latency_runs // 20)):
        sess.run(None, feeds)
    times = []
    start = time.perf_counter()
    while len(times) < settings.latency_runs and (time.perf_counter() - start < settings.latency_budget_s or len(times) < 5):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3




def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def fused_op_counts(model, path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs after its optimizations (what fused, what did not)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    session(model, 1, optimized_path=path)
    return op_counts(path)


# ---- peak memory of a subprocess ---------------------------------------------------------------


def run_measured(module: str, args: Sequence[str], timeout: float = 1800) -> dict:
    """Run `python -m module args` and return the JSON it prints last, plus its peak RSS (MiB).

    The child reports its own RSS right after its imports ("rss_after_imports_mib"), so the
    increment of the work itself can be told apart from the libraries' size.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-400:] or f"exit code {proc.returncode}"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": "no result printed"}


def _proc_status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mib() -> float:
    # VmHWM, not getrusage's ru_maxrss: a forked child's ru_maxrss starts at its parent's peak.
    return _proc_status("VmHWM")


def current_rss_mib() -> float:
    return _proc_status("VmRSS")


# ---- quiet third-party output ------------------------------------------------------------------


def quiet():
    """Silence library warnings and prints (exporters and quantizers are chatty)."""
    from torchq.export import EXPORTER_LOGGERS, quiet_logs

    return quiet_logs((*EXPORTER_LOGGERS, "torch", "onnxruntime", "torchao", "root"))


def timed(fn: Callable, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# ---- markdown ----------------------------------------------------------------------------------


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if not np.isfinite(x):
        return "∞" if x > 0 else "n/a"
    return f"{x:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are formatted with `fmt`."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [fmt(c) if not isinstance(c, str) else c for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, table has {len(headers)} columns: {row!r}")
        out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out)


def load_or_train(model, path: Path, train: Callable[[], None]):
    """`model` with the weights cached at `path`, or trained by `train()` (one thread:
    deterministic and polite on a shared 2-core machine) and then cached atomically."""
    import torch

    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train()
    finally:
        torch.set_num_threads(threads)
    from onnx_backend.model_io import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # a staging name of its own: two trainers at once never share one
        torch.save(model.state_dict(), tmp)
    return model.eval()
