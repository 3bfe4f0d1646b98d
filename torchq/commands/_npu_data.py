"""Input samples for `torchq simulate` and `torchq compare` (an .npz or a folder, as calibrate)."""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from npu import available_targets
from npu.fixed_point import ROUNDINGS

from onnx_backend.errors import OutputPathError

from ._common import iter_samples


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="quantized (QDQ) ONNX model")
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR_OR_NPZ",
        help="input samples: an .npz whose arrays (named after the model inputs, or arr_0, arr_1, ...) hold samples "
        "along axis 0, fed --batch-size at a time; or a folder of .npy / .npz files, one sample each",
    )
    p.add_argument("--batch-size", type=int, default=1, help="samples per run when --data is one .npz (default 1)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many runs")
    p.add_argument("--target", default="warboy", help=f"ops the target does not run execute in float on the host: {', '.join(available_targets())}, a .yaml, or 'all' (every QDQ unit in integers; default warboy)")
    p.add_argument("--rounding", choices=ROUNDINGS, default="single", help="TFLite requantization rounding (default single)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def target_of(args):
    return None if args.target == "all" else args.target


def samples(args, input_names: list[str]):
    return iter_samples(args.data, input_names, args.batch_size, args.max_samples)


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz written to a temporary file in the same folder, then renamed over `path`."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    except OSError as exc:
        raise OutputPathError(f"{path}: could not write ({exc.strerror or exc}); nothing was written") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
