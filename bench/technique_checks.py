"""Three measurements behind docs/ACCURACY.md that the main table does not show.

    python -m bench.technique_checks

1. method auto against each of the ten fixed methods, output SQNR (dB) on the test zoo
   (random weights, 6 calibration batches, 2 held-out batches, target None).
2. What ReLU6 -> ReLU (equalization_clip: relu) does to the float function of the MobileNet-style
   digits model: output SQNR of the equalized float model against the original, and the share of
   calibration values that were above 6.
3. Where all-MiniLM-L6-v2 loses accuracy: one group of nodes quantized at a time.
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


def _minilm_groups(model) -> dict[str, set[str]]:
    """Node names of the optimized MiniLM graph by role; a Linear (MatMul with a constant weight,
    with its bias Add) by its weight's shape: square, widening (FFN1) or narrowing (FFN2)."""
    graph = model.graph
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    names = ("residual sums (Add -> LayerNorm)", "attention projections (q, k, v, out)", "FFN1 (widening Linear, GELU after)", "FFN2 (narrowing Linear after GELU)", "attention (score/context MatMuls, Softmax)", "everything else")
    groups: dict[str, set[str]] = {k: set() for k in names}
    linear_of: dict[str, str] = {}  # output tensor -> group of its Linear
    for n in graph.node:
        w = next((weights[i] for i in n.input if i in weights), None)
        if n.op_type == "MatMul" and w is not None and len(w) == 2:
            linear_of[n.output[0]] = names[1] if w[0] == w[1] else names[2] if w[1] > w[0] else names[3]
    for n in graph.node:
        if n.op_type == "Add" and any(r.op_type == "LayerNormalization" for r in readers.get(n.output[0], [])):
            key = names[0]
        elif n.output[0] in linear_of:
            key = linear_of[n.output[0]]
        elif n.op_type == "Add" and any(i in linear_of for i in n.input):
            key = next(linear_of[i] for i in n.input if i in linear_of)
        elif n.op_type in ("MatMul", "Softmax"):
            key = names[4]
        else:
            key = names[5]
        groups[key].add(n.name)
    return groups


def minilm_error_sources() -> str:
    """all-MiniLM-L6-v2, padded batches, attention masks left out: the cosine to the float
    embeddings when only one group of nodes is quantized (the rest float)."""
    from bench.techniques import minilm_subject
    from onnx_backend import optimize_model

    subject = minilm_subject()
    groups = _minilm_groups(optimize_model(subject.float_model))
    every = set().union(*groups.values())
    options = Options(target="warboy")  # the pipeline always leaves attention masks out
    lines = ["| group | nodes | cosine, only this group quantized | cosine, all but this group quantized |", "|---|---|---|---|"]

    def cosine(kept_float: set[str]) -> float:
        q, _ = run_pipeline(subject.float_model, subject.calibration, options, exclude_nodes=kept_float).quantize()
        return subject.evaluate(q)

    for name, nodes in groups.items():
        lines.append(f"| {name} | {len(nodes)} | {cosine(every - nodes):.4f} | {cosine(nodes):.4f} |")
    lines.append(f"| (everything) | {len(every)} | {cosine(set()):.4f} | 1 |")
    return "\n".join(lines)


def main() -> int:
    torch.set_num_threads(1)
    np.seterr(all="ignore")
    print("method auto vs the ten fixed methods (output SQNR, dB):\n")
    print(auto_vs_fixed(), flush=True)
    print("\nReLU6 -> ReLU in equalization, MobileNet-style digits model:\n")
    print(relu6_to_relu())
    print("\nWhere all-MiniLM-L6-v2 loses its cosine (padded batches, masks left out, target warboy):\n")
    print(minilm_error_sources())
    return 0


if __name__ == "__main__":
    sys.exit(main())
