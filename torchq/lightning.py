"""Quantize a LightningModule after `Trainer.fit`, with a callback.

    from torchq.lightning import QuantizationCallback
    trainer = Trainer(callbacks=[QuantizationCallback(QuantConfig(method="mse"), "quantized/")])
    trainer.fit(model, datamodule=dm)      # -> quantized/model.int8.onnx and its report

What it does, after fit (`on_fit_end`) or when `callback.quantize(trainer, model)` is called:

1. Calibration through hooks: `torchq.prepare` attaches forward hooks to the module, batches from
   the chosen dataloader (the trainer's own, so under DDP each rank reads its shard) run through
   `module(*inputs)` in eval mode without gradients, and `torchq.unprepare` removes every hook.
   The module's `forward`, parameters, buffers and checkpoints are never touched. It runs on the
   strategy's root device (Lightning moves the module to the CPU when fit ends; it is moved back).
2. Under a distributed strategy the ranks' statistics are merged exactly
   (`torchq.distributed.merge_statistics`), and only rank 0 exports and evaluates.
3. Export of the INT8 QDQ ONNX model of `module.forward`, with the batch axis dynamic.
4. Evaluation with the module's own validation metric, when it has a `validation_step` and the
   trainer has validation dataloaders: a fresh single-device `Trainer.validate` runs twice on a
   copy of the module -- once as is (float), once with the copy's `forward` answered by an
   onnxruntime session of the INT8 model. Whatever `validation_step` logs with `self.log` is the
   metric, so the float and INT8 numbers come from the same code on the same batches. The copy
   shares the module's parameter tensors (no extra memory); the user's module object itself is
   not modified. If `validation_step` never calls `self(...)` / `self.forward`, the INT8 model
   would not be used, so no INT8 metric is reported (and the report says why).
5. Float and INT8 metrics are logged to every logger of the trainer as
   `quantization/float/<name>` and `quantization/int8/<name>`, and written with the export
   report to `<output_dir>/<filename stem>.report.json`.

Inputs from a batch: `inputs(batch)` if given (returning a tensor, a tuple of positional inputs,
a dict of keyword inputs, or a (tuple, dict) pair); otherwise a tensor is the single input, a
tuple/list gives its first k items (k = the positional parameters of `forward`; the rest, such as
labels, is dropped), and a dict gives the keys that `forward` takes as keyword arguments.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import json
import logging
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from pydantic import ValidationError
from torch.utils import _pytree as pytree

from onnx_backend.errors import CalibrationError, ConfigError
from onnx_backend.model_io import write_text_atomic
from onnx_backend.validate import validate

from . import distributed
from .api import _to_device, calibrate, positional_arity
from .config import QuantConfig, format_validation_error, make_config
from .export import export_with_report
from .prepare import prepare, unprepare
from .recipe_run import write_float_model
from .recipes import ExportSection, Recipe

DATALOADERS = ("train", "val", "predict")
DEFAULT_NUM_BATCHES = 64


@dataclass
class QuantizationResult:
    onnx_path: Path | None  # None on ranks other than 0
    report_path: Path | None
    calibration_batches: int
    float_metrics: dict[str, float] = field(default_factory=dict)
    int8_metrics: dict[str, float] = field(default_factory=dict)
    evaluation_note: str | None = None  # why there are no metrics, if there are none
    violations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "onnx_path": str(self.onnx_path) if self.onnx_path else None,
            "report_path": str(self.report_path) if self.report_path else None,
            "calibration_batches": self.calibration_batches,
            "float_metrics": self.float_metrics,
            "int8_metrics": self.int8_metrics,
            "evaluation_note": self.evaluation_note,
            "violations": self.violations,
        }


# ---- inputs ---------------------------------------------------------------------------------------


def _forward_signature(module: torch.nn.Module) -> inspect.Signature:
    return inspect.signature(module.forward)


def default_inputs(module: torch.nn.Module, batch) -> tuple[tuple, dict]:
    """Model inputs of one batch (see the module docstring)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        params = _forward_signature(module).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return (), dict(batch)
        return (), {k: v for k, v in batch.items() if k in params}
    if isinstance(batch, (tuple, list)):
        arity = positional_arity(module)
        items = tuple(batch)
        return (items if arity is None else items[:arity]), {}
    raise CalibrationError(f"cannot take model inputs from a batch of type {type(batch).__name__}; pass inputs=... to QuantizationCallback")


