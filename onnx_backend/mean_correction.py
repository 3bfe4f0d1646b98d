"""Analytic bias correction of the mean shift that weight rounding causes (Nagel et al. 2019,
"Data-Free Quantization", section 4.2, with the input means measured on the calibration data).

Rounding a layer's weights W to W_q shifts the expected value of its output by
(W_q - W) E[x] per output channel. On natural images a depthwise kernel's output is mostly its
kernel sum times the local mean of its input, so rounding the kernel sum moves the whole output
channel; errors of this kind add up layer after layer. E[x], the per-input-channel mean of the
layer's input, comes with the calibration statistics (statistics.ChannelSums: no extra pass over
the data), and the shift is subtracted from the bias before the bias is rounded to int32.

What this ignores, all second order: zero padding (border outputs see fewer than all kernel
taps of a Conv, so their shift is smaller), the input's own quantization (E[x_q] for E[x]) and
every interaction with other layers' errors. The empirical bias correction
(techniques/bias_correction.py) measures all of that on the quantized model, at the cost of a
pass over the calibration data per depth of the network; it starts from this correction.

Layers handled: Conv (grouped and depthwise included), Gemm (transB either way, transA = 0) and
MatMul with a constant 2-D weight followed by a bias Add. A layer without a bias has nowhere to
put the correction and is left as it is; so is ConvTranspose (its taps reach each output pixel
in a stride-dependent pattern).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .statistics import ChannelSums


@dataclass(frozen=True)
class MeanCorrection:
    """How to correct one layer's bias: the layer, its weight input, and its input's means."""

    node: str  # the weighted node
    op_type: str
    attributes: Mapping[str, object]
    weight_index: int
    input_mean: np.ndarray  # per input channel, float64


def input_channel_axis(op_type: str, attributes: Mapping[str, object]) -> int | None:
    """The axis of the layer's activation input (input 0) whose channels the weight reads, or
    None for a layer this correction does not handle."""
    if op_type == "Conv":
        return 1
    if op_type == "Gemm":
        return None if attributes.get("transA", 0) else 1
    if op_type == "MatMul":
        return -1
    return None


def correction_for(node_name: str, op_type: str, attributes: Mapping[str, object], weight_index: int, sums: ChannelSums | None) -> MeanCorrection | None:
    """The correction of a layer whose input has per-channel sums `sums`, if it can have one."""
    axis = input_channel_axis(op_type, attributes)
    mean = sums.mean(axis) if sums is not None and axis is not None else None
    if mean is None or not np.all(np.isfinite(mean)):
        return None
    return MeanCorrection(node_name, op_type, dict(attributes), weight_index, mean)


def output_shift(correction: MeanCorrection, delta_w: np.ndarray) -> np.ndarray | None:
    """Per output channel, the change of the layer's expected output (in the bias's units) that
    changing its weight by `delta_w` causes; None if the shapes do not fit the layer."""
    mean, attrs = correction.input_mean, correction.attributes
    if correction.op_type == "Conv":
        groups = int(attrs.get("group", 1))
        n_out, per_group = delta_w.shape[0], delta_w.shape[1]
        if mean.size != per_group * groups or n_out % groups:
            return None
        kernel_sums = delta_w.reshape(n_out, per_group, -1).sum(axis=2, dtype=np.float64)  # [O, C/g]
        group_of = np.arange(n_out) // (n_out // groups)
        return np.einsum("oc,oc->o", kernel_sums, mean.reshape(groups, per_group)[group_of])
    if correction.op_type in ("Gemm", "MatMul") and delta_w.ndim == 2:
        b = delta_w.T if correction.op_type == "Gemm" and attrs.get("transB", 0) else delta_w  # [K, N]
        if mean.size != b.shape[0]:
            return None
        shift = mean @ b.astype(np.float64)
        if correction.op_type == "Gemm":
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            if beta == 0.0:
                return None
            shift *= alpha / beta  # Y = alpha A B + beta C: C absorbs the shift of alpha A B
        return shift
    return None


def corrected_bias(correction: MeanCorrection, bias: np.ndarray, weight: np.ndarray, rounded_weight: np.ndarray) -> np.ndarray:
    """The bias with the weight rounding's mean shift taken out (unchanged where it cannot be)."""
    shift = output_shift(correction, rounded_weight.astype(np.float64) - weight.astype(np.float64))
    if shift is None or shift.shape != bias.shape:
        return bias
    return (bias.astype(np.float64) - shift).astype(np.float32)
