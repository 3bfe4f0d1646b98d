"""Faults: interrupted calibration, full disks and unwritable paths, reproducibility.

Interrupts are injected deterministically at every executed line of the code that updates the
statistics (tests/reliability/interrupts.py): that is where a Ctrl-C can land. Full disks are
real where this process may mount a small tmpfs (root, or a user namespace), and are simulated
at the OS boundary everywhere (an OSError(ENOSPC) from the write, the fsync or the rename), so
every step of an atomic write is covered on any machine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import torchq
from onnx_backend import Calibrator, CalibrationMethod, assert_valid, save_model, save_ranges
from onnx_backend import model_io
from onnx_backend.errors import OutputPathError
from onnx_backend import statistics
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


# A second batch 50x wider re-bins the histogram (update's general path); one 50x narrower fits the
# current bins (the compiled kernel counts it in place).
SECOND_BATCH_SCALES = pytest.mark.parametrize("scale", [50.0, 0.02], ids=["widens the bins", "fits the bins"])
HISTOGRAM_UPDATE = [TensorStatistics.update, TensorStatistics._counted_in_current_bins, statistics._count_into, TensorStatistics.add_counts, TensorStatistics._widened]


@SECOND_BATCH_SCALES
def test_every_interrupt_of_a_histogram_update_leaves_the_old_or_the_new_statistics(scale):
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=2000).astype(np.float32), (rng.normal(size=2000) * scale).astype(np.float32)
    functions = HISTOGRAM_UPDATE

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


@SECOND_BATCH_SCALES
@pytest.mark.parametrize("binning", ["compiled kernel (CPU tensors)", "torch ops (other devices)"])
def test_every_interrupt_of_a_torch_observer_update_leaves_the_old_or_the_new_statistics(monkeypatch, binning, scale):
    rng = np.random.default_rng(1)
    first, second = torch.from_numpy(rng.normal(size=2000).astype(np.float32)), torch.from_numpy((rng.normal(size=2000) * scale).astype(np.float32))
    if binning.startswith("torch"):
        monkeypatch.setattr(statistics, "_binning", None)  # the path a GPU tensor takes, here on the CPU
        functions = [Observer.update, Observer._rebinned]
    else:
        functions = [Observer.update, Observer._update_on_host, *HISTOGRAM_UPDATE]

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
    functions = [Calibrator.collect_data, Calibrator._fold, *HISTOGRAM_UPDATE]
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


def test_interrupted_cli_writes_nothing(tmp_path, monkeypatch):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    out = tmp_path / "out.onnx"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Calibrator, "compute_range", interrupted)
    before = set(tmp_path.iterdir())
    r = run_cli(hostile.commands(paths, out)["quantize-onnx --data"])
    assert r.code == 130 and "interrupted; nothing was written" in r.stderr
    assert set(tmp_path.iterdir()) == before


# ---- full disks and unwritable paths ------------------------------------------------------------


def _big_model() -> onnx.ModelProto:
    """The base model plus a 4 x 20000 MatMul head: about 80 KB of int8 weights once quantized,
    more than a 64 KiB filesystem holds."""
    from onnx import TensorProto, helper

    m = hostile.base_model()
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 20000)).astype(np.float32), "big_w"))
    m.graph.node.append(helper.make_node("MatMul", ["f", "big_w"], ["y2"], name="big_head"))
    m.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 20000]))
    return m


@contextlib.contextmanager
def _tmpfs(path, options: str, why_skip: str = ""):
    """A real small filesystem at `path` (needs the right to mount: root, or a user namespace)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}){why_skip}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 KiB filesystem."""
    with _tmpfs(tmp_path / "small", "size=64k", "; the OS-boundary tests below cover the same steps") as mnt:
        yield mnt


def test_real_full_disk_leaves_no_partial_file_and_keeps_the_old_one(small_tmpfs):
    old = small_tmpfs / "model.int8.onnx"
    old.write_bytes(b"the previous output")
    with pytest.raises(OutputPathError, match=r"No space left on device.*nothing was written"):
        save_model(_big_model(), old)
    assert old.read_bytes() == b"the previous output"
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["model.int8.onnx"]
    ranges = {f"tensor_{i}": (0.0, 1.0) for i in range(5000)}  # about 200 KB of JSON
    with pytest.raises(OutputPathError, match="nothing was written"):
        save_ranges(ranges, small_tmpfs / "ranges.json")
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["model.int8.onnx"]


def test_real_full_disk_through_the_cli(small_tmpfs, tmp_path):
    paths = hostile.write_inputs(tmp_path / "in", _big_model())
    r = run_cli(["quantize-onnx", str(paths["model"]), "--ranges", str(paths["ranges"]), "--target", "all", "-o", str(small_tmpfs / "q.onnx")])
    assert r.code == 2 and "No space left on device" in r.stderr and len(r.error_lines) == 1, r.stderr
    assert list(small_tmpfs.iterdir()) == []


def test_read_only_filesystem(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as mnt:
        with pytest.raises(OutputPathError, match="not writable"):
            save_model(hostile.base_model(), mnt / "m.onnx")
        with pytest.raises(OutputPathError, match="not writable|nothing was written"):
            save_ranges({"x": (0.0, 1.0)}, mnt / "r.json")
        assert list(mnt.iterdir()) == []


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """The kernel refuses to grow any file of this process past `limit` bytes (EFBIG): a write
    that fails half-way, like a full disk, without privileges."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failure_at_each_step_of_an_atomic_write_leaves_no_partial_file(where, tmp_path, monkeypatch):
    """Each step of an atomic write failing at the OS boundary: the write itself (a real kernel
    limit on file size: the bytes up to it are written, then EFBIG), the fsync or the rename
    (OSError(ENOSPC) from os.fsync / os.replace, which is how a full disk reports a delayed
    allocation failure). Portable: no mount needed, and every step is hit on purpose."""
    target = tmp_path / "model.int8.onnx"
    target.write_bytes(b"the previous output")
    model = _big_model()
    context = _file_size_limit(4096) if where == "write" else contextlib.nullcontext()
    if where == "fsync":
        monkeypatch.setattr(model_io.os, "fsync", _enospc)
    elif where == "replace":
        monkeypatch.setattr(model_io.os, "replace", _enospc)
    with context:
        with pytest.raises(OutputPathError, match="nothing was written"):
            save_model(model, target)
        with pytest.raises(OutputPathError, match="nothing was written"):
            save_ranges({f"tensor_{i}": (0.0, 1.0) for i in range(5000)}, tmp_path / "ranges.json")
    monkeypatch.undo()
    assert target.read_bytes() == b"the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]


