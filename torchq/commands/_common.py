"""Shared pieces of the subcommands: calibration data files, method names, output paths."""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnx_backend.calibrator import CalibrationMethod
from onnx_backend.errors import CalibrationError, OutputPathError

METHOD_CHOICES = [m.name.lower() for m in CalibrationMethod]


def method_arg(value: str) -> CalibrationMethod:
    try:
        return CalibrationMethod[value.upper()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid method {value!r}; choose from {', '.join(METHOD_CHOICES)}") from None


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR_OR_NPZ",
        help="calibration data: an .npz whose arrays (named after the model inputs, or arr_0, arr_1, ... in input order) "
        "hold all samples along axis 0, fed --batch-size at a time; or a folder of .npy (single-input models) or .npz "
        "files, one sample each, fed as stored (shapes may differ from file to file)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="samples per run when --data is one .npz (default 1)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many runs")


def _by_input(arrays: dict[str, np.ndarray], input_names: list[str], where: str) -> list[np.ndarray]:
    if all(n in arrays for n in input_names):
        return [arrays[n] for n in input_names]
    positional = [f"arr_{i}" for i in range(len(input_names))]
    if all(n in arrays for n in positional):
        return [arrays[n] for n in positional]
    if len(input_names) == 1 and len(arrays) == 1:
        return list(arrays.values())
    raise CalibrationError(f"{where}: arrays {sorted(arrays)} do not name the model inputs {input_names}")


def iter_samples(data: str, input_names: list[str], batch_size: int = 1, max_samples: int | None = None) -> Iterator[list[np.ndarray]]:
    """Calibration samples (lists of input arrays in input order) from an .npz or a folder."""
    path = Path(data)
    if not path.exists():
        raise CalibrationError(f"{path}: no such calibration data file or folder")
    count = 0
    if path.is_file():
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("one array, not an .npz archive; for single-array samples pass a folder of .npy files")
            with loaded as npz:
                arrays = _by_input(dict(npz.items()), input_names, str(path))
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
        if any(a.ndim == 0 for a in arrays):
            raise CalibrationError(f"{path}: arrays must hold the samples along axis 0; got a scalar")
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise CalibrationError(f"{path}: arrays hold different numbers of samples")
        for start in range(0, n, batch_size):
            if max_samples is not None and count >= max_samples:
                return
            yield [a[start : start + batch_size] for a in arrays]
            count += 1
        return
    files = sorted(f for f in path.iterdir() if f.suffix in (".npy", ".npz"))
    if not files:
        raise CalibrationError(f"{path}: no .npy or .npz files in this folder")
    for f in files:
        if max_samples is not None and count >= max_samples:
            return
        try:
            if f.suffix == ".npy":
                if len(input_names) != 1:
                    raise CalibrationError(f"{f}: .npy holds one array but the model takes {len(input_names)} inputs; use .npz")
                yield [np.load(f, allow_pickle=False)]
            else:
                with np.load(f, allow_pickle=False) as npz:
                    yield _by_input(dict(npz.items()), input_names, str(f))
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CalibrationError(f"{f}: not a readable numpy file ({exc})") from None
        count += 1


def check_output_path(path: str) -> Path:
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"{p}: folder {folder} does not exist")
    return p