def _normalize(result) -> tuple[tuple, dict]:
    """What an `inputs` function may return, as (args, kwargs)."""
    if isinstance(result, torch.Tensor):
        return (result,), {}
    if isinstance(result, Mapping):
        return (), dict(result)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], tuple) and isinstance(result[1], Mapping):
        return result[0], dict(result[1])
    if isinstance(result, (tuple, list)):
        return tuple(result), {}
    raise ConfigError(f"inputs(batch) must return a tensor, a tuple, a dict or (tuple, dict); got {type(result).__name__}")


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[tuple, dict, list[str], list]:
    """Positional-or-keyword arguments made positional (so both exporters see one order), the
    name of each tensor input in that order, and the tensors."""
    bound = signature.bind(*args, **kwargs)
    names, tensors = [], []
    for pname, value in bound.arguments.items():
        leaves = pytree.tree_leaves(value)
        tensor_leaves = [x for x in leaves if isinstance(x, torch.Tensor)]
        for i, leaf in enumerate(tensor_leaves):
            names.append(pname if len(tensor_leaves) == 1 else f"{pname}_{i}")
            tensors.append(leaf)
    return tuple(bound.args), dict(bound.kwargs), names, tensors


# ---- the INT8 model as a forward --------------------------------------------------------------------


class OnnxForward:
    """Callable standing in for `forward` on the evaluation copy: runs the INT8 ONNX model in
    onnxruntime and returns torch tensors shaped like the float forward's output."""

    def __init__(self, model: onnx.ModelProto, signature: inspect.Signature, input_names: list[str], example_output):
        from onnx_backend.sessions import open_session

        self.session = open_session(model, level="all")  # as a user would run the INT8 model
        self.signature = signature
        self.input_names = input_names
        self.feed_names = {i.name for i in self.session.get_inputs()}
        leaves, self.out_spec = pytree.tree_flatten(example_output)
        self.out_leaves = leaves
        self.tensor_slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        _, _, _, tensors = _bind(self.signature, args, kwargs)
        if len(tensors) != len(self.input_names):
            raise CalibrationError(f"the INT8 model was exported with {len(self.input_names)} tensor inputs ({self.input_names}); this call passed {len(tensors)}")
        device = tensors[0].device if tensors else torch.device("cpu")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, tensors) if n in self.feed_names}
        outputs = self.session.run(None, feeds)
        if len(outputs) != len(self.tensor_slots):
            raise CalibrationError(f"the INT8 model has {len(outputs)} outputs; the float forward returns {len(self.tensor_slots)} tensors")
        leaves = list(self.out_leaves)
        for slot, value in zip(self.tensor_slots, outputs):
            leaves[slot] = torch.from_numpy(np.ascontiguousarray(value)).to(device)
        return pytree.tree_unflatten(leaves, self.out_spec)


# ---- the callback's settings ----------------------------------------------------------------------

DEFAULT_OUTPUT_DIR, DEFAULT_FILENAME = "quantized", "model.int8.onnx"


def _export_section(export: Mapping | None) -> ExportSection:
    """The `export=` argument: a recipe's export section, validated the same way."""
    try:
        return ExportSection(**dict(export or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "QuantizationCallback: export")) from None
    except TypeError as exc:
        raise ConfigError(f"QuantizationCallback: export must be a mapping of export settings: {exc}") from None


