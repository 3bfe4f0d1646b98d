"""The fake-quantized forward: learnable scales as Parameters, applied through the capture mode.

`QATState` is registered as a submodule of the user's model (`torchq_qat`) so that its scales
are in `model.parameters()` (the user's optimizer trains them, DDP keeps them in sync) and in
`model.state_dict()` (checkpoints carry them). It never runs a forward of its own: the prepared
model's capture mode calls `before` with each op's inputs (weights, biases, requantized Concat
inputs, constants, BatchNorm frozen to its running statistics) and `after` with each result (the
activation fake-quantizers), so the user's `forward` is untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from onnx_backend.qmath import INT32_MAX, MIN_SCALE, QType

from ..capture import op_name
from .binding import Binding, _bn_factor, channel_axis_shape
from .fake_quant import channel_shape, fake_quantize

QMIN, QMAX = QType.INT8.qmin, QType.INT8.qmax
WMIN, WMAX = QType.INT8_NARROW.qmin, QType.INT8_NARROW.qmax
BATCH_NORM = "batch_norm"


class QATState(nn.Module):
    def __init__(self, binding: Binding, model: nn.Module, ops_of_keys: dict[str, str], *, learn_ranges: bool, learn_weight_scales: bool):
        super().__init__()
        self.binding = binding
        self._model = [model]  # not a submodule: the model owns this module, not the reverse
        # A grid no op applies (a tensor inside one PyTorch op) gets no gradient: not trained, so
        # that DDP does not wait for one.
        used = set(binding.activation_of_key.values()) | {a for edges in binding.requantize.values() for _, a in edges}
        # log scales: an optimizer step moves a scale by a share of itself, whatever its size
        self.activation_log_scale = nn.ParameterList(
            [nn.Parameter(torch.tensor(a.scale, dtype=torch.float32).log(), requires_grad=learn_ranges and a.learnable and i in used) for i, a in enumerate(binding.activations)]
        )
        self.weight_keys = sorted(binding.weights)
        self.weight_log_scale = nn.ParameterList(
            [nn.Parameter(torch.as_tensor(binding.weights[k].scale, dtype=torch.float32).log(), requires_grad=learn_weight_scales) for k in self.weight_keys]
        )
        self._weight_index = {k: i for i, k in enumerate(self.weight_keys)}
        keys = set(binding.weights) | set(binding.constants) | set(binding.requantize)
        self.ops = {ops_of_keys[k] for k in keys} | {BATCH_NORM}
        self.enabled = True

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    # ---- scales ------------------------------------------------------------------------------

    def activation_params(self, i: int) -> tuple[torch.Tensor, int]:
        a = self.binding.activations[i]
        s = self.activation_log_scale[i].exp().clamp(min=MIN_SCALE)
        if a.hi_cap is not None:  # an absorbed Clip(0, c): the planner clamps the range to c
            s = s.clamp(max=a.hi_cap / (QMAX - a.zero_point))
        return s, a.zero_point

    def weight_scale(self, key: str) -> torch.Tensor:
        return self.weight_log_scale[self._weight_index[key]].exp().clamp(min=MIN_SCALE)

    def scale_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def activation_range(self, i: int) -> tuple[float, float]:
        """The real interval of activation grid i, as the exported model's range."""
        s, z = self.activation_params(i)
        s = float(s.detach())
        return (QMIN - z) * s, (QMAX - z) * s

    # ---- the capture mode's hooks ------------------------------------------------------------

    def after(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        i = self.binding.activation_of_key.get(key)
        if i is None or not self.enabled:
            return tensor
        s, z = self.activation_params(i)
        return fake_quantize(tensor, s, z, QMIN, QMAX)

    def before(self, session, func, args, kwargs):
        name = op_name(func)
        if name not in self.ops or not self.enabled:
            return args, kwargs
        args, kwargs = list(args), dict(kwargs)
        if name == BATCH_NORM and _get_arg(args, kwargs, 1, "running_mean") is not None:
            _set_arg(args, kwargs, 5, "training", False)  # the exported model folds BatchNorm with its running statistics
        key = session.peek_key(func)
        w = self.binding.weights.get(key)
        if w is not None:
            self._quantize_weight(w, args, kwargs)
        for c in self.binding.constants.get(key, []):
            value = _get_arg(args, kwargs, c.position, c.position)
            _set_arg(args, kwargs, c.position, c.position, fake_quantize(value, torch.tensor(c.activation.scale, device=value.device), c.activation.zero_point, QMIN, QMAX))
        for index, act in self.binding.requantize.get(key, []):
            s, z = self.activation_params(act)
            if name == "cat":
                parts = list(args[0])
                parts[index] = fake_quantize(parts[index], s, z, QMIN, QMAX)
                args[0] = parts
            else:
                args[index] = fake_quantize(args[index], s, z, QMIN, QMAX)
        return tuple(args), kwargs

    def _quantize_weight(self, w, args, kwargs) -> None:
        weight = _get_arg(args, kwargs, w.position, "weight")
        bias = _get_arg(args, kwargs, 2, "bias") if w.has_bias else None
        scale = self.weight_scale(w.key)
        shape = channel_shape(weight.dim(), w.axis)
        if w.fold is not None:
            bn = self.model.get_submodule(w.fold)
            k = _bn_factor(bn).reshape(channel_axis_shape(weight.dim(), w.out_axis))
            k_flat = k.reshape(-1)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(k_flat)
            folded_w = weight * k
            folded_b = ((bias if bias is not None else torch.zeros_like(k_flat)) - bn.running_mean) * k_flat + beta
        else:
            folded_w, folded_b = weight, bias
        s_in = None
        if folded_b is not None and w.input_activation is not None:
            s_in = self.activation_params(w.input_activation)[0].detach()
            scale = torch.maximum(scale, folded_b.detach().abs() / (s_in * INT32_MAX) * (1 + 1e-6))  # the int32 bias stays in range
        channel = scale.reshape(shape) if shape else scale.reshape(())
        q_w = fake_quantize(folded_w, channel, 0.0, WMIN, WMAX, per_channel_numel=max(1, folded_w.numel() // max(1, scale.numel())))
        q_b = folded_b
        if folded_b is not None and s_in is not None:
            q_b = fake_quantize(folded_b, (s_in * scale.detach()).reshape(-1) if shape else s_in * scale.detach(), 0.0, -INT32_MAX, INT32_MAX)
        if w.fold is not None:  # undo the folding; the (frozen) BatchNorm after the op redoes it
            safe = torch.where(k != 0, k, torch.ones_like(k))
            q_w = torch.where(k != 0, q_w / safe, weight)
            safe_flat = safe.reshape(-1)
            q_b = torch.where(k_flat != 0, (q_b - beta) / safe_flat + bn.running_mean, bias if bias is not None else torch.zeros_like(k_flat))
        _set_arg(args, kwargs, w.position, "weight", q_w)
        if q_b is not None:
            _set_arg(args, kwargs, 2, "bias", q_b)


def _get_arg(args: list, kwargs: dict, position, name):
    if isinstance(position, int) and position < len(args):
        return args[position]
    return kwargs.get(name if isinstance(position, int) else position)


def _set_arg(args: list, kwargs: dict, position, name, value) -> None:
    if isinstance(position, int) and position < len(args):
        args[position] = value
    elif isinstance(position, int) and position == len(args) and name not in kwargs:
        args.append(value)
    else:
        kwargs[name if isinstance(position, int) else position] = value
