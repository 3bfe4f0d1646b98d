"""The `torchq` command. Each subcommand lives in torchq/commands/<name>.py and registers itself.

Exit codes: 0 success, 2 bad input or usage (one clear line, no traceback), 1 internal error.
`--debug` shows tracebacks; `--quiet` hides progress bars (they are also hidden when stderr is
not a terminal).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from onnx_backend.errors import TorchqError

# Order here is the order in `torchq --help`.
COMMANDS = ("quantize", "quantize_onnx", "calibrate", "check", "simulate", "compare", "report", "validate")

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2

EPILOG = """examples:
  torchq quantize --recipe recipes/digits.yaml            PyTorch model -> INT8 ONNX, from a YAML recipe
  torchq quantize-onnx model.onnx --data calib.npz -o model.int8.onnx
  torchq report model.onnx model.int8.onnx --data calib.npz -o report/
  torchq validate model.int8.onnx                          TFLite 8-bit spec check

`torchq COMMAND --help` describes each command.
exit codes: 0 success, 2 bad input or usage (one line, no traceback; --debug shows it), 1 internal error."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # keep the docstrings' line breaks
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse exits 2 as well; keep its one-line format
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="torchq",
        description="Post-training INT8 quantization (TFLite 8-bit spec) of PyTorch and ONNX models for Warboy-class NPUs.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress messages (also hidden when stderr is not a terminal)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"torchq.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"torchq.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    for command in sub.choices.values():
        # Also accepted after the subcommand (`torchq quantize --quiet ...`); SUPPRESS keeps the
        # subparser from overwriting a value given before it.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or progress messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        result = args.run(args)
        return EXIT_OK if result is None else int(result)
    except TorchqError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"torchq {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"torchq {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"torchq {args.command}: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
