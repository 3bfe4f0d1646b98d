"""A target NPU, described by data: which ops run in int8 and within which limits.

Descriptions live in npu/targets/<name>.yaml (or any YAML path). Each op may list limits:

    {attr: NAME, max: N}          every value of the attribute <= N (ints or lists of ints)
    {attr: NAME, in: [...]}       the attribute's value is one of these (negative axes normalized)
    {input: axes, in: [...]}      same, for a constant input named by its role (Slice axes)
    {input_dim: K, max: N}        dimension K of input 0 <= N when it is static
    rank: R                       the limit applies only when input 0 has rank R
    why: "..."                    the reason printed when the limit fails

`Target.supports(node)` answers (runs on the NPU?, why not) for the planner and the checker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from onnx_backend.errors import ConfigError

TARGETS_DIR = Path(__file__).parent / "targets"

# ONNX defaults for the attributes limits talk about
_DEFAULTS: dict[tuple[str, str], Any] = {
    ("Conv", "group"): 1,
    ("Conv", "dilations"): [1],
    ("ConvTranspose", "group"): 1,
    ("Concat", "axis"): None,
    ("Resize", "mode"): "nearest",
    ("Pad", "mode"): "constant",
    ("DepthToSpace", "mode"): "DCR",
    ("LpNormalization", "p"): 2,
    ("Softmax", "axis"): -1,
}
# inputs that limits may name, by op: (input index)
_NAMED_INPUTS = {("Slice", "axes"): 3}


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attr: str | None = None
    input: str | None = None
    input_dim: int | None = None
    max: float | None = None
    min: float | None = None
    values: list[Any] | None = None
    rank: int | None = None
    why: str | None = None

    def __init__(self, **data):
        if "in" in data:
            data["values"] = data.pop("in")
        super().__init__(**data)


class OpSupport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limits: list[Limit] = []
    note: str | None = None


class TargetDescription(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    tensor: dict[str, str] = {}
    layout: str = ""
    ops: dict[str, OpSupport]
    fusions: list[list[str]] = []


def _as_list(v) -> list:
    if isinstance(v, (list, tuple, np.ndarray)):
        return list(np.asarray(v).ravel().tolist())
    return [v]


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class Target:
    description: TargetDescription
    fusions: set[tuple[str, str]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.description.name

    def __post_init__(self):
        self.fusions = {tuple(f) for f in self.description.fusions if len(f) == 2}

    def supports(self, node: ir.Node) -> tuple[bool, str]:
        """(True, "") if the node runs on the NPU, else (False, why)."""
        op = self.description.ops.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if op is None:
            return False, f"{node.op_type} is not supported by {self.name}"
        for limit in op.limits:
            ok, why = self._check(node, limit)
            if not ok:
                return False, why
        return True, ""

    def _rank(self, node: ir.Node) -> int | None:
        x = node.inputs[0] if node.inputs else None
        return x.shape.rank() if x is not None and x.shape is not None else None

    def _check(self, node: ir.Node, limit: Limit) -> tuple[bool, str]:
        rank = self._rank(node)
        if limit.rank is not None and rank != limit.rank:
            return True, ""
        label = limit.attr or limit.input or f"input dim {limit.input_dim}"
        if limit.input_dim is not None:
            x = node.inputs[0]
            dim = x.shape[limit.input_dim] if x is not None and x.shape is not None and x.shape.rank() > limit.input_dim else None
            values = [dim] if isinstance(dim, int) else []  # a dynamic dimension cannot be checked
        elif limit.input is not None:
            idx = _NAMED_INPUTS.get((node.op_type, limit.input))
            v = node.inputs[idx] if idx is not None and idx < len(node.inputs) else None
            t = ir.convenience.get_const_tensor(v) if v is not None else None
            values = _as_list(t.numpy()) if t is not None else []
        else:
            attr = node.attributes.get(limit.attr)
            value = attr.value if attr is not None else _DEFAULTS.get((node.op_type, limit.attr))
            if value is None:
                return True, ""
            values = [_decode(v) for v in _as_list(value)]
        if limit.attr in ("axis",) or limit.input == "axes":
            values = [v + rank if isinstance(v, int) and v < 0 and rank else v for v in values]
        why = limit.why or f"{node.op_type} {label} out of range"
        for v in values:
            if limit.max is not None and v > limit.max:
                return False, f"{why} (got {v})"
            if limit.min is not None and v < limit.min:
                return False, f"{why} (got {v})"
            if limit.values is not None and v not in limit.values:
                return False, f"{why} (got {v}; allowed {limit.values})"
        return True, ""


@lru_cache(maxsize=None)
def _load(path: str) -> Target:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
        return Target(TargetDescription(**data))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot read target description: {exc}") from None
    except (ValidationError, TypeError) as exc:
        raise ConfigError(f"{p}: invalid target description: {exc}") from None


def available_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))


def load_target(name_or_path: str | Target) -> Target:
    """A bundled target by name ('warboy', 'tflite') or a description file path."""
    if isinstance(name_or_path, Target):
        return name_or_path
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return _load(str(p.resolve()))
    bundled = TARGETS_DIR / f"{name_or_path}.yaml"
    if not bundled.is_file():
        raise ConfigError(f"unknown target {name_or_path!r}; available: {', '.join(available_targets())} (or a path to a .yaml description)")
    return _load(str(bundled))
