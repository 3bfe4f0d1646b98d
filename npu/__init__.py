"""The NPU target: its rules (declarative descriptions), a compatibility check, an integer-only
reference execution."""

from .target import Target, available_targets, load_target

__all__ = ["Target", "available_targets", "load_target"]
