"""Running a recipe: build the model, calibrate, export the INT8 ONNX, evaluate, write the report."""

from __future__ import annotations

import copy

import fnmatch
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from onnx_backend.errors import OutputPathError, TorchqError
from onnx_backend.model_io import write_text_atomic
from onnx_backend.validate import Violation, validate

from .api import _to_device, calibrate, positional_arity, split_batch
from .export import ExportReport, export_with_report
from .prepare import prepare, unprepare
from .recipes import ModelSection, Recipe, RecipeError, call_user, resolve_import


def quantized_activations(model) -> list[str]:
    """Names of the activations the written model quantizes (inputs of its QuantizeLinear nodes,
    under their original names). Counted from the model itself: the plan also lists tensors that
    a fused activation absorbed."""
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    names = []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and "_requant" not in n.name:
            x = n.input[0]
            names.append(x[: -len("_float")] if x.endswith("_float") and x[: -len("_float")] in outputs else x)
    return list(dict.fromkeys(names))


@dataclass
class RecipeResult:
    """What a recipe run produced."""

    onnx_path: Path
    export_report: ExportReport
    violations: list[Violation]
    calibration_batches: int
    metric: str | None = None
    float_metric: float | None = None
    int8_metric: float | None = None
    higher_is_better: bool = True
    report_paths: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)  # activations with Q/DQ in the written model
    warnings: list[str] = field(default_factory=list)

    @property
    def metric_change(self) -> float | None:
        """INT8 minus float, signed so that negative is worse."""
        if self.float_metric is None or self.int8_metric is None:
            return None
        d = self.int8_metric - self.float_metric
        return d if self.higher_is_better else -d

    def summary_lines(self) -> list[str]:
        s = self.export_report.backend.plan.summary()
        floats = len(self.export_report.float_tensors)
        parts = [f"{n} {what}{'s' if n != 1 else ''}" for n, what in ((s["float_nodes"], "node"), (floats, "tensor")) if n]
        left = f"; {' and '.join(parts)} left in float (why: see the report)" if parts else ""
        lines = [
            f"INT8 model:   {self.onnx_path}",
            f"quantized:    {len(self.quantized)} activations, {s['int8_nodes']} nodes in int8{left}",
            f"spec check:   {'all TFLite 8-bit rules hold' if not self.violations else f'{len(self.violations)} broken rules (see the report)'}",
        ]
        lines += [f"warning:      {w}" for w in self.warnings]
        if self.float_metric is not None:
            lines.append(f"metric:       {self.metric}: float {self.float_metric:.4g}, INT8 {self.int8_metric:.4g} (change {self.metric_change:+.4g})")
        lines += [f"report:       {p}" for p in self.report_paths]
        return lines


# ---- the model and the data ---------------------------------------------------------------------


def build_model(section: ModelSection, where: str, kwargs_at: str | None = None) -> torch.nn.Module:
    """`where` names the recipe (or the line, or the --set) in error messages."""
    factory = resolve_import(section.factory, "model.factory", where)
    model = call_user(factory, "model.factory", where, kwargs_at=kwargs_at, **section.kwargs)
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(f"{where}: model.factory: {section.factory} returned a {type(model).__name__}, not a torch.nn.Module")
    if section.checkpoint:
        load_checkpoint(model, section, where)
    return model.eval()


def load_checkpoint(model: torch.nn.Module, section: ModelSection, where: str) -> None:
    path = Path(section.checkpoint)
    if not path.is_file():
        raise RecipeError(f"{where}: model.checkpoint: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals, truncated files, non-torch files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{where}: model.checkpoint: cannot load {path} with torch.load(weights_only=True): {first}") from None
    if section.checkpoint_key:
        if not isinstance(state, dict) or section.checkpoint_key not in state:
            keys = sorted(state)[:10] if isinstance(state, dict) else []
            raise RecipeError(f"{where}: model.checkpoint_key: {path} has no key {section.checkpoint_key!r} (top-level keys: {keys})")
        state = state[section.checkpoint_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = "; it looks like a Lightning checkpoint: set model.checkpoint_key: state_dict" if isinstance(state, dict) and "state_dict" in state else ""
        raise RecipeError(f"{where}: model.checkpoint: {path} is not a state_dict (name -> tensor){hint}")
    if section.strip_prefix:
        # keys outside the prefix belong to the rest of the checkpointed object (a LightningModule's loss, metrics)
        state = {k.removeprefix(section.strip_prefix): v for k, v in state.items() if k.startswith(section.strip_prefix)}
    try:
        model.load_state_dict(state, strict=section.strict)
    except RuntimeError as exc:
        raise RecipeError(f"{where}: model.checkpoint: {path} does not fit the model: {' '.join(str(exc).split())[:400]}") from None


class _FirstBatch:
    """Iterates the user's loader, keeps its first batch (the export example), and turns an error
    raised by the loader into one that names the recipe key."""

    def __init__(self, loader, limit: int | None, where: str):
        self.loader, self.limit, self.where = loader, limit, where
        self.first = None

    def __len__(self) -> int:
        n = len(self.loader)
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self):
        try:
            it = iter(self.loader)
        except TypeError:
            raise RecipeError(f"{self.where}: calibration.loader returned a {type(self.loader).__name__}, which is not iterable") from None
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except TorchqError:
                raise
            except Exception as exc:
                raise RecipeError(f"{self.where}: calibration.loader: iterating the loader raised {type(exc).__name__}: {exc}") from exc
            if self.first is None:
                self.first = batch
            yield batch


