"""The NPU target: its rules (declarative descriptions), a compatibility check, an integer-only
reference execution, and a per-tensor comparison of that execution with onnxruntime."""

from .check import CheckReport, check
from .compare import CompareReport, compare
from .simulate import SimulationError, Simulator, simulate
from .target import Target, available_targets, load_target

__all__ = [
    "CheckReport",
    "CompareReport",
    "SimulationError",
    "Simulator",
    "Target",
    "available_targets",
    "check",
    "compare",
    "load_target",
    "simulate",
]
