"""torchq validate: report every rule of the TFLite 8-bit spec a QDQ model breaks."""

from __future__ import annotations

import json

from onnx_backend import load_model, validate


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a QDQ ONNX model against the TFLite 8-bit spec", description=__doc__)
    p.add_argument("model", help="quantized (QDQ) ONNX model, ours or any tool's")
    p.add_argument("--json", action="store_true", help="print the violations as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    violations = validate(load_model(args.model))
    if args.json:
        print(json.dumps([v.__dict__ for v in violations], indent=1))
    elif not violations:
        print(f"{args.model}: all TFLite 8-bit spec rules hold")
    else:
        print(f"{args.model}: {len(violations)} broken rules")
        for v in violations:
            print(f"  {v}")
    return 0 if not violations else 3
