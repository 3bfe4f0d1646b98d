"""torchq simulate: run a quantized model with integers only (int8, int32 accumulation, TFLite
fixed-point requantization), as the NPU would; ops the target does not run execute in float."""

from __future__ import annotations

import json

import numpy as np

from npu import Simulator
from ._common import check_output_path
from ._npu_data import add_args, samples, target_of, write_npz_atomic


def register(sub) -> None:
    p = sub.add_parser("simulate", help="integer-only reference execution of a QDQ model", description=__doc__)
    add_args(p)
    p.add_argument("-o", "--output", help="write the outputs of every sample (stacked along axis 0) to this .npz")
    p.set_defaults(run=run)


def run(args) -> int:
    out_path = check_output_path(args.output) if args.output else None
    sim = Simulator(args.model, target_of(args), rounding=args.rounding)
    results: list[list[np.ndarray]] = []
    for feeds in samples(args, sim.input_names):
        results.append(sim.run(feeds))
    stacked = {name: np.concatenate([r[i] for r in results]) if results[0][i].ndim else np.stack([r[i] for r in results]) for i, name in enumerate(sim.output_names)}
    summary = sim.summary()
    if out_path is not None:
        write_npz_atomic(out_path, stacked)
    if args.json:
        info = {"runs": len(results), **summary, "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in stacked.items()}}
        print(json.dumps(info, indent=1))
        return 0
    kinds = summary["nodes"]
    print(f"{len(results)} run(s) on target {summary['target']}: {kinds.get('int8', 0)} nodes in integers, {kinds.get('host', 0)} in float on the host")
    for name, why in summary["host_nodes"].items():
        print(f"  host: {name}: {why}")
    for k, v in stacked.items():
        print(f"  output {k}: shape {list(v.shape)} {v.dtype}, range [{v.min():.6g}, {v.max():.6g}]")
    if out_path is not None:
        print(f"outputs written to {out_path}")
    return 0
