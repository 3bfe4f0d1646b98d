"""Where the ONNX calibrator's time goes, model by model: a breakdown of the calibration timed in
docs/BENCHMARKS.md.

    PYTHONPATH=$PWD python -m bench.calibration_profile [--no-write]

For each float model of the ONNX-path benchmark (bench/.cache/work/accuracy/*.float.onnx, made by
`python -m bench.run --only onnx`) and its calibration samples: the Calibrator's construction
(loading, the onnxruntime session), onnxruntime's runs with every observed tensor exposed (in
the worker thread), the binning of their outputs (in the calling thread, overlapping the next
run), the whole collect_data pass, and compute_range per histogram method; beside them, the same
samples run through the plain float model (one intra-op thread, nothing exposed): the floor of a
pass that has to compute every activation. Median of 3 runs.
Prints a table and writes docs/bench/calibration_profile.md with it and this command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from .common import CACHE, Settings, table

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("PERCENTILE_ASYM", "MSE_ASYM", "SQNR_ASYM", "ENTROPY_ASYM")
RUNS = 3


def _profile_once(model: onnx.ModelProto, feeds) -> dict[str, float]:
    from onnx_backend import CalibrationMethod, Calibrator

    t0 = time.perf_counter()
    cal = Calibrator(model, CalibrationMethod.MSE_ASYM, quiet=True)
    out = {"init": time.perf_counter() - t0, "onnxruntime runs": 0.0, "binning": 0.0}
    run, update = cal._session.run, cal._update

    def timed(key, fn):
        def call(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                out[key] += time.perf_counter() - t

        return call

    cal._session.run, cal._update = timed("onnxruntime runs", run), timed("binning", update)
    t0 = time.perf_counter()
    cal.collect_data(feeds)
    out["collect_data"] = time.perf_counter() - t0
    for name in METHODS:
        cal.calibration_method = CalibrationMethod[name]
        t0 = time.perf_counter()
        cal.compute_range()
        out[name] = time.perf_counter() - t0
    out["tensors"], out["observed"] = len(cal.tensors), len(cal._observed)
    out["plain inference"] = _plain_inference_s(model, feeds)
    return out


def _plain_inference_s(model: onnx.ModelProto, feeds) -> float:
    """Seconds to run `feeds` through the float model as it is (no tensor exposed), one thread."""
    from .common import session

    sess = session(model, threads=1)
    t0 = time.perf_counter()
    for feed in feeds:
        sess.run(None, dict(feed))
    return time.perf_counter() - t0


def measure() -> list[list]:
    from . import accuracy

    rows = []
    for subject in accuracy.subjects(Settings()):
        path = CACHE / "work" / "accuracy" / f"{subject.name}.float.onnx"
        if "unpadded" in subject.name or not path.is_file():
            continue
        model, feeds = onnx.load(str(path)), subject.calibration_feeds()
        runs = [_profile_once(model, feeds) for _ in range(RUNS)]
        median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        rows.append(
            [subject.name, f"{median['observed']:.0f} of {median['tensors']:.0f}", *(f"{median[k]:.3f}" for k in ("init", "plain inference", "onnxruntime runs", "binning", "collect_data")), *(f"{median[m]:.3f}" for m in METHODS)]
        )
    if not rows:
        raise SystemExit("no float models in bench/.cache/work/accuracy: run `python -m bench.run --only onnx` first")
    return rows


HEADER = ["model", "tensors observed (of all)", "Calibrator() s", "plain float inference s (floor)", "onnxruntime runs s", "binning s", "collect_data s", *(f"compute_range {m.lower()} s" for m in METHODS)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write docs/bench/calibration_profile.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    text_table = table(HEADER, measure())
    print(text_table)
    if not args.no_write:
        from onnx_backend.model_io import write_text_atomic

        text = (
            "# Where the ONNX calibrator's time goes\n\n"
            f"`PYTHONPATH=$PWD python -m bench.calibration_profile` (median of {RUNS} runs; the models and samples of\n"
            "docs/BENCHMARKS.md's ONNX-path section). onnxruntime runs in a worker thread (one intra-op thread) while\n"
            "the calling thread bins the previous run's outputs, so `collect_data` is about the larger of the two.\n"
            "'plain float inference' runs the same samples through the float model with nothing exposed (one thread):\n"
            "what any pass that computes every activation costs.\n"
            "Tensors a Reshape/Transpose/... makes from another share its statistics and are not observed.\n\n" + text_table + "\n"
        )
        write_text_atomic(ROOT / "docs" / "bench" / "calibration_profile.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
