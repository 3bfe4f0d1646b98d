"""A bounded sample of the model inputs seen during calibration, for the data-driven techniques.

Equalization, SmoothQuant, bias correction, AdaRound and `method: auto` run on the exported
ONNX graph and need calibration data there. Users of `prepare` calibrate in their own loop, so
`prepare` keeps the inputs of the first calibration batches -- at most `max_samples` items
(along the batch axis) and `max_sample_bytes` bytes, copied to the CPU -- and `export` feeds them
to the ONNX-side pipeline. Memory never grows beyond the cap, however many batches follow.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from onnx_backend.errors import CalibrationError

from .capture import CaptureSession, Phase


class SampleStore:
    def __init__(self, max_samples: int, max_bytes: int):
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.batches: list[list[torch.Tensor]] = []  # flattened tensor inputs of each kept batch
        self.samples = 0
        self.bytes = 0
        self.full = False

    def add(self, args: tuple, kwargs: dict) -> None:
        if self.full:
            return
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if not leaves:
            return
        n = leaves[0].shape[0] if leaves[0].dim() else 1
        take = min(n, self.max_samples - self.samples)
        per_item = sum(x.numel() * x.element_size() for x in leaves) / max(n, 1)
        take = min(take, int((self.max_bytes - self.bytes) // max(per_item, 1)))
        if take <= 0:
            self.full = True
            return
        kept = [x.detach()[:take].to("cpu", copy=True) if x.dim() and x.shape[0] == n else x.detach().to("cpu", copy=True) for x in leaves]
        self.batches.append(kept)
        self.samples += take
        self.bytes += sum(x.numel() * x.element_size() for x in kept)
        self.full = take < n or self.samples >= self.max_samples

    def feeds(self, input_names: Sequence[str], static_batch: dict[str, int | None]) -> list[dict[str, np.ndarray]]:
        """The kept batches as onnxruntime feeds; a batch is split where the ONNX input has a
        static batch size (the export's example batch)."""
        if not self.batches:
            raise CalibrationError("no calibration samples were kept: run the prepared model on calibration data first")
        out = []
        for batch in self.batches:
            if len(batch) != len(input_names):
                raise CalibrationError(f"a calibration batch has {len(batch)} tensor inputs; the exported model takes {len(input_names)} ({', '.join(input_names)})")
            arrays = [t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy() for t in batch]
            size = next((static_batch.get(n) for n in input_names if static_batch.get(n)), None)
            n = arrays[0].shape[0] if arrays[0].ndim else 1
            step = size or n
            for i in range(0, n - step + 1, step):
                out.append({name: (a[i : i + step] if a.ndim and a.shape[0] == n else a) for name, a in zip(input_names, arrays)})
        if not out:
            raise CalibrationError("the kept calibration batches are smaller than the exported model's fixed batch size")
        return out


_STORES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[SampleStore, object]] = weakref.WeakKeyDictionary()


def attach(model: torch.nn.Module, session: CaptureSession, max_samples: int, max_bytes: int) -> SampleStore:
    store = SampleStore(max_samples, max_bytes)

    def hook(module, args, kwargs):
        if session.phase is Phase.OBSERVE:
            store.add(args, kwargs)
        return None

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    _STORES[model] = (store, handle)
    return store


def detach(model: torch.nn.Module) -> None:
    entry = _STORES.pop(model, None)
    if entry is not None:
        entry[1].remove()


def store_of(model: torch.nn.Module) -> SampleStore | None:
    entry = _STORES.get(model)
    return None if entry is None else entry[0]