def example_inputs(model: torch.nn.Module, batch, batch_size: int | None, device) -> tuple[tuple, dict]:
    """The export example: the model inputs of one calibration batch, cut to `batch_size` samples."""
    args, kwargs = split_batch(batch, positional_arity(model))

    def cut(x):
        if isinstance(x, torch.Tensor) and batch_size is not None and x.dim() > 0:
            return x[:batch_size]
        return x

    args = tuple(cut(a) for a in args)
    kwargs = {k: cut(v) for k, v in kwargs.items()}
    return _to_device(args, device), _to_device(kwargs, device)


def _number(value, key: str, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: {key}: must return a number, returned a {type(value).__name__}") from None
    if not math.isfinite(out):
        raise RecipeError(f"{where}: {key}: returned {out}")
    return out


def write_float_model(model, args, kwargs, e, opset: int, path: Path) -> Path:
    """The float model through the same export as the INT8 one (markers removed), so its tensor
    names are the INT8 model's -- what `torchq report` matches on."""
    import onnx_ir as ir

    from onnx_backend import markers
    from onnx_backend.model_io import save_model

    from .export import export_float_with_markers

    proto = export_float_with_markers(
        model, args, kwargs or None, dynamo=e.exporter == "dynamo", opset=opset, input_names=e.input_names, output_names=e.output_names, dynamic_axes=e.dynamic_axes
    )
    ir_model = ir.serde.deserialize_model(proto)
    markers.strip_markers(ir_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_model(ir.serde.serialize_model(ir_model), path)


def unmatched_patterns(recipe: Recipe, report: ExportReport, model) -> list[str]:
    """Exclude and override patterns that matched no module computing a tensor of the model: they
    changed nothing, which the user should hear about (e.g. the conv of a fused Conv-BN-ReLU,
    whose output no longer exists; the ReLU computes the quantized tensor)."""
    from .export import _module_of

    # tensors that exist in the written model (quantized or not), not the ones fusion removed
    tensors = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    tensors |= {o[: -len("_float")] for o in tensors if o.endswith("_float")}
    modules = sorted({_module_of(keys[0]) for t, keys in report.keys_of_tensor.items() if t in tensors and keys} - {""})
    q = recipe.spec.quantization
    patterns = [(f"quantization.exclude.{i}", p) for i, p in enumerate(q.exclude)]
    patterns += [(f"quantization.overrides.{i}", o.pattern) for i, o in enumerate(q.overrides)]
    shown = ", ".join(modules[:12]) + (", ..." if len(modules) > 12 else "")
    return [
        f"{key} (pattern {pattern!r}) matched no module that computes a tensor of the model, so it changed nothing; modules that do: {shown}"
        for key, pattern in patterns
        if not any(fnmatch.fnmatchcase(m, pattern) for m in modules)
    ]


# ---- the job -----------------------------------------------------------------------------------


def output_path(recipe: Recipe, output) -> Path:
    out = output or recipe.spec.export.path
    if not out:
        raise RecipeError(f"{recipe.where}: export.path: no output path; set export.path in the recipe or pass -o")
    out = Path(out)
    if out.suffix != ".onnx":
        raise RecipeError(f"{recipe.where}: export.path: {out} should end in .onnx")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot create folder {out.parent} ({exc.strerror or exc})") from None
    return out


def run_recipe(recipe: Recipe, output=None, *, evaluate: bool = True, quiet: bool | None = None, log: Callable[[str], None] | None = None) -> RecipeResult:
    log = log or (lambda msg: None)
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    spec, where = recipe.spec, recipe.where
    model_section, cal = recipe.require("model"), recipe.require("calibration")
    out = output_path(recipe, output)
    config = recipe.quant_config()
    seconds = {}

    t = time.perf_counter()
    model = build_model(model_section, recipe.origin("model.factory"), recipe.origin("model.kwargs")).to(cal.device)
    at = recipe.origin("calibration.loader")
    loader = call_user(resolve_import(cal.loader, "calibration.loader", at), "calibration.loader", at, kwargs_at=recipe.origin("calibration.kwargs"), **cal.kwargs)
    seconds["load"] = time.perf_counter() - t
    log(f"model {model_section.factory} ({sum(p.numel() for p in model.parameters()):,} parameters); calibrating with {config.method}{' symmetric' if config.symmetric else ''}")

    data = _FirstBatch(loader, cal.num_batches, where)
    float_model = copy.deepcopy(model) if spec.qat is not None else None  # the distillation teacher
    prepare(model, config)
    try:
        t = time.perf_counter()
        try:
            batches = calibrate(model, data, max_batches=cal.num_batches, quiet=quiet)
        except TorchqError:
            raise
        except Exception as exc:
            raise RecipeError(f"{where}: calibration: the model raised {type(exc).__name__} on a calibration batch: {exc}") from exc
        seconds["calibrate"] = time.perf_counter() - t
        t = time.perf_counter()
        log(f"calibrated on {batches} batches; exporting with the {spec.export.exporter} exporter")
        args, kwargs = example_inputs(model, data.first, spec.export.example_batch_size, cal.device)
        e = spec.export
        if spec.qat is not None:
            from .qat.recipe import fine_tune

            seconds["qat"], result_qat = fine_tune(recipe, model, float_model, data, args, kwargs, log)
        qmodel, report = export_with_report(
            model,
            args,
            out,
            kwargs=kwargs or None,
            input_names=e.input_names,
            output_names=e.output_names,
            dynamic_axes=e.dynamic_axes,
            dynamo=e.exporter == "dynamo",
        )
        if e.float_path:
            write_float_model(model, args, kwargs, e, config.opset, Path(e.float_path))
        seconds["export"] = time.perf_counter() - t
    finally:
        unprepare(model)

    result = RecipeResult(out, report, validate(qmodel), batches, seconds=seconds, quantized=quantized_activations(qmodel))
    if spec.qat is not None:
        report.techniques.setdefault("qat", {})["distill"] = result_qat.to_dict()
    result.warnings = unmatched_patterns(recipe, report, qmodel)
    if evaluate and spec.evaluation is not None:
        t = time.perf_counter()
        ev = spec.evaluation
        where = recipe.origin("evaluation.function")
        fn = resolve_import(ev.function, "evaluation.function", where)
        with tqdm(total=2, desc="evaluating", disable=quiet, unit="model", leave=False) as bar:
            bar.set_postfix_str("float")
            with torch.no_grad():
                f = _number(call_user(fn, "evaluation.function", where, model, kwargs_at=recipe.origin("evaluation.kwargs"), **ev.kwargs), "evaluation.function", where)
            bar.update()
            bar.set_postfix_str("int8")
            q = _number(call_user(fn, "evaluation.function", where, str(out), kwargs_at=recipe.origin("evaluation.kwargs"), **ev.kwargs), "evaluation.function", where)
            bar.update()
        result.metric, result.float_metric, result.int8_metric, result.higher_is_better = ev.metric, f, q, ev.higher_is_better
        seconds["evaluate"] = time.perf_counter() - t
    if spec.export.report:
        result.report_paths = write_job_report(recipe, result)
    return result


# ---- the job report ----------------------------------------------------------------------------


def _stem(path: Path) -> Path:
    return path.with_suffix("")


def job_report_dict(recipe: Recipe, r: RecipeResult) -> dict:
    return {
        "recipe": recipe.to_dict(),
        "recipe_files": [os.path.relpath(f) for f in recipe.files],
        "overrides": recipe.overrides,
        "model": str(r.onnx_path),
        "float_model": recipe.spec.export.float_path,
        "calibration_batches": r.calibration_batches,
        "metric": None
        if r.float_metric is None
        else {"name": r.metric, "float": r.float_metric, "int8": r.int8_metric, "change": r.metric_change, "higher_is_better": r.higher_is_better},
        "quantized_activations": r.quantized,
        "warnings": r.warnings,
        "spec_check": [str(v) for v in r.violations],
        "quantization": r.export_report.to_dict(),
        "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
    }


def _describe_override(o) -> str:
    settings = [f"{k} {v}" for k, v in o.model_dump(exclude={"pattern", "keep_float"}).items() if v is not None]
    return f"`{o.pattern}`: " + (", ".join(settings + (["float"] if o.keep_float else [])) or "no change")


def job_report_markdown(recipe: Recipe, r: RecipeResult) -> str:
    spec, s = recipe.spec, r.export_report.backend.plan.summary()
    q = spec.quantization
    lines = [f"# torchq quantization report: {spec.name or recipe.where}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| recipe | {', '.join(os.path.relpath(f) for f in recipe.files) or recipe.where}{' with ' + ', '.join(f'`--set {o}`' for o in recipe.overrides) if recipe.overrides else ''} |",
        f"| model | `{spec.model.factory}`{f' + `{spec.model.checkpoint}`' if spec.model.checkpoint else ''} |",
        f"| calibration | `{spec.calibration.loader}`, {r.calibration_batches} batches |",
        f"| method | {q.method}, {'symmetric' if q.symmetric else 'asymmetric'}{f', percentile {q.percentile}' if q.method == 'percentile' else ''}, {'per-channel' if q.per_channel else 'per-tensor'} weights |",
        f"| overrides | {'; '.join(_describe_override(o) for o in q.overrides) or '-'} |",
        f"| excluded | {', '.join(f'`{p}`' for p in q.exclude) or '-'} |",
        f"| target | {spec.target or 'every op'} |",
        f"| export | {spec.export.exporter} exporter, opset {spec.export.opset} |",
        f"| INT8 model | `{r.onnx_path}` |",
        "",
    ]
    if r.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in r.warnings] + [""]
    if r.float_metric is not None:
        lines += ["## Accuracy", "", f"| {r.metric} | float | INT8 | change |", "|---|---|---|---|", f"| | {r.float_metric:.4g} | {r.int8_metric:.4g} | {r.metric_change:+.4g} |", ""]
    lines += [
        "## What was quantized",
        "",
        f"{len(r.quantized)} activations quantized, {s['int8_nodes']} nodes in int8, {s['float_nodes']} in float, "
        f"{s['absorbed_activations']} activations fused into their producers, {s['requantized_edges']} requantized edges.",
        "",
    ]
    rep = r.export_report
    lines += [
        "Quantized tensors, the PyTorch module that computed each (what `quantization.overrides` patterns match), and the range chosen:",
        "",
        "| tensor | PyTorch origin | range |",
        "|---|---|---|",
    ]
    for t in r.quantized:
        lo, hi = rep.ranges.get(t, (math.nan, math.nan))
        lines.append(f"| `{t}` | `{(rep.keys_of_tensor.get(t) or ['-'])[0]}` | [{lo:.4g}, {hi:.4g}] |")
    lines.append("")
    floats = r.export_report.float_tensors
    if floats:
        lines += ["Tensors left in float, and why:", "", "| tensor | PyTorch origin | reason |", "|---|---|---|"]
        for t, why in sorted(floats.items()):
            origin = ", ".join(r.export_report.keys_of_tensor.get(t, [])[:1]) or "-"
            lines.append(f"| `{t}` | `{origin}` | {why} |")
        lines.append("")
    float_nodes = r.export_report.backend.float_nodes
    if float_nodes:
        lines += ["Nodes left in float, and why:", "", "| node | reason |", "|---|---|"]
        lines += [f"| `{n}` | {why} |" for n, why in sorted(float_nodes.items())]
        lines.append("")
    mask_values = r.export_report.backend.mask_values
    if mask_values:
        lines += [
            "Mask values (-inf, +inf, finfo.min/max: padding) left out of the ranges; in int8 they saturate to the range's ends (docs/METHODS.md):",
            "",
            "| tensor | PyTorch origin | low | high | range |",
            "|---|---|---|---|---|",
        ]
        for t, (low, high) in sorted(mask_values.items()):
            lo, hi = rep.ranges.get(t, (math.nan, math.nan))
            lines.append(f"| `{t}` | `{(rep.keys_of_tensor.get(t) or ['-'])[0]}` | {low} | {high} | [{lo:.4g}, {hi:.4g}] |")
        lines.append("")
    lines += ["## TFLite 8-bit spec check", ""]
    lines += ["All rules hold."] if not r.violations else [f"- {v}" for v in r.violations]
    lines += ["", "## Time", "", " / ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items()), ""]
    return "\n".join(lines)


def write_job_report(recipe: Recipe, r: RecipeResult) -> list[Path]:
    stem = _stem(r.onnx_path)
    json_path, md_path = Path(f"{stem}.report.json"), Path(f"{stem}.report.md")
    write_text_atomic(json_path, json.dumps(job_report_dict(recipe, r), indent=1) + "\n")
    write_text_atomic(md_path, job_report_markdown(recipe, r))
    return [json_path, md_path]
