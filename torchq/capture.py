"""Seeing every tensor a model computes, through hooks and a TorchFunctionMode only.

`prepare` registers a forward pre-hook and an always-called forward hook on every submodule;
nothing else of the user's model changes. While a prepared module runs, a TorchFunctionMode sees
each torch function call (F.conv2d inside nn.Conv2d, but also `x + y`, torch.cat, x.view,
softmax, attention matmuls, ...). Each float tensor result gets a stable key:

    <module path>:<op>[#n][@call]     e.g. "layer1.0.conv1:conv2d", "layer1.0:add#1"

(n counts the op within one call of the module, call counts calls of the module within one
forward of the model). During calibration the result is folded into that key's Observer; during
export it passes through a `torchq::Mark(key)` identity so the ONNX backend can bind the
statistics to the exact ONNX tensor.
"""

from __future__ import annotations

import contextlib
import enum
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from onnx_backend.errors import CalibrationError
from onnx_backend.statistics import NonFiniteError

from .observer import Observer

INPUT_PATH = "<input>"
ROOT_PATH = "<model>"


class Phase(enum.Enum):
    OBSERVE = "observe"
    EXPORT = "export"
    PAUSED = "paused"
    QAT = "qat"  # quantization-aware training: session.qat rewrites op inputs and results


def op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_") or name


