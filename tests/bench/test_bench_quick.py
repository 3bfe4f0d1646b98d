"""The benchmark scripts still run and produce well-formed tables (quick mode: tiny settings).

Asserts the shape of the report, never timings or accuracies: those are measured by
`make bench` and written to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("torchao", reason="the benchmark's PT2E peer needs torchao (pip install -e '.[bench]')")

from bench import run  # noqa: E402

# One worker runs the whole module: the module fixture would otherwise run the quick benchmark once
# per xdist worker, at the same time, over the same cache folder.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bench_quick")]


def _tables(markdown: str) -> list[list[str]]:
    """Markdown tables as lists of lines."""
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["--quick", "--out", str(out)]) == 0
    return out


def test_every_section_is_written(report):
    text = (report / "BENCHMARKS.md").read_text()
    for heading in ("## 0. ImageNet-pretrained EfficientNet-Lite", "## 1. Accuracy", "## 2. The reference product", "## 3. ONNX in", "## 4. Latency of the test zoo", "## 5. No calibration method collapses", "## 6. Compatibility", "## Why INT8 is slow"):
        assert heading in text, heading
    assert "python -m bench.run --quick" in text


def test_tables_are_well_formed(report):
    tables = _tables((report / "BENCHMARKS.md").read_text())
    assert len(tables) >= 10
    for t in tables:
        header = _cells(t[0])
        assert len(header) >= 2
        assert set(t[1].replace("|", "")) <= {"-"}, t[1]
        assert len(t) >= 3, f"table without rows: {t[0]}"
        for line in t[2:]:
            assert len(_cells(line)) == len(header), (t[0], line)


def test_numbers_are_present(report):
    text = (report / "BENCHMARKS.md").read_text()
    # the accuracy table holds a float metric for the model and for every method it ran
    row = next(line for line in text.splitlines() if line.startswith("| digits_cnn | top-1 %"))
    values = _cells(row)[2:]
    assert values and all(re.fullmatch(r"\d+\.\d\d", v) for v in values), row


def test_ten_method_fast_path_matches_the_public_api(report):
    # the accuracy section quantizes every method from one export; it must give the bytes
    # torchq.prepare -> calibration -> torchq.export gives
    text = (report / "BENCHMARKS.md").read_text()
    assert "writes: digits_cnn yes." in text


def test_targets_summary(report):
    text = (report / "BENCHMARKS.md").read_text()
    assert "## Targets at a glance" in text
    summary = text.split("## Targets at a glance", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| target")]
    assert len(rows) >= 5
    assert all(_cells(r)[1] in ("met", "**missed**") for r in rows), rows


def test_no_quantized_model_breaks_the_spec(report):
    text = (report / "BENCHMARKS.md").read_text()
    assert "| digits_cnn | torchq (all ten) | none |" in text
    assert "Peer errors" not in text  # both peers ran: onnxruntime and torchao's PT2E
    assert "violations**" not in text


def test_plots_and_raw_results(report):
    for name in ("accuracy.png", "latency.png", "memory.png"):
        assert (report / "bench" / name).stat().st_size > 1000, name
    data = json.loads((report / "bench" / "results.json").read_text())
    assert set(data) == set(run.SECTIONS)
    assert data["accuracy"][0]["subject"] == "digits_cnn"


def test_robustness_section_judges_every_method_on_the_real_models(report):
    text = (report / "BENCHMARKS.md").read_text()
    section = text.split("## 5. No calibration method collapses", 1)[1].split("\n## ", 1)[0]
    for model in ("ocr_rec", "ocr_cls", "mobilenet_v3"):
        assert f"### {model}" in section, model
    # the paddle2onnx classifier's 35 BatchNorms (Constant-node weights) all fold
    assert "BatchNormalization in 35, BatchNormalization out 0" in section
    tables = _tables(section)
    assert len(tables) == 3
    for t in tables:
        rows = [_cells(line) for line in t[2:]]
        assert [r[0] for r in rows] == ["min_max_asym", "min_max_sym", "entropy_asym", "entropy_sym", "percentile_asym", "percentile_sym", "mse_asym", "mse_sym", "sqnr_asym", "sqnr_sym"]
        assert all(re.fullmatch(r"-?\d+\.\d\d", r[2]) for r in rows), rows
        assert all(r[4] == "ok" or r[4].startswith("MISSED") for r in rows), rows


def test_onnx_path_reports_the_technique_flags(report):
    # the ONNX-path table runs the best method again through the technique pipeline, with and
    # without bias correction, and the targets summary judges it
    tables = _tables((report / "BENCHMARKS.md").read_text())
    main = next(t for t in tables if "torchq best with techniques SQNR dB" in t[0])
    column = _cells(main[0]).index("torchq best with techniques SQNR dB")
    row = next(_cells(line) for line in main[2:] if _cells(line)[0] == "digits_cnn")
    assert re.fullmatch(r"-?\d+\.\d \(.+\)", row[column]), row
    variants = next(t for t in tables if _cells(t[0])[:2] == ["model", "best method"])
    cells = next(_cells(line) for line in variants[2:] if _cells(line)[0] == "digits_cnn")
    assert all(re.fullmatch(r"-?\d+\.\d / \d+\.\d\d / \d+\.\d", c) for c in cells[2:]), cells
    assert "best fidelity with the technique flags" in (report / "BENCHMARKS.md").read_text()


def test_compatibility_section_has_a_row_per_model(report):
    from bench.compatibility import SMOKE

    text = (report / "BENCHMARKS.md").read_text()
    section = text.split("## 6. Compatibility", 1)[1].split("\n## ", 1)[0]
    (t,) = _tables(section.split("### Per model", 1)[0])
    rows = {_cells(line)[0]: _cells(line) for line in t[2:]}
    assert set(rows) == set(SMOKE)
    for cells in rows.values():  # SQNR for both exporters and the peer, a verdict
        assert all(re.fullmatch(r"-?\d+\.\d", c) for c in cells[3:6]), cells
        assert cells[-1] == "pass" or cells[-1].startswith(("dynamo", "torchscript", "fails")), cells
