"""YAML recipes: one file describes one quantization job, validated before anything runs.

    recipe = torchq.Recipe.load("recipes/digits.yaml", overrides=["quantization.method=entropy"])
    result = recipe.run()

A recipe names Python code it runs: `model.factory`, `calibration.loader` and
`evaluation.function` are explicit `package.module:attribute` import paths, imported and called
as written (treat a recipe like a script: run only recipes you trust). Nothing else executes:
files are parsed with `yaml.safe_load`, and checkpoints are read with
`torch.load(weights_only=True)`.

Composition: `extends: base.yaml` (or a list of files) loads those first, relative to the file
that names them, and deep-merges this file over them (mappings merge key by key; lists and
scalars replace). Paths a recipe reads (`model.checkpoint`, a `target` .yaml) are relative to the
file that sets them; paths it writes (`export.path`) are relative to the working directory.

Every error names the file (and line) that set the offending key, the key path, and the allowed
values or keys; nothing falls back to a default silently. The full reference is
docs/INTERFACES.md.
"""

from __future__ import annotations

import importlib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from onnx_backend.errors import ConfigError

from .config import DEFAULT_OPSET, Opset, QuantConfig, QuantizationSettings

# Limits on what a recipe file may be: recipes are small; anything beyond these is a mistake or
# an attack (deeply nested or alias-bomb YAML).
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_EXTENDS = 16

_IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class RecipeError(ConfigError):
    """A recipe is invalid, or code it names failed (exit code 2 from the CLI)."""


def _import_path(value: str) -> str:
    if not _IMPORT_PATH.match(value):
        raise ValueError(f"must be an import path 'package.module:attribute', got {value!r}")
    return value


ImportPath = Annotated[str, AfterValidator(_import_path)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """The float model: `factory(**kwargs)` returns a torch.nn.Module."""

    factory: ImportPath
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None  # a state_dict file, loaded with torch.load(weights_only=True)
    checkpoint_key: str | None = None  # e.g. "state_dict" for a Lightning checkpoint
    strip_prefix: str = ""  # removed from state_dict keys, e.g. "model." for a Lightning checkpoint
    strict: bool = True  # load_state_dict(strict=...)


class CalibrationSection(_Section):
    """Calibration data: `loader(**kwargs)` returns an iterable of batches (a DataLoader...)."""

    loader: ImportPath
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_batches: int | None = Field(default=None, ge=1)  # None: every batch the loader yields
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        import torch

        try:
            torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(f"not a torch device: {v!r} (e.g. cpu, cuda, cuda:1, mps)") from None
        return v


# The recipe's `quantization` section is QuantConfig's own field set (all but opset and target),
# so a field added there is a recipe key with the same type and default.
QuantizationSection = QuantizationSettings


class ExportSection(_Section):
    path: str | None = None  # the INT8 ONNX file; `torchq quantize -o` overrides it
    float_path: str | None = None  # also write the float ONNX (same export, same tensor names), e.g. for `torchq report`
    opset: Opset = DEFAULT_OPSET
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    dynamic_axes: dict[str, dict[int, str]] | None = None
    example_batch_size: int | None = Field(default=None, ge=1)  # None: the whole first calibration batch
    report: bool = True  # write <model>.report.json and .md next to the model


class EvaluationSection(_Section):
    """`function(model, **kwargs)` returns one number; it is called with the float torch module
    and with the path (str) of the INT8 ONNX file."""

    function: ImportPath
    kwargs: dict[str, Any] = Field(default_factory=dict)
    metric: str = "metric"
    higher_is_better: bool = True


class QATSection(_Section):
    """Quantization-aware fine-tuning after calibration (torchq.qat): distillation to the float
    model on `loader(**kwargs)` batches (default: the calibration batches), QATConfig's fields."""

    steps: int = Field(default=200, ge=0)
    lr: float = Field(default=1e-5, gt=0)
    scale_lr: float = Field(default=1e-3, gt=0)
    learn_ranges: bool = True
    learn_weight_scales: bool = True
    distillation: Literal["mse", "cosine"] = "mse"
    eval_every: int = Field(default=25, ge=1)
    loader: ImportPath | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_batches: int | None = Field(default=None, ge=2)  # fine-tuning batches kept (None: all); the last fifth is held back


class RecipeSpec(_Section):
    name: str | None = None
    description: str | None = None
    model: ModelSection | None = None
    calibration: CalibrationSection | None = None
    quantization: QuantizationSection = QuantizationSection()
    target: str | None = "warboy"
    export: ExportSection = ExportSection()
    evaluation: EvaluationSection | None = None
    qat: QATSection | None = None

    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str | None) -> str | None:
        from npu.target import available_targets

        if v is None or v in available_targets() or (v.endswith((".yaml", ".yml")) and Path(v).is_file()):
            return v
        raise ValueError(f"unknown target {v!r}; allowed: {', '.join(available_targets())}, null (every op in int8), or a path to a target .yaml")


