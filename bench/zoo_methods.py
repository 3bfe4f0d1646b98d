"""Output SQNR of every calibration method on the test zoo (the table in docs/METHODS.md).

    python -m bench.zoo_methods
"""

from __future__ import annotations

import sys

import torch

import torchq
from onnx_backend.qmath import sqnr_db
from tests.conftest import run_onnx
from tests.zoo import ZOO

METHODS = ["min_max", "percentile", "mse", "entropy", "sqnr"]


def method_sqnr(entry, method: str, symmetric: bool) -> float:
    model = entry.model()
    calibration = entry.calibration()
    torchq.prepare(model, torchq.QuantConfig(method=method, symmetric=symmetric, target=None))
    try:
        torchq.calibrate(model, calibration)
        qmodel = torchq.export(model, calibration[0], dynamo=False, input_names=entry.input_names, output_names=entry.output_names)
    finally:
        torchq.unprepare(model)
    test = entry.inputs(torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = model(*test)
    ref = ref if isinstance(ref, tuple) else (ref,)
    outs = run_onnx(qmodel, {n: t.numpy() for n, t in zip(entry.input_names, test)})
    return min(sqnr_db(r.numpy(), o) for r, o in zip(ref, outs))


def main() -> int:
    torch.set_num_threads(1)
    print("| model | " + " | ".join(f"{m} a/s" for m in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for name, entry in ZOO.items():
        cells = [f"{method_sqnr(entry, m, False):.1f} / {method_sqnr(entry, m, True):.1f}" for m in METHODS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
