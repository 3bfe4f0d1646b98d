"""torchq compare: the integer simulator against onnxruntime, tensor by tensor; names the first
node where they diverge. Exit 0 when the outputs agree (>= 99.9 % of int8 values identical, none
more than one step apart), 3 when they do not."""

from __future__ import annotations

import json

from npu.compare import Comparator

from ._npu_data import add_args, samples, target_of


def register(sub) -> None:
    p = sub.add_parser("compare", help="per-tensor agreement of the integer simulator with onnxruntime", description=__doc__)
    add_args(p)
    p.add_argument("--all", action="store_true", help="list every quantized tensor, not only those that differ")
    p.set_defaults(run=run)


def run(args) -> int:
    c = Comparator(args.model, target_of(args), rounding=args.rounding)
    for feeds in samples(args, c.sim.input_names):
        c.add(feeds)
    report = c.report
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.to_text(show_all=args.all))
    return 0 if report.agrees else 3
