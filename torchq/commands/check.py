"""torchq check: node by node, which ops of a quantized model run on the NPU and which fall back."""

from __future__ import annotations

import json

from npu import available_targets, check


def register(sub) -> None:
    p = sub.add_parser("check", help="which ops of a QDQ model run on the NPU, which fall back to the host, and why", description=__doc__)
    p.add_argument("model", help="quantized (QDQ) ONNX model")
    p.add_argument("--target", default="warboy", help=f"target: {', '.join(available_targets())}, or a description .yaml (default warboy)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all", action="store_true", help="also list shape/constant nodes")
    p.set_defaults(run=run)


def run(args) -> int:
    report = check(args.model, args.target)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.to_text(show_shape=args.all))
    return 0
