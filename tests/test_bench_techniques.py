"""The technique benchmark script runs and writes a well-formed table (quick mode, tiny model)."""

from __future__ import annotations

from bench import techniques


def test_quick_mode_writes_a_table(tmp_path):
    out = tmp_path / "table.md"
    assert techniques.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Accuracy techniques, measured (per-tensor weights)") and "python -m bench.techniques --quick" in text
    rows = [line for line in text.splitlines() if line.startswith("| quick |")]
    assert len(rows) == 2 and rows[0].count("|") == 8  # model, metric, float, plain, eq, best, best / float
