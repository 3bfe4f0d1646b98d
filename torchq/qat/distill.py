"""distill: fine-tune a QAT model towards its float model's outputs; keep the best state.

No labels: the loss is the distance (MSE, or 1 - cosine along the last axis) between the
fake-quantized outputs and the float model's on the same inputs. Every `eval_every` steps the
same distance is measured on held-back batches; the state that measured best (the PTQ start
included) is the one the model ends with, so QAT never ends worse there than where it started.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from onnx_backend.errors import ConfigError

from .config import QATConfig, make_qat_config
from .prepare import qat_state


@dataclass
class DistillReport:
    start: float  # held-back distance of the PTQ model QAT started from
    best: float  # of the state the model ends with
    best_step: int
    steps: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-back distance)

    def to_dict(self) -> dict:
        return {"start": self.start, "best": self.best, "best_step": self.best_step, "steps": self.steps, "seconds": round(self.seconds, 1), "history": self.history}


def output_tensors(out) -> list[torch.Tensor]:
    """The float tensors of a model output (a tensor, tuple, dict or ModelOutput)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def distance(student, teacher, loss: str) -> torch.Tensor:
    s, t = output_tensors(student), output_tensors(teacher)
    if len(s) != len(t) or not s:
        raise ConfigError(f"the QAT model gives {len(s)} float outputs, the float model {len(t)}")
    if loss == "mse":
        return sum(F.mse_loss(a.float(), b.float()) / b.float().pow(2).mean().clamp_min(1e-12) for a, b in zip(s, t)) / len(s)
    if loss == "cosine":
        return sum((1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean() for a, b in zip(s, t)) / len(s)
    raise ConfigError(f"loss must be 'mse' or 'cosine', got {loss!r}")


def _split(batch, arity):
    from ..api import split_batch

    return split_batch(batch, arity)


def distill(
    model: torch.nn.Module,
    float_model: torch.nn.Module,
    data: Iterable,
    steps: int | None = None,
    *,
    loss: str | None = None,
    lr: float | None = None,
    scale_lr: float | None = None,
    heldout: Sequence | None = None,
    config: QATConfig | dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    time_budget_s: float | None = None,
    eval_every: int | None = None,
) -> DistillReport:
    """Fine-tune the QAT-prepared `model` so its outputs follow `float_model`'s (a float copy
    taken before `torchq.prepare`) on the batches of `data`, cycled for `steps` steps.

    `heldout`: batches the check runs on (default: the last fifth of `data`, which must then be
    a sequence, held out of training). Defaults for steps, loss ("mse" relative to the output's
    power, or "cosine"), lr (Adam) come from `config` (or the QATConfig the model was prepared
    with). Returns the report; the model ends in the best state measured on `heldout`.
    """
    state = qat_state(model)
    cfg = make_qat_config(config) if config is not None else getattr(state, "config", QATConfig())
    steps = cfg.steps if steps is None else steps
    loss = loss or cfg.distillation or "mse"
    lr = cfg.lr if lr is None else lr
    if heldout is None:
        if not isinstance(data, Sequence) or len(data) < 2:
            raise ConfigError("distill needs held-back batches: pass heldout=..., or data as a sequence of at least 2 batches (its last fifth is held back)")
        n_held = max(1, len(data) // 5)
        data, heldout = list(data)[:-n_held], list(data)[-n_held:]
    if not heldout:
        raise ConfigError("heldout is empty")
    from ..api import positional_arity

    arity = positional_arity(model)
    float_model = float_model.eval()
    targets = _targets(float_model, heldout, arity)

    def measure() -> float:
        with torch.no_grad():
            return float(sum(distance(model(*a, **k), t, loss) for (a, k), t in zip((_split(b, arity) for b in heldout), targets)) / len(heldout))

    was_training = model.training
    model.eval()  # dropout off; BatchNorm runs on its running statistics in QAT either way
    scales = {id(p) for p in state.scale_parameters()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in scales]
    opt = optimizer or torch.optim.Adam([{"params": weights, "lr": lr}, {"params": state.scale_parameters(), "lr": scale_lr or cfg.scale_lr}])
    t0 = time.perf_counter()
    best = start = measure()
    best_step, history = 0, [(0, start)]
    best_state = copy.deepcopy(model.state_dict())
    step = 0
    try:
        teacher = _Teacher(float_model)
        for index, batch in itertools.cycle(enumerate(data)) if steps else ():
            if step >= steps or (time_budget_s is not None and time.perf_counter() - t0 > time_budget_s):
                break
            args, kwargs = _split(batch, arity)
            target = teacher(index, args, kwargs)
            opt.zero_grad(set_to_none=True)
            distance(model(*args, **kwargs), target, loss).backward()
            opt.step()
            step += 1
            if step % (eval_every or cfg.eval_every) == 0 or step == steps:
                d = measure()
                history.append((step, d))
                if d < best:
                    best, best_step, best_state = d, step, copy.deepcopy(model.state_dict())
    finally:
        model.load_state_dict(best_state)
        model.train(was_training)
    return DistillReport(start, best, best_step, step, time.perf_counter() - t0, history)


def _targets(float_model, batches, arity) -> list:
    with torch.no_grad():
        return [float_model(*a, **k) for a, k in (_split(b, arity) for b in batches)]


class _Teacher:
    """The float model's outputs per batch, kept after the first pass over the data (up to
    TEACHER_CACHE_BYTES of them): later passes cost the student's forward only."""

    def __init__(self, float_model):
        self.model = float_model
        self.cache: dict[int, object] = {}
        self.bytes = 0

    def __call__(self, index: int, args, kwargs):
        if index in self.cache:
            return self.cache[index]
        with torch.no_grad():
            out = self.model(*args, **kwargs)
        size = sum(t.numel() * t.element_size() for t in output_tensors(out))
        if self.bytes + size <= TEACHER_CACHE_BYTES:
            self.cache[index] = out
            self.bytes += size
        return out


TEACHER_CACHE_BYTES = 256 * 2**20
