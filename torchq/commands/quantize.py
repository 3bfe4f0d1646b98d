"""torchq quantize: run a YAML recipe end to end (model -> calibration -> INT8 ONNX -> evaluation -> report).

A recipe names Python code that this command imports and runs (model.factory, calibration.loader,
evaluation.function): run only recipes you trust. Modules are imported from installed packages and
the working directory. See recipes/template.yaml and docs/INTERFACES.md for every key.
"""

from __future__ import annotations

import os
import sys

from ..recipes import Recipe


def register(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="run a YAML recipe: calibrate a PyTorch model, write the INT8 ONNX and a report",
        description=__doc__,
        epilog="example: torchq quantize --recipe recipes/digits.yaml --set quantization.method=percentile -o out/digits.int8.onnx",
    )
    p.add_argument("--recipe", required=True, metavar="YAML", help="the recipe file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key (dotted path; the value is read as YAML), e.g. quantization.method=entropy, "
        "calibration.num_batches=16, quantization.overrides.0.float=true; repeatable",
    )
    p.add_argument("-o", "--output", metavar="ONNX", help="INT8 model to write (default: the recipe's export.path); the report goes next to it")
    p.add_argument("--no-eval", action="store_true", help="skip the recipe's evaluation")
    p.add_argument("--check", action="store_true", help="only load and validate the recipe, print it resolved, run nothing")
    p.set_defaults(run=run)


def run(args) -> int:
    recipe = Recipe.load(args.recipe, overrides=args.overrides)
    if args.check:
        import yaml

        print(f"{recipe.where}: valid ({' <- '.join(os.path.relpath(f) for f in reversed(recipe.files))})")
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip())
        return 0
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own modules import
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    result = recipe.run(args.output, evaluate=not args.no_eval, quiet=True if args.quiet else None, log=log)
    print("\n".join(result.summary_lines()))
    return 0