# ---- reading files -----------------------------------------------------------------------------

Origins = dict[tuple, str]  # key path -> "file:line" (or "--set key=value") that set it


def _where(path: Path) -> str:
    """A path as short as it is clear: relative below the working directory, else absolute."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path.resolve()) if rel.startswith("..") else rel


def _check_shape(data: Any, where: str) -> None:
    """Depth and size limits, walked iteratively (aliases are counted each time they are used)."""
    stack, nodes = [(data, 1)], 0
    while stack:
        obj, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise RecipeError(f"{where}: recipe too large (more than {MAX_NODES} values, counting each use of an alias)")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{where}: recipe nested more than {MAX_DEPTH} levels deep")
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj)


def _key_lines(root: yaml.Node, where: str) -> Origins:
    """{key path: "file:line"} from the composed YAML (iteratively, counting every use of an
    alias, so an alias bomb stops at MAX_NODES); duplicate keys are an error (PyYAML would
    silently keep the last one)."""
    out: Origins = {}
    stack, visits = [(root, ())], 0
    while stack:
        node, prefix = stack.pop()
        visits += 1
        if visits > MAX_NODES:
            raise RecipeError(f"{where}: recipe too large (more than {MAX_NODES} values, counting each use of an alias)")
        if len(prefix) > MAX_DEPTH:
            raise RecipeError(f"{where}: recipe nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                key = _scalar_key(key_node)
                if key in seen:
                    raise RecipeError(f"{where}:{key_node.start_mark.line + 1}: duplicate key {'.'.join(map(str, prefix + (key,)))!r}")
                seen.add(key)
                out[prefix + (key,)] = f"{where}:{key_node.start_mark.line + 1}"
                stack.append((value_node, prefix + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[prefix + (i,)] = f"{where}:{item.start_mark.line + 1}"
                stack.append((item, prefix + (i,)))
    return out


def _scalar_key(node: yaml.Node):
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int":
        try:
            return int(node.value)
        except ValueError:
            return node.value
    return getattr(node, "value", None)


def read_yaml(path: Path) -> tuple[dict, Origins]:
    """A recipe file's mapping and where each key was set."""
    where = _where(path)
    if not path.is_file():
        raise RecipeError(f"{where}: no such recipe file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: {size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{where}: cannot read the recipe: {exc}") from None
    try:
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), where)  # nodes only, nothing is constructed
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise RecipeError(f"{where}: recipe nested too deeply") from None
    if data is None:
        raise RecipeError(f"{where}: the recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys (model, calibration, quantization, ...), not a {type(data).__name__}")
    _check_shape(data, where)
    return data, lines


