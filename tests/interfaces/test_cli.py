"""The `torchq` command, run for real in a subprocess: help, exit codes, errors, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnx_backend import assert_valid

ROOT = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ["quantize", "quantize-onnx", "calibrate", "report", "validate"]


def torchq(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TQDM_DISABLE", None)  # progress bars must hide themselves when stderr is not a terminal
    return subprocess.run([sys.executable, "-m", "torchq", *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess, command: str) -> str:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    first = p.stderr.strip().splitlines()[0]
    assert first.startswith(f"torchq {command}: error: "), p.stderr
    return first


def test_help_lists_every_command_and_the_exit_codes():
    p = torchq("--help")
    assert p.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name} " in p.stdout or f"    {name}\n" in p.stdout
    assert "exit codes: 0 success, 2 bad input or usage" in p.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_complete_help(name):
    p = torchq(name, "--help")
    assert p.returncode == 0 and p.stderr == ""
    assert "--debug" in p.stdout and "--quiet" in p.stdout and p.stdout.count("\n") > 8


def test_every_argument_has_a_help_text():
    from torchq.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"torchq {name}: {action.option_strings or action.dest} has no help"


def test_usage_errors_exit_2():
    assert torchq().returncode == 2  # no command: help, exit 2
    p = torchq("frobnicate")
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = torchq("quantize")
    assert p.returncode == 2 and "--recipe" in p.stderr
    p = torchq("report", "a.onnx", "b.onnx", "--data", "x.npz", "-o", "r", "--top", "-1")
    assert p.returncode == 2 and "expected a whole number >= 0" in p.stderr


def test_quantize_runs_the_digits_recipe(tmp_path):
    p = torchq("quantize", "--recipe", ROOT / "recipes" / "digits.yaml", "--set", "calibration.kwargs.num_samples=64", "-o", tmp_path / "d.onnx", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "top-1 accuracy (%):" in p.stdout and "spec check:   all TFLite 8-bit rules hold" in p.stdout
    assert "Traceback" not in p.stderr and "calibrating:" not in p.stderr  # not a terminal: no bars
    assert_valid(onnx.load(tmp_path / "d.onnx"))
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["overrides"] == ["calibration.kwargs.num_samples=64"] and report["calibration_batches"] == 2
    assert (tmp_path / "d.report.md").is_file()
    assert (tmp_path / "out" / "digits" / "digits_cnn.pt").is_file()  # the recipe's cache_dir, relative to the working directory


def test_quiet_prints_only_the_result(tmp_path):
    p = torchq("--quiet", "quantize", "--recipe", ROOT / "recipes" / "digits.yaml", "--no-eval", "--set", "calibration.num_batches=1", "-o", tmp_path / "d.onnx", cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.startswith("INT8 model:")
    p2 = torchq("quantize", "--quiet", "--check", "--recipe", ROOT / "recipes" / "digits_percentile_sym.yaml")
    assert p2.returncode == 0 and p2.stdout.splitlines()[0].endswith("valid (recipes/digits_percentile_sym.yaml <- recipes/digits.yaml)")
    assert "method: percentile" in p2.stdout and "exporter: torchscript" in p2.stdout


def test_bad_recipe_is_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization:\n  method: kl\n")
    line = one_line_error(torchq("quantize", "--recipe", bad), "quantize")
    assert "bad.yaml:2: quantization.method: Input should be 'min_max', 'percentile', 'mse', 'entropy', 'sqnr' or 'auto' (got 'kl')" in line
    p = torchq("--debug", "quantize", "--recipe", bad)
    assert p.returncode == 2 and "Traceback" in p.stderr


def test_failing_recipe_code_is_exit_2_naming_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: " + str(ROOT / "recipes" / "digits.yaml") + "\ncalibration: {kwargs: {batch_size: 0}}\n")
    line = one_line_error(torchq("quantize", "--recipe", recipe, "-o", tmp_path / "x.onnx", cwd=tmp_path), "quantize")
    assert "digits.yaml:14: calibration.loader: calibration_loader raised ValueError: batch_size should be a positive integer" in line
    assert "(check calibration.kwargs, set at r.yaml:2)" in line
    assert not (tmp_path / "x.onnx").exists()
    p = torchq("quantize", "--debug", "--recipe", recipe, "-o", tmp_path / "x.onnx", cwd=tmp_path)
    assert "Traceback" in p.stderr  # the user's own code's traceback, for debugging


def test_internal_errors_exit_1(tmp_path):
    # Fault injection: a command that fails with an unexpected exception, run through the real CLI.
    code = "import sys, torchq.commands.validate as v; v.run = lambda args: 1 / 0; from torchq.cli import main; sys.exit(main(['validate', 'x.onnx']))"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 1 and "internal error: ZeroDivisionError" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-c", code.replace("['validate'", "['--debug', 'validate'")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_report_command(tmp_path, digits_models):
    out = tmp_path / "rep"
    p = torchq("report", digits_models["float"], digits_models["clipped"], "--data", digits_models["data"], "--batch-size", "64", "--top", "2", "-o", out)
    assert p.returncode == 0, p.stderr
    assert "most SQNR lost at:" in p.stdout and p.stdout.count(" dB  ") == 5
    assert {f.name for f in out.iterdir()} >= {"report.md", "report.html", "report.json", "sqnr_per_layer.png"}
    assert len(list(out.glob("hist_*.png"))) == 2


def test_report_sensitivity_names_the_culprit_layer(tmp_path, digits_models):
    """The clipped model's culprit is features.2's output (conftest); the sensitivity section,
    computed from the float model alone, ranks every layer and is in all three report files."""
    out = tmp_path / "rep"
    p = torchq("report", digits_models["float"], digits_models["clipped"], "--data", digits_models["data"], "--max-samples", "64", "--no-plots", "--sensitivity", "-o", out)
    assert p.returncode == 0, p.stderr
    assert "most sensitive layer:" in p.stdout
    sens = json.loads((out / "report.json").read_text())["sensitivity"]
    layers = sens["layers"]
    assert len(layers) >= 4 and all(r["only_this_quantized"] > sens["quantized"] - 0.01 for r in layers)  # one layer alone hurts less than all
    gains = [r["all_but_this_quantized"] - sens["quantized"] for r in layers]
    assert gains == sorted(gains, reverse=True)  # most harmful first
    assert "## Sensitivity" in (out / "report.md").read_text() and "<h2>Sensitivity" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx", "{int8}", "--data", "{data}"], "missing.onnx: no such file"),
        (["{float}", "{int8}", "--data", "nope.npz"], "nope.npz: no such calibration data file or folder"),
        (["{float}", "{float}", "--data", "{data}"], "no QuantizeLinear/DequantizeLinear pairs"),
        (["{float}", "{int8}", "--data", "{bad_data}"], "do not name the model inputs"),
    ],
)
def test_report_bad_input_is_exit_2(tmp_path, digits_models, args, message):
    import numpy as np

    np.savez(tmp_path / "bad.npz", a=np.zeros((2, 1, 8, 8), np.float32), b=np.zeros((2, 3), np.float32))
    subst = {"{float}": digits_models["float"], "{int8}": digits_models["mse"], "{data}": digits_models["data"], "{bad_data}": tmp_path / "bad.npz"}
    args = [str(subst.get(a, a)) for a in args]
    line = one_line_error(torchq("report", *args, "-o", tmp_path / "r", cwd=tmp_path), "report")
    assert message in line
    assert not (tmp_path / "r").exists()  # nothing written


def test_validate_and_quantize_onnx_still_work(tmp_path, digits_models):
    p = torchq("validate", digits_models["mse"])
    assert p.returncode == 0 and "all TFLite 8-bit spec rules hold" in p.stdout
    p = torchq("quantize-onnx", digits_models["float"], "--data", digits_models["data"], "--batch-size", "64", "-o", tmp_path / "q.onnx")
    assert p.returncode == 0, p.stderr
    assert_valid(onnx.load(tmp_path / "q.onnx"))
