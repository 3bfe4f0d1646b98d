"""Faults: interrupted calibration, full disks and unwritable paths, reproducibility.

Interrupts are injected deterministically at every executed line of the code that updates the
statistics (tests/reliability/interrupts.py): that is where a Ctrl-C can land. Full disks are
real where this process may mount a small tmpfs (root, or a user namespace), and are simulated
at the OS boundary everywhere (an OSError(ENOSPC) from the write, the fsync or the rename), so
every step of an atomic write is covered on any machine.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import torchq
from onnx_backend import Calibrator, CalibrationMethod, assert_valid, load_ranges, quantize, save_model, save_ranges
from onnx_backend import model_io
from onnx_backend.errors import OutputPathError
from onnx_backend.statistics import TensorStatistics
from tests.reliability import hostile
from tests.reliability.cli_harness import ROOT, run_cli
from tests.reliability.interrupts import interrupt_at_line, lines_executed
from tests.zoo import ZOO
from torchq.observer import Observer

# ---- interrupted calibration -------------------------------------------------------------------


def _state(s: TensorStatistics) -> dict:
    return s.to_dict() | {"exponent": s.exponent}


def test_every_interrupt_of_a_histogram_update_leaves_the_old_or_the_new_statistics():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=2000).astype(np.float32), (rng.normal(size=2000) * 50).astype(np.float32)
    functions = [TensorStatistics.update, TensorStatistics.add_counts, TensorStatistics._widened]

    def fresh():
        s = TensorStatistics(256)
        s.update(first)
        return s

    before = _state(fresh())
    after = fresh()
    after.update(second)
    after = _state(after)
    counted = fresh()
    n = lines_executed(functions, lambda: counted.update(second))
    assert n > 10
    for k in range(n):
        s = fresh()
        with pytest.raises(KeyboardInterrupt), interrupt_at_line(functions, k):
            s.update(second)
        assert _state(s) in (before, after), f"torn state after an interrupt at line event {k}"
        if _state(s) == before:
            s.update(second)  # the calibration can go on
        assert _state(s) == after


def test_every_interrupt_of_a_torch_observer_update_leaves_the_old_or_the_new_statistics():
    rng = np.random.default_rng(1)
    first, second = torch.from_numpy(rng.normal(size=2000).astype(np.float32)), torch.from_numpy((rng.normal(size=2000) * 50).astype(np.float32))
    functions = [Observer.update, Observer._rebinned]

    def fresh():
        o = Observer("k", 256)
        o.update(first)
        return o

    before = _state(fresh().to_statistics())
    after = fresh()
    after.update(second)
    after = _state(after.to_statistics())
    counted = fresh()
    n = lines_executed(functions, lambda: counted.update(second))
    assert n > 10
    for k in range(n):
        o = fresh()
        with pytest.raises(KeyboardInterrupt), interrupt_at_line(functions, k):
            o.update(second)
        assert _state(o.to_statistics()) in (before, after), f"torn observer after an interrupt at line event {k}"


def _calibrator_samples(n=4):
    return [[x[None]] for x in hostile.calibration_arrays(n)]


def test_every_interrupt_of_the_onnx_calibrator_leaves_whole_samples():
    """Each tensor holds exactly the samples counted in `samples`; the calibrator carries on."""
    model = hostile.base_model()
    samples = _calibrator_samples(3)
    functions = [Calibrator.collect_data, TensorStatistics.update, TensorStatistics.add_counts, TensorStatistics._widened]
    n = lines_executed(functions, lambda: Calibrator(model, quiet=True).collect_data(samples))
    reference = Calibrator(model, CalibrationMethod.MSE_ASYM, quiet=True)
    reference.collect_data(samples)
    expected = reference.compute_range()
    sizes = {name: s.count // 3 for name, s in reference.statistics.items()}
    for k in range(0, n, max(1, n // 60)):  # about 60 interruption points spread over the run
        c = Calibrator(model, CalibrationMethod.MSE_ASYM, quiet=True)
        try:
            with interrupt_at_line(functions, k):
                c.collect_data(samples)
        except KeyboardInterrupt:
            pass
        for name, s in c.statistics.items():
            assert s.count == c.samples * sizes[name], f"interrupt {k}: {name} holds a partial sample"
        c.collect_data(samples[c.samples :])  # resume where it stopped
        assert c.compute_range() == expected


# ---- full disks and unwritable paths ------------------------------------------------------------


class _FailingFile:
    """A real file whose write() stores half the bytes and then fails as a full disk does."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


# ---- reproducibility ---------------------------------------------------------------------------

REPRO_SCRIPT = """
import sys, numpy as np, onnx, torch
torch.set_num_threads(1)
import torchq
from onnx_backend import Calibrator, CalibrationMethod, quantize, optimize_model, save_model, save_ranges
from tests.zoo import ZOO
from tests.reliability import hostile
out = sys.argv[1]
for name in ("inception", "transformer_block"):
    for dynamo in (True, False):
        entry = ZOO[name]
        model = entry.model()
        torchq.prepare(model, torchq.QuantConfig(method="entropy"))
        torchq.calibrate(model, entry.calibration(4))
        torchq.export(model, entry.calibration(1)[0], f"{out}/{name}_{'dynamo' if dynamo else 'ts'}.onnx", dynamo=dynamo)
        torchq.unprepare(model)
model = optimize_model(hostile.base_model())
c = Calibrator(model, CalibrationMethod.PERCENTILE_ASYM, quiet=True)
c.collect_data([[x[None]] for x in hostile.calibration_arrays(5)])
save_ranges(c.compute_range(), f"{out}/ranges.json")
save_model(quantize(model, c.compute_range()), f"{out}/onnx_path.onnx")
"""