def _with_export_opset(config: QuantConfig, section: ExportSection, export: Mapping | None) -> QuantConfig:
    """export={"opset": N} sets the config's opset (as a recipe's export.opset does); a config
    that sets another opset itself is a conflict, not a silent choice."""
    if not export or "opset" not in export:
        return config
    if "opset" in config.model_fields_set and config.opset != section.opset:
        raise ConfigError(f"QuantizationCallback: the config sets opset {config.opset} and export sets opset {section.opset}; set it once")
    return config.model_copy(update={"opset": section.opset})


def _model_location(output_dir, filename: str | None, export_path: str | None) -> tuple[Path, str]:
    """Where the INT8 model goes: output_dir / filename when either is given (they override
    export.path, as `torchq quantize -o` does a recipe's), else export.path, else
    quantized/model.int8.onnx."""
    if output_dir is None and filename is None and export_path is not None:
        path = Path(export_path)
        if path.suffix != ".onnx":
            raise ConfigError(f"QuantizationCallback: export.path should end in .onnx, got {export_path!r}")
        return path.parent, path.name
    return Path(output_dir if output_dir is not None else DEFAULT_OUTPUT_DIR), filename or DEFAULT_FILENAME


# ---- the callback ---------------------------------------------------------------------------------


class QuantizationCallback(Callback):
    """Calibrate, export to INT8 ONNX, evaluate and log, after fit and on demand.

    Args:
        config: a `QuantConfig`, a dict of its fields, a `torchq.Recipe`, or a recipe file path
            (its quantization, target and export sections are used; model and calibration come
            from the trainer).
        output_dir: where `filename` and its report are written (rank 0 only); with neither
            given, export.path (a recipe's or `export=`'s) names the model, else
            quantized/model.int8.onnx.
        dataloader: which of the trainer's dataloaders calibrates: "train", "val" or "predict".
        dataloader_idx: which one, when there are several (an index, or a key for a dict).
        num_batches: calibration batches per rank (default: the recipe's calibration.num_batches,
            else 64; None in a recipe means every batch).
        inputs: `inputs(batch)` -> the forward's inputs (see the module docstring).
        evaluate: run the module's validation metric on the float and INT8 models.
        quantize_on_fit_end: set False to quantize only when `quantize()` is called.
        export: a recipe's export section (path, float_path, opset, exporter, input_names,
            output_names, dynamic_axes, example_batch_size, report) when `config` is not a
            recipe; opset here sets the config's.
        device: where calibration runs (default: the strategy's root device).
        qat: a `QATConfig` (or dict) for quantization-aware fine-tuning: the module is calibrated
            and prepared for QAT in `setup`, fit trains it with its own training_step, and the
            QAT model is exported after fit (torchq/qat/lightning.py).
    """

    def __init__(
        self,
        config: QuantConfig | Mapping | Recipe | str | Path | None = None,
        output_dir: str | Path | None = None,
        *,
        dataloader: str = "train",
        dataloader_idx: int | str = 0,
        num_batches: int | None = None,
        filename: str | None = None,
        inputs: Callable[[Any], Any] | None = None,
        evaluate: bool = True,
        quantize_on_fit_end: bool = True,
        export: Mapping | None = None,
        device: str | torch.device | None = None,
        qat=None,
    ):
        super().__init__()
        from .qat.config import make_qat_config

        self.qat = make_qat_config(qat) if qat is not None else None
        self.qat_calibration_batches = 0
        if dataloader not in DATALOADERS:
            raise ConfigError(f"QuantizationCallback: dataloader must be one of {', '.join(DATALOADERS)}, got {dataloader!r}")
        if filename is not None and not filename.endswith(".onnx"):
            raise ConfigError(f"QuantizationCallback: filename should end in .onnx, got {filename!r}")
        default_batches = DEFAULT_NUM_BATCHES
        if isinstance(config, (str, Path)):
            config = Recipe.load(config)
        if isinstance(config, Recipe):
            if export is not None:
                raise ConfigError("QuantizationCallback: give export settings in the recipe's export section, not both")
            self.config = config.quant_config()
            self.export_settings = config.spec.export
            if config.spec.calibration is not None:
                default_batches = config.spec.calibration.num_batches  # None there means every batch
        else:
            self.config = make_config(config)
            self.export_settings = _export_section(export)
            self.config = _with_export_opset(self.config, self.export_settings, export)
        self.output_dir, self.filename = _model_location(output_dir, filename, self.export_settings.path)
        self.dataloader = dataloader
        self.dataloader_idx = dataloader_idx
        if num_batches is not None and num_batches < 1:
            raise ConfigError(f"QuantizationCallback: num_batches must be >= 1, got {num_batches}")
        self.num_batches = num_batches if num_batches is not None else default_batches
        self.inputs = inputs
        self.evaluate = evaluate
        self.quantize_on_fit_end = quantize_on_fit_end
        self.device = torch.device(device) if device is not None else None
        self.last_result: QuantizationResult | None = None
        self.runs = 0

    # ---- checkpoint state (the callback's own; the module's state is untouched) ---------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(output_dir=str(self.output_dir), filename=self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "last_result": self.last_result.to_dict() if self.last_result else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))
        last = state_dict.get("last_result")
        if last:
            self.last_result = QuantizationResult(
                Path(last["onnx_path"]) if last.get("onnx_path") else None,
                Path(last["report_path"]) if last.get("report_path") else None,
                int(last.get("calibration_batches", 0)),
                dict(last.get("float_metrics") or {}),
                dict(last.get("int8_metrics") or {}),
                last.get("evaluation_note"),
                list(last.get("violations") or []),
            )

    # ---- hooks ----------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            distributed.destroy_process_group_at_exit()  # the ranks' collectives must not abort their exit
        if self.qat is not None and stage == "fit":
            from .qat.lightning import setup_qat

            self.qat_calibration_batches = setup_qat(self, trainer, pl_module, self.qat) or self.qat_calibration_batches

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.quantize_on_fit_end and not getattr(trainer, "sanity_checking", False):
            self.quantize(trainer, pl_module)

    # ---- the work -------------------------------------------------------------------------------

    def quantize(self, trainer: Trainer, pl_module: LightningModule, dataloader=None) -> QuantizationResult:
        """Calibrate on `dataloader` (default: the trainer's, as configured), export, evaluate, log."""
        loader = dataloader if dataloader is not None else self._calibration_loader(trainer, pl_module)
        home = pl_module.device
        device = self.device or trainer.strategy.root_device
        pl_module.to(device)  # Lightning left it on the CPU at the end of fit; moved back below
        try:
            return self._quantize(trainer, pl_module, loader, device)
        finally:
            pl_module.to(home)

    def _quantize(self, trainer: Trainer, pl_module: LightningModule, loader, device) -> QuantizationResult:
        signature = _forward_signature(pl_module)
        batches = iter(loader)
        try:
            first = next(batches)
        except StopIteration:
            raise CalibrationError(f"the {self.dataloader} dataloader is empty") from None
        args, kwargs = self._inputs(pl_module, first, device)
        example_args, example_kwargs, input_names, example_tensors = _bind(signature, args, kwargs)
        example_output = self._run(pl_module, example_args, example_kwargs)  # unprepared: the plain float forward

        from .qat import is_qat

        qat = is_qat(pl_module)  # prepared and fine-tuned already: export what was trained
        if not qat:
            prepare(pl_module, self.config)
        try:
            try:
                if qat:
                    count = self.qat_calibration_batches
                else:
                    count = self._calibrate(trainer, pl_module, itertools.chain([first], batches), device)
                    count = distributed.merge_statistics(pl_module) if distributed.is_distributed() else count
                result = QuantizationResult(None, None, count)
                if trainer.is_global_zero:
                    qmodel, report = self._export(pl_module, example_args, example_kwargs, input_names, example_tensors, example_output)
                    result.onnx_path = self.output_dir / self.filename
                    result.violations = [str(v) for v in validate(qmodel)]
            finally:
                unprepare(pl_module)
            if trainer.is_global_zero:
                if self.evaluate:
                    self._evaluate(trainer, pl_module, qmodel, signature, input_names, example_output, result)
                self._log(trainer, result)
                if self.export_settings.report:
                    result.report_path = self._write_report(result, report)
        finally:
            distributed.barrier()  # also when rank 0 failed: the other ranks wait here for it
        self.runs += 1
        self.last_result = result
        return result

    def _inputs(self, module, batch, device) -> tuple[tuple, dict]:
        args, kwargs = _normalize(self.inputs(batch)) if self.inputs is not None else default_inputs(module, batch)
        return _to_device(args, device), _to_device(kwargs, device)

    @staticmethod
    def _run(module, args, kwargs):
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                return module(*args, **kwargs)
        finally:
            module.train(was_training)

    def _calibrate(self, trainer, pl_module, batches, device) -> int:
        quiet = trainer.progress_bar_callback is None or not sys.stderr.isatty()
        return calibrate(pl_module, batches, max_batches=self.num_batches, quiet=quiet, inputs=lambda batch: self._inputs(pl_module, batch, device))

    def _export(self, pl_module, args, kwargs, input_names, example_tensors, example_output):
        e = self.export_settings
        if e.example_batch_size is not None:
            args = tuple(a[: e.example_batch_size] if isinstance(a, torch.Tensor) and a.dim() else a for a in args)
            kwargs = {k: v[: e.example_batch_size] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in kwargs.items()}
        out_tensors = [x for x in pytree.tree_leaves(example_output) if isinstance(x, torch.Tensor)]
        output_names = list(e.output_names) if e.output_names else (["output"] if len(out_tensors) == 1 else [f"output_{i}" for i in range(len(out_tensors))])
        names = list(e.input_names) if e.input_names else input_names
        dynamic_axes = e.dynamic_axes
        if dynamic_axes is None:  # the batch axis of every input and output, so any batch size evaluates
            dynamic_axes = {n: {0: "batch"} for n, t in zip(names, example_tensors) if t.dim()}
            dynamic_axes |= {n: {0: "batch"} for n, t in zip(output_names, out_tensors) if t.dim()}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        exported = export_with_report(
            pl_module,
            args,
            self.output_dir / self.filename,
            kwargs=kwargs or None,
            input_names=names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            dynamo=e.exporter == "dynamo",
        )
        if e.float_path:
            float_export = e.model_copy(update={"input_names": tuple(names), "output_names": tuple(output_names), "dynamic_axes": dynamic_axes})
            write_float_model(pl_module, args, kwargs, float_export, self.config.opset, Path(e.float_path))
        return exported

    # ---- evaluation -----------------------------------------------------------------------------

    def _evaluate(self, trainer, pl_module, qmodel, signature, input_names, example_output, result: QuantizationResult) -> None:
        loaders = trainer.val_dataloaders
        if not is_overridden("validation_step", pl_module):
            result.evaluation_note = "the module has no validation_step"
            return
        if loaders is None:
            result.evaluation_note = "the trainer has no validation dataloaders"
            return
        names = list(self.export_settings.input_names) if self.export_settings.input_names else input_names
        try:
            twin = self._evaluation_copy(pl_module)
        except Exception as exc:  # a module that cannot be copied still gets its INT8 model
            result.evaluation_note = f"the module could not be copied for evaluation ({type(exc).__name__}: {exc})"
            return
        result.float_metrics = self._validate(trainer, twin, loaders)
        onnx_forward = OnnxForward(qmodel, signature, names, example_output)
        twin.forward = onnx_forward  # the copy only: its validation_step now calls the INT8 model
        metrics = self._validate(trainer, twin, loaders)
        if onnx_forward.calls == 0:
            result.evaluation_note = "validation_step never called self(...) or self.forward, so it cannot measure the INT8 model"
        elif not metrics:
            result.evaluation_note = "validation_step logs no metric with self.log"
        else:
            result.int8_metrics = metrics
        if not result.int8_metrics:
            result.float_metrics = {}

    @staticmethod
    def _evaluation_copy(pl_module: LightningModule) -> LightningModule:
        # Share parameter and buffer tensors (read-only during validation) instead of copying them;
        # everything else (submodules, metrics, attributes) is a true copy, so the evaluation
        # trainer attaching itself, mode switches and metric states never reach the user's module.
        memo = {id(t): t for t in itertools.chain(pl_module.parameters(), pl_module.buffers())}
        twin = copy.deepcopy(pl_module, memo)
        twin.configure_callbacks = list  # its own callbacks (maybe this one) must not run again
        return twin

    @staticmethod
    def _validate(trainer: Trainer, module: LightningModule, loaders) -> dict[str, float]:
        device = next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device
        accelerator = {"cuda": "gpu"}.get(device.type, device.type)
        devices = [device.index] if device.type == "cuda" and device.index is not None else 1
        quiet = logging.getLogger("lightning.pytorch")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # no "GPU available" banners from the evaluation trainer
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.simplefilter("ignore")
                evaluator = Trainer(
                    accelerator=accelerator,
                    devices=devices,
                    precision=trainer.precision,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                    default_root_dir=trainer.default_root_dir,
                )
                results = evaluator.validate(module, dataloaders=loaders, verbose=False)
        finally:
            quiet.setLevel(level)
        metrics: dict[str, float] = {}
        for per_loader in results:
            for k, v in per_loader.items():
                metrics[k] = float(v)
        return metrics

    # ---- outputs --------------------------------------------------------------------------------

    def _log(self, trainer: Trainer, result: QuantizationResult) -> None:
        metrics = {f"quantization/float/{k}": v for k, v in result.float_metrics.items()}
        metrics |= {f"quantization/int8/{k}": v for k, v in result.int8_metrics.items()}
        metrics["quantization/calibration_batches"] = float(result.calibration_batches)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def _write_report(self, result: QuantizationResult, report) -> Path:
        path = self.output_dir / f"{Path(self.filename).stem}.report.json"
        data = {"quantization_callback": result.to_dict(), "config": self.config.model_dump(mode="json", by_alias=True), "export": report.to_dict()}
        data["quantization_callback"]["report_path"] = str(path)
        return write_text_atomic(path, json.dumps(data, indent=1) + "\n")

    # ---- which dataloader -----------------------------------------------------------------------

    def _calibration_loader(self, trainer: Trainer, pl_module: LightningModule):
        attr = {"train": "train_dataloader", "val": "val_dataloaders", "predict": "predict_dataloaders"}[self.dataloader]
        loaders = getattr(trainer, attr)
        if loaders is None:  # e.g. predict after fit: ask the datamodule or the module itself
            hook = {"train": "train_dataloader", "val": "val_dataloader", "predict": "predict_dataloader"}[self.dataloader]
            source = trainer.datamodule if trainer.datamodule is not None and is_overridden(hook, trainer.datamodule) else pl_module
            if not is_overridden(hook, source):
                raise ConfigError(f"QuantizationCallback: the trainer has no {self.dataloader} dataloader and neither the datamodule nor the module defines {hook}()")
            loaders = getattr(source, hook)()
        return self._pick(loaders)

    def _pick(self, loaders):
        idx = self.dataloader_idx
        if isinstance(loaders, Mapping):
            keys = list(loaders)
            key = idx if idx in loaders else (keys[idx] if isinstance(idx, int) and 0 <= idx < len(keys) else None)
            if key is None:
                raise ConfigError(f"QuantizationCallback: dataloader_idx {idx!r} not among the {self.dataloader} dataloaders {keys}")
            return loaders[key]
        if isinstance(loaders, (list, tuple)):
            if not isinstance(idx, int) or not 0 <= idx < len(loaders):
                raise ConfigError(f"QuantizationCallback: dataloader_idx {idx!r}, but there are {len(loaders)} {self.dataloader} dataloaders")
            return loaders[idx]
        if idx not in (0, None):
            raise ConfigError(f"QuantizationCallback: dataloader_idx {idx!r}, but there is one {self.dataloader} dataloader")
        return loaders
