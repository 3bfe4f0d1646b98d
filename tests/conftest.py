"""Shared fixtures: real torch models, real exports, real onnxruntime sessions."""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=UserWarning, module="torch")
torch.set_num_threads(1)


def run_onnx(model, feeds: dict) -> list[np.ndarray]:
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
