"""Two measurements behind docs/ACCURACY.md that the main table does not show.

    python -m bench.technique_checks

1. method auto against each of the ten fixed methods, output SQNR (dB) on the test zoo
   (random weights, 6 calibration batches, 2 held-out batches, target None).
2. What ReLU6 -> ReLU (equalization_clip: relu) does to the float function of the MobileNet-style
   digits model: output SQNR of the equalized float model against the original, and the share of
   calibration values that were above 6.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from onnx_backend.qmath import sqnr_db
from onnx_backend.techniques import Options, run_pipeline
from onnx_backend.techniques.graph import outputs_on

ZOO_MODELS = ["inception", "squeeze_excitation", "residual", "transformer_block", "unet"]


def auto_vs_fixed() -> str:
    from tests.technique_nets import export
    from tests.zoo import ZOO

    methods = [(m, s) for m in ("min_max", "percentile", "mse", "entropy", "sqnr") for s in (False, True)]
    head = ["model"] + [f"{m}{'_sym' if s else ''}" for m, s in methods] + ["auto", "auto - best", "auto - worst"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ZOO_MODELS:
        e = ZOO[name]
        data = [[t.numpy() for t in s] for s in e.calibration(6)]
        proto = export(e.model(), tuple(torch.from_numpy(a) for a in data[0]), names=e.input_names, outputs=e.output_names)
        test = [dict(zip(e.input_names, (t.numpy() for t in s))) for s in e.calibration(2, seed=9)]
        ref = outputs_on(proto, test)

        def score(method, symmetric):
            q, _ = run_pipeline(proto, data, Options(method=method, symmetric=symmetric, target=None)).quantize()
            return min(sqnr_db(r[0], o[0]) for r, o in zip(ref, outputs_on(q, test)))

        fixed = [score(m, s) for m, s in methods]
        auto = score("auto", False)
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in fixed) + f" | {auto:.1f} | {auto - max(fixed):+.1f} | {auto - min(fixed):+.1f} |")
    return "\n".join(lines)


def relu6_to_relu() -> str:
    from bench import technique_models as tm
    from bench.techniques import export_float

    name = "mobilenet"
    inputs, _ = tm.test_inputs(name)
    proto = export_float(tm.load(name), inputs, tm.input_names(name))
    feeds = [{"image": inputs[0]}]
    ref = outputs_on(proto, feeds)[0][0]
    lines = ["| equalization_clip | float output SQNR vs original | largest share of values above 6 |", "|---|---|---|"]
    for clip in ("keep", "relu"):
        p = run_pipeline(proto, tm.calibration_samples(name), Options(equalization=True, equalization_clip=clip))
        shares = p.report.steps["equalization"]["clips_replaced_by_relu"].values()
        lines.append(f"| {clip} | {sqnr_db(ref, outputs_on(p.float_model(), feeds)[0][0]):.1f} dB | {max(shares, default=0.0) * 100:.3f} % |")
    return "\n".join(lines)


def main() -> int:
    torch.set_num_threads(1)
    np.seterr(all="ignore")
    print("method auto vs the ten fixed methods (output SQNR, dB):\n")
    print(auto_vs_fixed(), flush=True)
    print("\nReLU6 -> ReLU in equalization, MobileNet-style digits model:\n")
    print(relu6_to_relu())
    return 0


if __name__ == "__main__":
    sys.exit(main())
