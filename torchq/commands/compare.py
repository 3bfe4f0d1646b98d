"""torchq compare: the integer simulator against onnxruntime, tensor by tensor; names the first
node where they diverge, end to end and locally (each node fed onnxruntime's own inputs).
Exit 0 when every node's own arithmetic agrees (>= 99.9 % of its int8 values identical, none
more than one step apart), 3 when some node's does not."""

from __future__ import annotations

import json

from npu.compare import OPTIMIZATION_LEVELS, Comparator

from ._npu_data import add_args, samples, target_of


def register(sub) -> None:
    p = sub.add_parser("compare", help="per-tensor agreement of the integer simulator with onnxruntime", description=__doc__)
    add_args(p)
    p.add_argument("--all", action="store_true", help="list every quantized tensor, not only those that differ")
    p.add_argument("--ort-optimization", choices=sorted(OPTIMIZATION_LEVELS), default="all", help="onnxruntime graph optimization level (default all)")
    p.set_defaults(run=run)


def run(args) -> int:
    c = Comparator(args.model, target_of(args), rounding=args.rounding, ort_optimization=args.ort_optimization)
    for feeds in samples(args, c.sim.input_names):
        c.add(feeds)
    report = c.report
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.to_text(show_all=args.all))
    return 0 if report.locally_agrees else 3