def _relative_to(data: dict, folder: Path) -> None:
    """Resolve the paths this file reads relative to the file itself."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("checkpoint"), str):
        model["checkpoint"] = str(folder / model["checkpoint"])
    target = data.get("target")
    if isinstance(target, str) and target.endswith((".yaml", ".yml")):
        data["target"] = str(folder / target)


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _merge_origins(base: Origins, over: Origins, over_data: dict) -> Origins:
    out = dict(base)
    # A key replaced (not merged) by `over` forgets where its old sub-keys came from.
    for path in over:
        value = _get(over_data, path)
        if not isinstance(value, dict):
            for p in [p for p in out if p[: len(path)] == path and len(p) > len(path)]:
                del out[p]
    out.update(over)
    return out


def _get(data, path: tuple):
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def load_composed(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, Origins, list[Path]]:
    """The merged mapping of a recipe and everything it extends, with key origins and the files."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(_where(p) for p in _chain[_chain.index(path) :] + (path,))
        raise RecipeError(f"{_where(_chain[-1])}: extends forms a cycle: {cycle}")
    if len(_chain) >= MAX_EXTENDS:
        raise RecipeError(f"{_where(path)}: more than {MAX_EXTENDS} levels of extends")
    data, origins = read_yaml(path)
    _relative_to(data, path.parent)
    parents = data.pop("extends", None)
    origins = {k: v for k, v in origins.items() if k[0] != "extends"}
    if parents is None:
        return data, origins, [path]
    if isinstance(parents, str):
        parents = [parents]
    if not (isinstance(parents, list) and parents and all(isinstance(p, str) for p in parents)):
        raise RecipeError(f"{_where(path)}: extends: must be a file name or a list of file names, got {parents!r}")
    merged, merged_origins, files = {}, {}, []
    for parent in parents:
        base, base_origins, base_files = load_composed(path.parent / parent, _chain + (path,))
        merged = deep_merge(merged, base)
        merged_origins = _merge_origins(merged_origins, base_origins, base)
        files += [f for f in base_files if f not in files]
    return deep_merge(merged, data), _merge_origins(merged_origins, origins, data), files + [path]


# ---- --set key=value ---------------------------------------------------------------------------


