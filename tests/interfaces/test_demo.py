"""`make demo` (python -m torchq.examples.digits): the README's first command, end to end."""

from __future__ import annotations

import re
import shutil

import onnx

from onnx_backend import assert_valid
from torchq.examples import digits


def test_demo_prints_float_vs_int8_and_writes_a_valid_model(digits_models, tmp_path, capsys):
    shutil.copy(digits_models["dir"] / "digits_cnn.pt", tmp_path / "digits_cnn.pt")  # trained once per session
    assert digits.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    float_acc = float(re.search(r"float accuracy \(PyTorch\):\s+([\d.]+) %", out).group(1))
    int8_acc = float(re.search(r"INT8 accuracy \(onnxruntime\):\s+([\d.]+) %", out).group(1))
    assert float_acc > 95 and int8_acc >= 0.995 * float_acc, out
    assert "TFLite spec check:            all rules hold" in out
    npu_line = re.search(r"NPU check \(warboy\): +(\d+) of (\d+) ops on the NPU, (\d+) on the host", out)
    # every op on the NPU but the Linear head writing the logits, which stays float (planner rule 8)
    assert npu_line and int(npu_line.group(1)) == int(npu_line.group(2)) - 1 and npu_line.group(3) == "1", out
    assert "Gemm" in out.split("NPU check", 1)[1].splitlines()[0], out
    assert_valid(onnx.load(tmp_path / "digits.int8.onnx"))
