"""Where the HF all-MiniLM-L6-v2 (padded to 64 tokens, target warboy) loses its cosine to float,
tensor by tensor: the default INT8 model with the Q/DQ of only one kind of tensor kept (the rest
float), and with all but that kind kept; then the LayerNorm choice (on the host, as warboy runs
it, or decomposed onto the NPU, whose residual-sum input would then be int8), and the FFN2
outputs' ranges clipped (what a range method alone could do).

    python -m bench.minilm_hf_where    # writes docs/bench/minilm_hf_where.md

Tensors by role, found from the graph: a FFN2 is the MatMul reading a Gelu's output.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import minilm_hf as mh

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["input_ids", "attention_mask"]
OUTPUT = ["embedding"]
AXES = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}}
CLIPS = (5.0, 20.0, 60.0)  # the FFN2 outputs' largest magnitudes are 32 to 195 (the [CLS] token's one huge channel)


def _float_and_ranges(model, config):
    import torchq

    prepared = torchq.prepare(model, config)
    try:
        torchq.calibrate(prepared, mh.calibration_loader(), quiet=True)
        return torchq.export_float(prepared, mh.example_inputs(), input_names=NAMES, output_names=OUTPUT, dynamic_axes=AXES)
    finally:
        torchq.unprepare(prepared)


def quantized_tensors(qmodel: onnx.ModelProto) -> set[str]:
    """Names of the tensors a Q/DQ pair rounds: activations (QuantizeLinear inputs) and constants
    (the name before `_quantized`)."""
    out = {n.input[0] for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    out |= {n.input[0][: -len("_quantized")] for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")}
    return out


def keep_only(qmodel: onnx.ModelProto, float_constants: dict[str, onnx.TensorProto], keep: set[str]) -> onnx.ModelProto:
    """`qmodel` with the rounding of every tensor outside `keep` removed: an activation's Q/DQ pair
    bypassed, a constant's DequantizeLinear replaced by its float value."""
    m = onnx.ModelProto()
    m.CopyFrom(qmodel)
    activations = {n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    rename, drop, inits = {}, [], []
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in keep:
            drop.append(n)
        elif n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized"):
            base = n.input[0][: -len("_quantized")]
            if base in keep:
                continue
            drop.append(n)
            if n.input[0] in activations:
                rename[n.output[0]] = base
            else:
                t = onnx.TensorProto()
                t.CopyFrom(float_constants[base])
                t.name = n.output[0]
                inits.append(t)
    for n in drop:
        m.graph.node.remove(n)
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            n.input[i] = rename.get(x, x)
    m.graph.initializer.extend(inits)
    return m


def roles(qmodel: onnx.ModelProto) -> dict[str, set[str]]:
    """Tensor names by role in a BERT encoder's quantized graph."""
    readers: dict[str, list] = {}
    for n in qmodel.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out = {k: set() for k in ("FFN2 input (GELU output)", "FFN2 weights", "FFN2 bias", "FFN2 output (into the residual sum)", "FFN1 output (GELU input)", "LayerNorm outputs")}
    for n in qmodel.graph.node:
        if n.op_type == "Gelu":
            mm = next(r for r in readers[n.output[0] + "_dequantized"] if r.op_type == "MatMul")
            add = readers[mm.output[0]][0]
            out["FFN2 input (GELU output)"].add(n.output[0])
            out["FFN1 output (GELU input)"].add(n.input[0].removesuffix("_dequantized"))
            out["FFN2 weights"].add(mm.input[1].removesuffix("_dequantized"))
            out["FFN2 bias"].add(next(i for i in add.input if i != mm.output[0]).removesuffix("_dequantized"))
            out["FFN2 output (into the residual sum)"].add(add.output[0])
        elif n.op_type == "LayerNormalization":
            out["LayerNorm outputs"].add(n.output[0])
    return out


def with_residual_sums_quantized(qmodel: onnx.ModelProto, feeds: list[dict]) -> onnx.ModelProto:
    """LayerNorm decomposed onto the NPU, at best: every LayerNorm input (the residual sum, which
    warboy otherwise computes on the host) quantized per tensor with its MSE range on `feeds`;
    LayerNorm's own steps stay exact, so the real decomposition can only lose more."""
    from onnx_backend import qmath
    from onnx_backend.range_selection import select_range
    from onnx_backend.statistics import TensorStatistics
    from onnx_backend.techniques.graph import tensors_on

    m = onnx.ModelProto()
    m.CopyFrom(qmodel)
    lns = [n for n in m.graph.node if n.op_type == "LayerNormalization"]
    stats = {n.input[0]: TensorStatistics() for n in lns}
    for values in tensors_on(qmodel, feeds, list(stats)):
        for name, v in values.items():
            stats[name].update(v)
    for ln in lns:
        t = ln.input[0]
        p = qmath.activation_params(*select_range(stats[t], "mse", False))
        scale, zero = np.asarray(p.scale, np.float32).reshape(()), np.asarray(p.zero_point, np.int8).reshape(())
        m.graph.initializer.extend([numpy_helper.from_array(scale, f"{t}_sum_scale"), numpy_helper.from_array(zero, f"{t}_sum_zero_point")])
        at = list(m.graph.node).index(ln)
        m.graph.node.insert(at, helper.make_node("DequantizeLinear", [f"{t}_sum_q", f"{t}_sum_scale", f"{t}_sum_zero_point"], [f"{t}_sum_dq"]))
        m.graph.node.insert(at, helper.make_node("QuantizeLinear", [t, f"{t}_sum_scale", f"{t}_sum_zero_point"], [f"{t}_sum_q"]))
        ln.input[0] = f"{t}_sum_dq"
    return m


def main(argv=None) -> int:
    import torchq
    from onnx_backend import optimize_model, quantize
    from onnx_backend.calibrator import Ranges
    from onnx_backend.model_io import write_text_atomic
    from onnx_backend.techniques import Options, run_pipeline

    from .common import table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print only; do not write docs/bench/minilm_hf_where.md")
    args = ap.parse_args(argv)
    model = mh.load_model()
    sentences = mh.minilm.all_evaluation_sentences()
    reference = mh.embed(model, sentences)

    def cosine(q) -> str:
        mean, low = mh.minilm.cosine(mh.embed(q, sentences), reference)
        return f"{mean:.4f} / {low:.4f}"

    float_model, ranges = _float_and_ranges(model, torchq.QuantConfig())
    qmodel = quantize(float_model, ranges, target="warboy")
    constants = {i.name: i for i in optimize_model(float_model).graph.initializer}
    every = quantized_tensors(qmodel)
    rows = []
    for role, tensors in roles(qmodel).items():
        kept = tensors & every
        rows.append([role, str(len(kept)), cosine(keep_only(qmodel, constants, kept)), cosine(keep_only(qmodel, constants, every - kept))])
    groups = roles(qmodel)
    both = (groups["FFN2 output (into the residual sum)"] | groups["LayerNorm outputs"]) & every
    rows.append(["FFN2 outputs and LayerNorm outputs", str(len(both)), cosine(keep_only(qmodel, constants, both)), cosine(keep_only(qmodel, constants, every - both))])
    rows.append(["(everything)", str(len(every)), cosine(qmodel), "1"])
    where = table(["tensors", "count", "cosine mean / min, only these quantized", "cosine mean / min, all but these quantized"], rows)
    feeds = [{"input_ids": i.numpy(), "attention_mask": a.numpy()} for i, a in mh.calibration_loader()]
    smooth, _ = run_pipeline(float_model, feeds, Options(target="warboy", smoothquant="auto")).quantize()
    layer_norm = table(
        ["INT8 model", "LayerNorm on the host (warboy)", "LayerNorm decomposed (residual sums int8, upper bound)"],
        [[name, cosine(q), cosine(with_residual_sums_quantized(q, feeds))] for name, q in (("default (mse)", qmodel), ('smoothquant="auto"', smooth))],
    )
    clipped = []
    for clip in CLIPS:
        r = Ranges({t: (max(lo, -clip), min(hi, clip)) if t in groups["FFN2 output (into the residual sum)"] else (lo, hi) for t, (lo, hi) in ranges.items()}, mask_values=ranges.mask_values)
        clipped.append([f"+-{clip:g}", cosine(quantize(float_model, r, target="warboy"))])
    clipping = table(["FFN2 output range clipped to", "cosine mean / min"], clipped)
    text = where + "\n\n" + layer_norm + "\n\n" + clipping
    print(text)
    if not args.no_write:
        write_text_atomic(
            ROOT / "docs" / "bench" / "minilm_hf_where.md",
            "# Where all-MiniLM-L6-v2 (transformers, padded) loses its cosine\n\n"
            f"`PYTHONPATH=$PWD python -m bench.minilm_hf_where` ({platform.machine()}). The default INT8 model (mse, target warboy;\n"
            f"calibration on the {len(mh.CALIBRATION)} calibration sentences) with only one kind of tensor rounded, or all but it; cosine of\n"
            f"the embeddings to float on the {len(sentences)} evaluation sentences, padded to {mh.SEQ_LEN} tokens. Then LayerNorm: on the host,\n"
            "or decomposed onto the NPU, bounded from above by quantizing only its input, the residual sum (per tensor, MSE range).\n"
            "Last, what a range choice alone can do: the default model with the FFN2 outputs' ranges clipped.\n\n" + text + "\n",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
