"""Outputs are written atomically with the permissions a normal file gets (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import onnx
import pytest

from onnx_backend.model_io import save_model, write_text_atomic


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_outputs_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
        paths = [save_model(model, tmp_path / "m.onnx"), write_text_atomic(tmp_path / "r.md", "x")]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.onnx", "r.md"]  # no temporary files left