def test_unwritable_output_through_the_cli_for_every_writer(tmp_path):
    paths = hostile.write_inputs(tmp_path, hostile.base_model())
    folder_file = tmp_path / "not_a_folder"
    folder_file.write_text("x")
    for argv in (
        ["quantize-onnx", str(paths["model"]), "--ranges", str(paths["ranges"]), "-o", str(folder_file / "q.onnx")],
        ["calibrate", str(paths["model"]), "--data", str(paths["data"]), "-o", str(folder_file / "r.json")],
        ["simulate", str(paths["model"]), "--data", str(paths["data"]), "-o", str(folder_file / "s.npz")],
    ):
        before = set(tmp_path.iterdir())
        r = run_cli(argv)
        assert r.code == 2 and len(r.error_lines) == 1 and "does not exist" in r.stderr, (argv, r.stderr)
        assert set(tmp_path.iterdir()) == before


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


def test_same_inputs_give_byte_identical_files_across_processes(tmp_path):
    """Two fresh processes (different hash seeds) write byte-identical models and ranges: the
    PyTorch path with both exporters and the ONNX path."""
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}"
        out.mkdir()
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
        r = subprocess.run([sys.executable, "-c", REPRO_SCRIPT, str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in outs[1].iterdir())
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    # and the CLI, twice in one process
    paths = hostile.write_inputs(tmp_path / "cli", hostile.base_model())
    for i in (1, 2):
        assert run_cli(["quantize-onnx", str(paths["model"]), "--data", str(paths["data"]), "--method", "entropy_sym", "-o", str(tmp_path / f"c{i}.onnx")]).code == 0
    assert (tmp_path / "c1.onnx").read_bytes() == (tmp_path / "c2.onnx").read_bytes()


def _qparams_by_key(qmodel: onnx.ModelProto, keys_of_tensor: dict[str, list[str]]) -> dict[str, tuple]:
    """{observer key: (scale, zero point)} of the QuantizeLinear reading each bound tensor."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    q_of = {n.input[0]: n for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    out = {}
    for tensor, keys in keys_of_tensor.items():
        q = q_of.get(tensor)
        if q is not None:
            out[keys[0]] = (float(inits[q.input[1]]), int(inits[q.input[2]]))
    return out


@pytest.mark.parametrize("name", ["residual", "inception", "transformer_block", "squeeze_excitation"])
def test_both_exporters_give_the_same_quantization_parameters_per_observer_key(name):
    entry = ZOO[name]
    model = entry.model()
    torchq.prepare(model, torchq.QuantConfig(method="mse"))
    torchq.calibrate(model, entry.calibration(4))
    by_exporter = {}
    for dynamo in (True, False):
        qmodel, report = torchq.export_with_report(model, entry.calibration(1)[0], dynamo=dynamo)
        assert_valid(qmodel)
        by_exporter[dynamo] = (_qparams_by_key(qmodel, report.keys_of_tensor), {k[0]: report.ranges[t] for t, k in report.keys_of_tensor.items() if t in report.ranges})
    torchq.unprepare(model)
    (dyn_q, dyn_r), (ts_q, ts_r) = by_exporter[True], by_exporter[False]
    common_ranges = dyn_r.keys() & ts_r.keys()
    assert len(common_ranges) >= 0.8 * max(len(dyn_r), len(ts_r)), (sorted(dyn_r.keys() ^ ts_r.keys()))
    assert all(dyn_r[k] == ts_r[k] for k in common_ranges)
    common = dyn_q.keys() & ts_q.keys()
    assert len(common) >= 0.5 * max(len(dyn_q), len(ts_q)) and common
    differ = {k: (dyn_q[k], ts_q[k]) for k in common if dyn_q[k] != ts_q[k]}
    assert not differ, differ
