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
from torchq.prepare import session_of

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


def test_keyboard_interrupt_in_the_data_loop_leaves_the_torch_model_usable_and_removable():
    entry = ZOO["inception"]
    model = entry.model()
    x = entry.calibration(1)[0]
    reference = model(*x)

    def data():
        yield from entry.calibration(2)
        raise KeyboardInterrupt

    torchq.prepare(model)
    with pytest.raises(KeyboardInterrupt):
        torchq.calibrate(model, data())
    assert not torch.overrides._get_current_function_mode_stack()  # the capture mode was left
    torchq.calibrate(model, entry.calibration(2))  # carries on
    assert_valid(torchq.export(model, x))
    torchq.unprepare(model)
    assert torch.equal(model(*x), reference)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("loop", ["torchq.calibrate", "own loop"])
def test_keyboard_interrupt_inside_a_forward_pass_at_every_module(loop):
    """Interrupt the calibration forward pass inside each module in turn. PyTorch skips its
    always-called hooks on KeyboardInterrupt, so torchq.calibrate leaves the capture mode itself,
    and in the user's own loop the next forward does. Observers stay self-consistent, keys stay
    right, and unprepare restores the model exactly."""
    entry = ZOO["residual"]
    model = entry.model()
    x = entry.calibration(1)[0]
    reference = model(*x)
    torchq.prepare(model)
    torchq.calibrate(model, [x])
    clean_keys = set(session_of(model)[0].observers)
    torchq.unprepare(model)
    for name, module in list(model.named_modules())[1:]:
        torchq.prepare(model)
        handle = module.register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            torchq.calibrate(model, [x]) if loop == "torchq.calibrate" else model(*x)
        handle.remove()
        with torch.no_grad():
            model(*x)  # the next calibration batch
        assert not torch.overrides._get_current_function_mode_stack(), name
        session, _ = session_of(model)
        assert set(session.observers) == clean_keys, name
        for obs in session.observers.values():
            assert obs.count == int(obs.counts.sum()), name
        assert_valid(torchq.export(model, x))
        torchq.unprepare(model)
        assert torch.equal(model(*x), reference), name


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
