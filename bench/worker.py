"""One quantization in a fresh process, so that its peak RSS can be measured.

    python -m bench.worker torchq SUBJECT quick|full           torchq's PyTorch path, mse_asym
    python -m bench.worker onnx   FLOAT.onnx CALIB.npz METHOD  torchq's ONNX path (Calibrator)
    python -m bench.worker ort    FLOAT.onnx CALIB.npz METHOD  onnxruntime quantize_static
    python -m bench.worker onnx-digits FLOAT.onnx N METHOD     N digits samples, one per batch
    python -m bench.worker ort-digits  FLOAT.onnx N METHOD     same, onnxruntime

Prints one JSON line: seconds, peak_rss_mib, rss_after_imports_mib.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def _feeds_from_npz(path: str) -> list[dict]:
    import numpy as np

    data = np.load(path)
    feeds: dict[int, dict] = {}
    for key in data.files:
        i, name = key.split(":", 1)
        feeds.setdefault(int(i), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


def _digits_feeds(n: int, input_name: str = "image") -> list[dict]:
    from bench import digits

    x = digits.load_data()["x_train"]
    reps = -(-n // len(x))
    import numpy as np

    x = np.concatenate([x] * reps)[:n]
    return [{input_name: x[i : i + 1]} for i in range(n)]


def main(argv: list[str]) -> dict:
    from bench.common import current_rss_mib, peak_rss_mib

    cmd = argv[0]
    if cmd == "torchq":
        import torch

        import torchq  # noqa: F401
        from bench import accuracy
        from bench.common import Settings
        from bench.subjects import quantize_ours

        torch.set_num_threads(1)
        settings = Settings.make(argv[2] == "quick")
        subject = next(s for s in accuracy.subjects(settings) if s.name == argv[1])
        model = subject.build()
        batches = subject.calibration()
        base = current_rss_mib()
        t0 = time.perf_counter()
        quantize_ours(subject, model, "mse", False, calibration=batches)
    elif cmd in ("onnx", "onnx-digits"):
        import onnx

        from onnx_backend import CalibrationMethod, Calibrator, quantize

        feeds = _feeds_from_npz(argv[2]) if cmd == "onnx" else _digits_feeds(int(argv[2]))
        model = onnx.load(argv[1])
        base = current_rss_mib()
        t0 = time.perf_counter()
        cal = Calibrator(model, CalibrationMethod.parse(argv[3]), quiet=True)
        cal.collect_data(feeds)
        quantize(model, cal.compute_range(), target="warboy")
    elif cmd in ("ort", "ort-digits"):
        from bench.peers import ort_quantize

        feeds = _feeds_from_npz(argv[2]) if cmd == "ort" else _digits_feeds(int(argv[2]))
        base = current_rss_mib()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ort_quantize(argv[1], feeds, argv[3], Path(tmp) / "q.onnx")
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": base}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