def _sdpa_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention in plain ops, so its matmuls and softmax are observed."""
    d = query.size(-1)
    scale = 1.0 / (d**0.5) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        L, S = query.size(-2), key.size(-2)
        mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # -inf where masked, except in rows masked entirely (the padded queries of left-padded
        # batches): there 0, a uniform softmax, as eager attention with finfo.min masks gives,
        # where -inf everywhere would be NaN (SDPA itself returns zeros for such rows). Only the
        # outputs at those padded positions differ from SDPA's.
        fill = torch.where(attn_mask.any(-1, keepdim=True), float("-inf"), 0.0).to(scores.dtype)
        scores = torch.where(attn_mask, scores, fill)
    elif attn_mask is not None:
        scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value)


def _mha_reference(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True, is_causal=False):
    """F.multi_head_attention_forward for the common inference case, in plain ops.

    Inputs are (L, N, E) as nn.MultiheadAttention passes them. Cases outside this subset
    (bias_k/bias_v, add_zero_attn, static k/v, attention weights requested) return None and
    the original runs as one opaque op.
    """
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None or need_weights or query.dim() != 3:
        return None
    L, N, E = query.shape
    S = key.shape[0]
    head = E // num_heads
    if use_separate_proj_weight:
        bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, q_proj_weight, bq), F.linear(key, k_proj_weight, bk), F.linear(value, v_proj_weight, bv)
    elif query is key and key is value:
        q, k, v = F.linear(query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
        bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    q = q.reshape(L, N * num_heads, head).transpose(0, 1).reshape(N, num_heads, L, head)
    k = k.reshape(S, N * num_heads, head).transpose(0, 1).reshape(N, num_heads, S, head)
    v = v.reshape(S, N * num_heads, head).transpose(0, 1).reshape(N, num_heads, S, head)
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(N, num_heads, L, S)
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(N, 1, 1, S)
        kpm = torch.zeros_like(kpm, dtype=q.dtype).masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else kpm.to(q.dtype)
        if mask is None:
            mask = kpm
        else:
            mask = (torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask) + kpm
    y = _sdpa_reference(q, k, v, mask, dropout_p if training else 0.0, is_causal and mask is None)
    y = y.permute(2, 0, 1, 3).reshape(L * N, E)
    y = F.linear(y, out_proj_weight, out_proj_bias).view(L, N, E)
    return y, None


def _silu_reference(input, inplace=False):
    """silu(x) = x * sigmoid(x), as the exporters write it: the Sigmoid's output is a tensor of
    the exported graph (quantized on the spec's fixed grid), so it is seen as one here too. The
    product is silu's own result (recorded under the silu key, see RECORDED)."""
    s = torch.sigmoid(input)
    with torch._C.DisableTorchFunction():
        return input * s


# Composite functions replaced by plain-op equivalents run with the mode active, so the ops
# inside them are seen one by one (a replacement returning None means: run the original).
TRANSPARENT: dict[Callable, Callable] = {
    F.scaled_dot_product_attention: _sdpa_reference,
    F.multi_head_attention_forward: _mha_reference,
    F.silu: _silu_reference,
}
RECORDED = {F.silu}  # replacements whose result is the op's own tensor, recorded under its key


class CaptureSession:
    """Calibration state of one prepared model."""

    def __init__(self, model: torch.nn.Module, max_bins: int):
        self.model = model
        self.max_bins = max_bins
        self.phase = Phase.OBSERVE
        self.observers: dict[str, Observer] = {}
        self.module_paths = {id(m): name for name, m in model.named_modules()}
        self.handles: list = []
        self.stack: list[str] = []
        self.op_counts: list[defaultdict] = []
        self.call_counts: defaultdict = defaultdict(int)
        self.batches = 0
        self.mismatched: set[str] = set()
        self.marker: Callable[[torch.Tensor, str], torch.Tensor] | None = None
        self.qat = None  # torchq.qat's hooks: before(key, func, args, kwargs) and after(key, tensor)
        self._mode: _Mode | None = None
        self._fastpath_was: bool | None = None

    # ---- hooks -------------------------------------------------------------------------------------

    def attach(self) -> None:
        for module in self.model.modules():
            self.handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post_hook, always_call=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._leave_model()

    def _pre_hook(self, module, args, kwargs):
        if self.phase is Phase.PAUSED:
            return None
        path = self.module_paths.get(id(module), "?") or ROOT_PATH
        if module is self.model and self.stack:
            self.abort_forward()  # a KeyboardInterrupt ended the last forward before its hooks ran
        entering = not self.stack
        if entering:
            self._enter_model()
        call = self.call_counts[path]
        self.call_counts[path] += 1
        self.stack.append(path if call == 0 else f"{path}@{call}")
        self.op_counts.append(defaultdict(int))
        if entering:
            return self._handle_inputs(args, kwargs)
        return None

    def _post_hook(self, module, args, output):
        if self.phase is Phase.PAUSED or not self.stack:
            return None
        self.stack.pop()
        self.op_counts.pop()
        if not self.stack:
            self._leave_model()
            if self.phase is Phase.OBSERVE:
                self.batches += 1
        return None

    def abort_forward(self) -> None:
        """Leave a forward pass that ended without its hooks: PyTorch runs always_call hooks
        on an Exception only, so a KeyboardInterrupt would leave the capture mode active."""
        self._leave_model()

    def _enter_model(self) -> None:
        self.call_counts.clear()
        self._fastpath_was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused path would hide the ops inside
        self._mode = _Mode(self)
        self._mode.__enter__()

    def _leave_model(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        if self._fastpath_was is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath_was)
            self._fastpath_was = None
        self.stack.clear()
        self.op_counts.clear()

    def _handle_inputs(self, args, kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        names = [str(i) for i in range(len(pytree.tree_leaves(args)))] + [
            f"{k}{'' if len(pytree.tree_leaves(v)) == 1 else '.' + str(j)}" for k, v in kwargs.items() for j in range(len(pytree.tree_leaves(v)))
        ]
        changed = False
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                new = self.record(f"{INPUT_PATH}:{names[i] if i < len(names) else i}", leaf)
                changed |= new is not leaf
                leaves[i] = new
        if not changed:
            return None
        return pytree.tree_unflatten(leaves, spec)

    # ---- ops ---------------------------------------------------------------------------------------

    def key_for(self, func: Callable) -> str:
        path = self.stack[-1] if self.stack else ROOT_PATH
        name = op_name(func)
        counts = self.op_counts[-1] if self.op_counts else defaultdict(int)
        n = counts[name]
        counts[name] += 1
        base, _, call = path.partition("@")
        return f"{base}:{name}{'#' + str(n) if n else ''}{'@' + call if call else ''}"

    def peek_key(self, func: Callable) -> str:
        """The key `key_for` will give the next result of `func`, without counting it."""
        path = self.stack[-1] if self.stack else ROOT_PATH
        name = op_name(func)
        n = self.op_counts[-1][name] if self.op_counts else 0
        base, _, call = path.partition("@")
        return f"{base}:{name}{'#' + str(n) if n else ''}{'@' + call if call else ''}"

    def before_op(self, func: Callable, args, kwargs):
        if self.phase is not Phase.QAT or self.qat is None or _is_metadata(func):
            return args, kwargs
        with torch._C.DisableTorchFunction():
            return self.qat.before(self, func, args, kwargs)

    def on_result(self, func: Callable, out):
        if isinstance(out, torch.Tensor):
            if out.is_floating_point():
                return self.record(self.key_for(func), out)
            return out
        if isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) and o.is_floating_point() for o in out):
            key = self.key_for(func)
            marked = [self.record(f"{key}.{i}", o) if isinstance(o, torch.Tensor) and o.is_floating_point() else o for i, o in enumerate(out)]
            if type(out) in (tuple, list):
                return type(out)(marked)
            try:  # namedtuples (torch.max with dim, ...)
                return type(out)(*marked)
            except TypeError:
                return out
        return out

    def record(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        # Our own tensor ops (statistics, markers) must not be seen as the model's.
        with torch._C.DisableTorchFunction():
            return self._record(key, tensor)

    def _record(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.phase is Phase.QAT:
            return tensor if self.qat is None else self.qat.after(key, tensor)
        if self.phase is Phase.EXPORT:
            obs = self.observers.get(key)
            if obs is not None and obs.ndim is not None and obs.ndim != tensor.dim():
                self.mismatched.add(key)  # calibration and export took different code paths
            return self.marker(tensor, key) if self.marker is not None else tensor
        obs = self.observers.get(key)
        if obs is None:
            obs = self.observers[key] = Observer(key, self.max_bins)
        try:
            obs.update(tensor)
        except NonFiniteError:
            raise CalibrationError(f"NaN in tensor {key!r} (module {key.rsplit(':', 1)[0]!r}) on calibration batch {self.batches}") from None
        return tensor

    @contextlib.contextmanager
    def phase_as(self, phase: Phase):
        before = self.phase
        self.phase = phase
        try:
            yield
        finally:
            self.phase = before


class _Mode(TorchFunctionMode):
    def __init__(self, session: CaptureSession):
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.session.phase is Phase.PAUSED:
            return func(*args, **kwargs)
        replacement = TRANSPARENT.get(func)
        if replacement is not None:
            with self:  # re-enter: the ops inside are seen individually
                out = replacement(*args, **kwargs)
            if out is not None:
                return self.session.on_result(func, out) if func in RECORDED else out
        args, kwargs = self.session.before_op(func, args, kwargs)
        out = func(*args, **kwargs)
        if _is_metadata(func):
            return out
        return self.session.on_result(func, out)


_METADATA = {"size", "dim", "numel", "shape", "dtype", "device", "is_floating_point", "__get__", "__len__", "item", "tolist", "requires_grad_", "stride", "data_ptr", "element_size", "__repr__", "__format__", "__bool__", "__index__", "__int__", "__float__"}


def _is_metadata(func) -> bool:
    return getattr(func, "__name__", "") in _METADATA