def parse_override(text: str) -> tuple[tuple, Any]:
    """`a.b.c=value` -> (("a", "b", "c"), value parsed as YAML: 8, true, null, [x, y], text)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise RecipeError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. quantization.method=entropy")
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    if path[0] == "extends":
        raise RecipeError(f"--set {text}: extends cannot be set from the command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: the plain string
    return path, value


def apply_override(data: dict, path: tuple, value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list) and isinstance(part, int):
            if part >= len(node):
                raise RecipeError(f"--set {text}: {'.'.join(map(str, path[: i + 1]))} is past the end of a list of {len(node)}")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {text}: {'.'.join(map(str, path[:i]))} is not a mapping")
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {text}: cannot set {'.'.join(map(str, path))}")


# ---- validation errors -------------------------------------------------------------------------


def _inner_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside Optional[...] / tuple[X, ...] / list[X], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, tuple, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


def _allowed_keys(loc: tuple) -> list[str] | None:
    model: type[BaseModel] | None = RecipeSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _inner_model(field.annotation) if field else None
        if model is None:
            return None
    keys = []
    for name, field in model.model_fields.items():
        keys.append(field.alias or name)
    if model is RecipeSpec:
        keys.append("extends")
    return keys


def _origin(origins: Origins, loc: tuple, fallback: str) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    return fallback


def format_errors(exc: ValidationError, origins: Origins, fallback: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = "unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        elif err["type"] != "missing" and not isinstance(err.get("input"), (dict, list, tuple)):
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"{_origin(origins, loc, fallback)}: {key}: {msg}")
    return "\n".join(lines)


# ---- the recipe --------------------------------------------------------------------------------


class Recipe:
    """A validated recipe. `Recipe.load(path, overrides=[...])`, then `.run()`."""

    def __init__(self, spec: RecipeSpec, *, source: Path | None = None, files: Iterable[Path] = (), overrides: Iterable[str] = (), origins: Origins | None = None):
        self.spec = spec
        self.source = source
        self.files = list(files)
        self.overrides = list(overrides)
        self.origins = dict(origins or {})

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
        """Read, compose (`extends`), apply `overrides` ("key.path=value") and validate."""
        path = Path(path)
        data, origins, files = load_composed(path)
        overrides = list(overrides)
        for text in overrides:
            key, value = parse_override(text)
            apply_override(data, key, value, text)
            origins = _merge_origins(origins, {key: f"--set {text}"}, {})
        return cls(cls._validate(data, origins, _where(path)), source=path, files=files, overrides=overrides, origins=origins)

    @classmethod
    def from_dict(cls, data: Mapping, overrides: Iterable[str] = ()) -> Recipe:
        """A recipe from a mapping (paths relative to the working directory; no `extends`)."""
        data = deep_merge({}, dict(data))
        if "extends" in data:
            raise RecipeError("<dict>: extends is only allowed in recipe files")
        _check_shape(data, "<dict>")
        origins: Origins = {}
        for text in overrides:
            key, value = parse_override(text)
            apply_override(data, key, value, text)
            origins[key] = f"--set {text}"
        return cls(cls._validate(data, origins, "<dict>"), overrides=overrides, origins=origins)

    @staticmethod
    def _validate(data: dict, origins: Origins, where: str) -> RecipeSpec:
        try:
            return RecipeSpec.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(format_errors(exc, origins, where)) from None

    @property
    def where(self) -> str:
        return _where(self.source) if self.source else "<dict>"

    def origin(self, key: str) -> str:
        """Where a dotted key was set: "file:line", "--set key=value", or the recipe itself."""
        return _origin(self.origins, tuple(int(p) if p.isdigit() else p for p in key.split(".")), self.where)

    def quant_config(self) -> QuantConfig:
        q = self.spec.quantization
        return QuantConfig(**q.model_dump(by_alias=True), opset=self.spec.export.opset, target=self.spec.target)

    def to_dict(self) -> dict:
        """The resolved recipe (after extends and overrides), as plain data."""
        return self.spec.model_dump(mode="json", by_alias=True)

    def require(self, section: str) -> Any:
        value = getattr(self.spec, section)
        if value is None:
            raise RecipeError(f"{self.where}: {section}: this job needs a '{section}' section (see recipes/template.yaml)")
        return value

    def run(self, output: str | os.PathLike | None = None, *, evaluate: bool = True, quiet: bool | None = None, log=None):
        """Run the job end to end; returns a `RecipeResult` (see torchq.recipe_run)."""
        from .recipe_run import run_recipe

        return run_recipe(self, output, evaluate=evaluate, quiet=quiet, log=log)

    def __repr__(self) -> str:
        return f"Recipe({self.where!r}, overrides={self.overrides!r})"


def resolve_import(import_path: str, key: str, where: str):
    """The object an explicit `module:attribute` path names (this imports and runs that module)."""
    module_name, _, attr = import_path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise RecipeError(f"{where}: {key}: cannot import {module_name!r} (no module named {exc.name!r}; is it installed or in the working directory?)") from None
        raise RecipeError(f"{where}: {key}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise RecipeError(f"{where}: {key}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{where}: {key}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"{where}: {key}: {import_path!r} is not a function or class (it is of type {type(obj).__name__})")
    return obj


def call_user(fn, key: str, where: str, *args, kwargs_at: str | None = None, **kwargs):
    """Call recipe-named code; its failure becomes one clear line naming the key and, when they
    were set elsewhere, where its kwargs came from (the traceback shows with --debug)."""
    from onnx_backend.errors import TorchqError

    try:
        return fn(*args, **kwargs)
    except TorchqError:
        raise
    except Exception as exc:
        section = key.rsplit(".", 1)[0]
        hint = f" (check {section}.kwargs{', set at ' + kwargs_at if kwargs_at and kwargs_at != where else ''})" if kwargs else ""
        raise RecipeError(f"{where}: {key}: {getattr(fn, '__qualname__', fn)} raised {type(exc).__name__}: {exc}{hint}") from exc
