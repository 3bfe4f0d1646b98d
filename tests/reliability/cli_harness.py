"""Run the `torchq` CLI and judge its outcome the way a user sees it.

`run_cli` calls `torchq.cli.main` (what `python -m torchq` runs) in this process, with file
descriptors 1 and 2 redirected, so output that onnxruntime's C++ code writes is seen too; a
handful of tests also run real subprocesses to prove the process-level behaviour is the same.
`judge` states the contract every hostile-input and fuzz case must meet.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The one error line: "torchq COMMAND: error: ..." (ours and argparse's).
ERROR_LINE = re.compile(r"^torchq( [\w-]+)?: error: \S")
# What a traceback or an internal error looks like on stderr.
INTERNAL_MARKERS = ("Traceback (most recent call last)", "internal error:", 'File "/')


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    escaped: str | None = None  # an exception that escaped main(): always a bug

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip() and not ln.startswith("usage:") and not ln.startswith("  ")]


def run_cli(argv: list[str]) -> CliResult:
    """Call torchq.cli.main(argv) with fds 1 and 2 captured."""
    from torchq import cli

    saved = os.dup(1), os.dup(2)
    saved_py = sys.stdout, sys.stderr  # pytest may have replaced them with its own capture
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
        escaped = None
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001 -- anything escaping main() is what we look for
            code, escaped = -1, traceback.format_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = saved_py
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return CliResult(code, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"), escaped)


def run_cli_process(argv: list[str], timeout: float = 120) -> CliResult:
    """`python -m torchq ARGV` in a fresh process."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": os.environ.get("HOME", "/tmp")}
    r = subprocess.run([sys.executable, "-m", "torchq", *argv], capture_output=True, text=True, env=env, timeout=timeout)
    return CliResult(r.returncode, r.stdout, r.stderr)


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def judge(result: CliResult, outputs: list[Path], before: set[str], folder: Path, ok_codes=(0,)) -> str | None:
    """None if the outcome meets the contract, else what is wrong.

    Contract: exit 0 (or another documented success code) with every output present, or exit 2
    with one clear error line on stderr, no traceback, and no output or temporary file left.
    Exit 1 (internal error), an escaped exception or a traceback is always a failure.
    """
    if result.escaped:
        return f"exception escaped main():\n{result.escaped}"
    if any(m in result.stderr for m in INTERNAL_MARKERS):
        return f"exit {result.code} with a traceback or internal error:\n{result.stderr[-3000:]}"
    if result.code in ok_codes:
        missing = [str(p) for p in outputs if not p.is_file()]
        return f"exit {result.code} but outputs missing: {missing}" if missing else None
    if result.code != 2:
        return f"exit {result.code} (expected {ok_codes} or 2):\n{result.stderr[-3000:]}"
    lines = result.error_lines
    errors = [ln for ln in lines if ERROR_LINE.match(ln)]
    if len(errors) != 1 or lines[-1] != errors[0]:  # progress lines may come first; one error, last
        return f"exit 2 but stderr does not end in exactly one clear error line:\n{result.stderr[-3000:]}"
    left = files_in(folder) - before
    if left:
        return f"exit 2 but files were left behind: {sorted(left)}"
    return None
