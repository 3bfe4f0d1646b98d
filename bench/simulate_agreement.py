"""Agreement of the integer simulator with onnxruntime on the whole test zoo.

    PYTHONPATH=$PWD python bench/simulate_agreement.py [--samples 3] [--no-write]

Every zoo model, both exporters (dynamo, TorchScript), both configurations (the default
QuantConfig, i.e. target warboy, simulated for warboy; and target=None, every op in int8,
simulated with every unit in integers), both requantization roundings. For each model output
the int8 values are compared (share identical, largest difference in steps), and every
quantized tensor of the model end to end and locally. Prints a table and rewrites the marked
section of docs/NPU.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- simulate-agreement:begin -->", "<!-- simulate-agreement:end -->"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3, help="input samples per model (default 3)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/NPU.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    import torch

    from npu.compare import Comparator, _pct
    from onnx_backend.model_io import write_text_atomic
    from tests.npu.zoo_models import quantized_zoo_model, zoo_feeds
    from tests.zoo import ZOO

    torch.set_num_threads(1)
    rows = []
    header = "| model | exporter | config | outputs identical, single rounding | max steps | quantized tensors agreeing, end to end / locally | outputs identical, double rounding | max steps |"
    for name in sorted(ZOO):
        for dynamo in (True, False):
            for target in (None, "warboy"):
                q = quantized_zoo_model(name, dynamo, target)
                cells = []
                for rounding in ("single", "double"):
                    c = Comparator(q, target, rounding=rounding)
                    for seed in range(123, 123 + args.samples):
                        c.add(zoo_feeds(name, seed))
                    r = c.report
                    share = min(t.share for t in r.outputs)
                    steps = ", ".join(f"{t.max_abs_diff:.1g} (float output)" if t.is_float else str(t.max_steps) for t in r.outputs)
                    cells.append((share, steps, r))
                (s1, m1, r1), (s2, m2, _) = cells
                quantized = [t for t in r1.tensors if not t.is_float]
                n = len(quantized)
                agree = f"{sum(t.agrees for t in quantized)}/{n} / {sum(t.local_agrees for t in quantized)}/{n}"
                row = f"| {name} | {'dynamo' if dynamo else 'torchscript'} | {'default (warboy)' if target else 'target=None'} | {_pct(s1)} | {m1} | {agree} | {_pct(s2)} | {m2} |"
                rows.append(row)
                print(row, flush=True)
    table = "\n".join([header, "|---|---|---|---|---|---|---|---|"] + rows)
    if not args.no_write:
        doc = ROOT / "docs" / "NPU.md"
        text = doc.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            cmd = "PYTHONPATH=$PWD python bench/simulate_agreement.py" + (f" --samples {args.samples}" if args.samples != 3 else "")
            section = f"{BEGIN}\nMeasured with `{cmd}` ({args.samples} input samples per model, onnxruntime with all graph optimizations):\n\n{table}\n{END}"
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
            write_text_atomic(doc, text)
            print(f"updated {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
