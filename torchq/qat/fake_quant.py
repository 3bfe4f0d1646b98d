"""Fake quantization with the arithmetic of ONNX QuantizeLinear -> DequantizeLinear.

    q = saturate(round_half_to_even(x / scale) + zero_point),  out = (q - zero_point) * scale

in float32, as onnxruntime computes it, so the fake-quantized forward is the exported model's.
Gradients: straight-through for x inside the range (zero where it saturates); for the scale the
LSQ gradient (Esser et al. 2020): round(x/s) - x/s inside the range, the saturated code outside,
times a factor (1 / sqrt(numel x qmax) by default) that keeps the scale's step size in proportion
to the tensor's.
"""

from __future__ import annotations

import math

import torch


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float):
        xs = x / scale
        rounded = torch.round(xs) + zero_point
        q = torch.clamp(rounded, qmin, qmax)
        inside = rounded == q  # not saturated (NaN compares unequal: no gradient)
        ctx.save_for_backward(xs, q, inside, zero_point)
        ctx.scale_shape = scale.shape
        ctx.grad_factor = grad_factor
        ctx.scale_needs_grad = ctx.needs_input_grad[1]
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        xs, q, inside, zero_point = ctx.saved_tensors
        grad_x = grad * inside
        grad_scale = None
        if ctx.scale_needs_grad:
            code = (q - zero_point) - torch.where(inside, xs, torch.zeros_like(xs))
            grad_scale = (grad * code).sum_to_size(ctx.scale_shape) * ctx.grad_factor
        return grad_x, grad_scale, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int, *, per_channel_numel: int | None = None) -> torch.Tensor:
    """Quantize-dequantize `x`; `scale` (and `zero_point`) broadcast against it (per channel when
    shaped so). `per_channel_numel`: elements sharing one scale (default: all of x / scale's)."""
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    scale = scale.to(x.dtype)
    n = per_channel_numel if per_channel_numel is not None else max(1, x.numel() // max(1, scale.numel()))
    factor = 1.0 / math.sqrt(n * max(abs(qmin), qmax))
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, factor)


def channel_shape(ndim: int, axis: int | None) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel vector along `axis` of an ndim tensor."""
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)
