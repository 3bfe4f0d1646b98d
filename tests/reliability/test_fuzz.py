"""The fuzzer (tests/reliability/fuzz.py) for a bounded, seeded, deterministic run.

It runs in its own process under a memory limit, so a crash in native code or a memory bomb
fails this test with the case that caused it instead of taking pytest down. Longer hunts:
python -m tests.reliability.fuzz --seed N --cases 2000 --out /tmp/fuzz
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from tests.reliability.cli_harness import ROOT

CASES = int(os.environ.get("TORCHQ_FUZZ_CASES", "300"))
SEEDS = [int(s) for s in os.environ.get("TORCHQ_FUZZ_SEEDS", "0").split(",")]
MEMORY_LIMIT = 8 << 30  # address space; torch alone maps about 2 GiB


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_models_get_exit_0_with_a_valid_model_or_exit_2_with_one_line(seed, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "tests.reliability.fuzz", "--seed", str(seed), "--cases", str(CASES), "--seconds", "240", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, preexec_fn=_limit_memory, cwd=ROOT)
    records = [json.loads(line) for line in (tmp_path / "fuzz.jsonl").read_text().splitlines()]
    done = next((r for r in records if "done" in r), None)
    if done is None:
        started = [r["start"] for r in records if "start" in r]
        pytest.fail(f"the fuzzer died (exit {proc.returncode}) during case {started[-1] if started else '?'} of seed {seed}:\n{proc.stderr[-3000:]}")
    failures = [r for r in records if r.get("verdict")]
    report = "\n\n".join(f"case {r['case']} ({r['base']}, {r['mutations']}), {r['cmd']}: {r['verdict']}" for r in failures[:10])
    assert not failures, f"{len(failures)} fuzz failures (replay: python -m tests.reliability.fuzz --seed {seed} --only N --out DIR):\n{report}"
    assert done["done"] == CASES, f"only {done['done']} of {CASES} cases ran within the time limit"
    commands = {r["cmd"] for r in records if "cmd" in r}
    codes = {r["code"] for r in records if "code" in r}
    assert {"quantize-onnx --ranges", "validate"} <= commands and {0, 2} <= codes, (commands, codes)
