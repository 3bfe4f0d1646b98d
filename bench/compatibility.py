"""The compatibility suite: the architectures users bring (bench/compat_models.py) through torchq.

    python -m bench.compatibility                      # every architecture -> docs/COMPATIBILITY.md
    python -m bench.compatibility --quick              # the quick subset (tests/test_compatibility_quick.py)
    python -m bench.compatibility --models swin_t yolox_s --out -

For each model, with both torch exporters (dynamo and dynamo=False): torchq's public API with the
default configuration (prepare -> the calibration loop -> export_with_report), the spec
validator's violations on the INT8 model, the tensors left in float with the report's reasons,
and the output SQNR vs the float PyTorch model on evaluation inputs disjoint from calibration's,
run in onnxruntime's default session. The peer: onnxruntime `quantize_static` (QDQ, per-channel,
MinMax, int8, after its quant_pre_process) on the float TorchScript export, the same calibration
batches. A model passes with 0 violations and, for every output (detectors: every output, and
every part of a concatenated one), SQNR >= the peer's - 1 dB, under both exporters. A model that
cannot go through says where and why.

Rows are cached under bench/.cache/compat/ (one JSON per model and settings), so an interrupted
run resumes; `--fresh` measures again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .common import CACHE, DOCS, table

FLOOR_DB = 1.0  # ours >= onnxruntime's - FLOOR_DB
EXPORTERS = ("dynamo", "torchscript")
CALIBRATION_BATCHES, BATCH, EVALUATION = 4, 4, 8
QUICK_CALIBRATION_BATCHES, QUICK_EVALUATION = 2, 4


@dataclass
class Run:
    """One tool's INT8 model of one architecture."""

    ok: bool = False
    error: str = ""  # where and why it could not go through
    seconds: float = 0.0
    sqnr: dict[str, float] = field(default_factory=dict)  # output (or output:part) -> dB
    violations: list[str] = field(default_factory=list)
    float_tensors: dict[str, str] = field(default_factory=dict)  # tensor -> reason
    host_nodes: int = 0  # nodes the target leaves on the host
    warnings: list[str] = field(default_factory=list)


@dataclass
class Row:
    name: str
    family: str
    notes: str
    params_m: float
    samples: str
    runs: dict[str, Run] = field(default_factory=dict)  # dynamo / torchscript / onnxruntime
    error: str = ""  # the model itself could not be built or run in float

    def verdict(self) -> str:
        if self.error:
            return "fails: " + self.error
        peer = self.runs.get("onnxruntime")
        problems = []
        for exporter in EXPORTERS:
            run = self.runs.get(exporter)
            if run is None or not run.ok:
                problems.append(f"{exporter}: {run.error if run else 'not run'}")
                continue
            if run.violations:
                problems.append(f"{exporter}: {len(run.violations)} spec violations")
            if peer is not None and peer.ok:
                low = [k for k, v in run.sqnr.items() if k in peer.sqnr and v < peer.sqnr[k] - FLOOR_DB]
                if low:
                    problems.append(f"{exporter}: SQNR below onnxruntime - {FLOOR_DB:g} dB at {', '.join(low)}")
        return "pass" if not problems else "; ".join(problems)


def _short(exc: BaseException) -> str:
    """The exception's type and first line, and the innermost frame of our code or torch's that raised it."""
    text = str(exc).strip().splitlines()
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {text[0][:700] if text else ''}{where}"


def _sqnr(arch, reference: list[np.ndarray], outputs: list[np.ndarray], feeds: dict[str, np.ndarray]) -> dict[str, float]:
    from onnx_backend.qmath import sqnr_db

    out = {}
    real = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else None
    for name, ref, got in zip(arch.output_names, reference, outputs):
        if got.shape != ref.shape:
            raise ValueError(f"output {name!r} has shape {got.shape}, float has {ref.shape}")
        if real is not None:  # the real tokens only: what padding positions hold is nobody's output
            ref, got = ref[real], got[real]
        parts = arch.parts.get(name)
        if parts:
            for part, where in parts.items():
                out[f"{name}:{part}"] = round(float(sqnr_db(ref[..., where], got[..., where])), 2)
        else:
            out[name] = round(float(sqnr_db(ref, got)), 2)
    return out


def _run_default_session(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime's default session (all graph optimizations), one thread: what a user gets."""
    from .common import session

    return session(model).run(None, feeds)


def _ours(arch, model, calibration: list[dict], example: dict, feeds, reference, dynamo: bool) -> Run:
    import torchq

    run = Run()
    t0 = time.perf_counter()
    try:
        torchq.prepare(model, torchq.QuantConfig())
        try:
            torchq.calibrate(model, [b if arch.family == "hf" else tuple(b.values()) for b in calibration], quiet=True)
            args, kwargs = arch.export_args(example)
            qmodel, report = torchq.export_with_report(
                model, args, kwargs=kwargs or None, dynamo=dynamo, input_names=arch.input_names, output_names=arch.output_names, dynamic_axes=arch.dynamic_axes
            )
        finally:
            torchq.unprepare(model)
    except Exception as exc:  # the row says where and why
        run.error = "torchq: " + _short(exc)
        return run
    run.seconds = round(time.perf_counter() - t0, 1)
    run.float_tensors = dict(sorted(report.float_tensors.items()))
    run.host_nodes = len(report.backend.float_nodes)
    run.warnings = list(getattr(report.backend, "warnings", []))
    return _check_and_measure(run, arch, reference, qmodel, feeds, "torchq's model")


def _float_export(arch, model, example: dict, path: Path) -> str:
    """The float model onnxruntime's quantizer gets: the TorchScript exporter's (dynamo=False),
    opset 17, the fast one of the two; quant_pre_process optimizes it either way. Where TorchScript
    cannot export the float model (nn.MultiheadAttention's fused eval path, which torchq's hooks
    turn off), the dynamo exporter's. Returns which exporter wrote it."""
    import torch

    from .common import quiet

    try:
        _torchscript_export(arch, model, example, path)
        return "dynamo=False"
    except Exception:
        args, kwargs = arch.export_args(example)
        with quiet(), torch.no_grad():
            program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, opset_version=18, input_names=arch.input_names, output_names=arch.output_names, dynamic_axes=arch.dynamic_axes, optimize=True, verbose=False)
        program.save(str(path))
        return "dynamo"


def _torchscript_export(arch, model, example: dict, path: Path) -> None:
    import torch

    from .common import quiet

    from torchq.export import _KeywordAdapter  # tracing passes inputs positionally only, as torchq's own export does

    args, kwargs = arch.export_args(example)
    traced = model
    if kwargs:
        traced, args = _KeywordAdapter(model, list(kwargs)), args + tuple(kwargs.values())
    with quiet(), torch.no_grad():
        torch.onnx.export(traced, args, str(path), dynamo=False, opset_version=17, input_names=arch.input_names, output_names=arch.output_names, dynamic_axes=arch.dynamic_axes)


def _onnxruntime(arch, model, calibration: list[dict], example: dict, feeds, reference) -> Run:
    from .peers import ort_quantize

    run = Run()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exporter = _float_export(arch, model, example, Path(tmp) / "float.onnx")
            if exporter != "dynamo=False":
                run.warnings.append(f"the float model it quantizes comes from the {exporter} exporter (TorchScript cannot export it)")
        except Exception as exc:
            run.error = "float export: " + _short(exc)
            return run
        try:
            logging.getLogger().setLevel(logging.ERROR)  # its per-weight axis warnings on LayerNorm scales
            qmodel, run.seconds = ort_quantize(Path(tmp) / "float.onnx", [{k: v.numpy() for k, v in b.items()} for b in calibration], "MinMax", Path(tmp) / "ort.onnx")
        except Exception as exc:
            run.error = "quantize_static: " + _short(exc)
            return run
    run.seconds = round(run.seconds, 1)
    return _check_and_measure(run, arch, reference, qmodel, feeds, "its own model")


def _check_and_measure(run: Run, arch, reference, qmodel, feeds, whose: str) -> Run:
    """The spec violations of an INT8 model and its output SQNR in onnxruntime's default session."""
    from onnx_backend import validate

    run.violations = [str(v) for v in validate(qmodel)]
    try:
        run.sqnr = _sqnr(arch, reference, _run_default_session(qmodel, feeds), feeds)
        run.ok = True
    except Exception as exc:
        run.error = f"onnxruntime on {whose}: " + _short(exc)
    return run


@dataclass
class Case:
    """One architecture ready to measure: the float model, its data and its float outputs."""

    arch: object
    model: object
    calibration: list[dict]  # batches of BATCH inputs
    example: dict  # batch 1, for export
    feeds: dict[str, np.ndarray]  # evaluation inputs, disjoint from calibration's
    reference: list[np.ndarray]  # the float PyTorch model's outputs on feeds
    row: Row


def prepare(arch, quick: bool = False) -> Case:
    """Build the model and its data; `case.row.error` says why when that already fails."""
    import torch

    n_cal, n_eval = (QUICK_CALIBRATION_BATCHES, QUICK_EVALUATION) if quick else (CALIBRATION_BATCHES, EVALUATION)
    row = Row(arch.name, arch.family, arch.notes, 0.0, f"{n_cal * BATCH} calibration, {n_eval} evaluation inputs")
    calibration = [arch.inputs(BATCH, seed) for seed in range(n_cal)]
    evaluation = arch.inputs(n_eval, 1000)
    case = Case(arch, None, calibration, {k: v[:1] for k, v in evaluation.items()}, {k: v.numpy() for k, v in evaluation.items()}, [], row)
    try:
        case.model = arch.build()
    except Exception as exc:
        row.error = "build: " + _short(exc)
        return case
    row.params_m = round(sum(p.numel() for p in case.model.parameters()) / 1e6, 1)
    try:
        with torch.no_grad():
            case.reference = [t.numpy() for t in arch.outputs(arch.call(case.model, evaluation))]
    except Exception as exc:
        row.error = "float forward: " + _short(exc)
    return case


def run_tool(case: Case, tool: str) -> Run:
    args = (case.arch, case.model, case.calibration, case.example, case.feeds, case.reference)
    return _onnxruntime(*args) if tool == "onnxruntime" else _ours(*args, dynamo=tool == "dynamo")


def measure(arch, quick: bool = False, tools=(*EXPORTERS, "onnxruntime"), log=print) -> Row:
    case = prepare(arch, quick)
    if not case.row.error:
        for tool in tools:
            log(f"  {arch.name}: {tool}")
            case.row.runs[tool] = run_tool(case, tool)
    return case.row


# ---- cache and table ------------------------------------------------------------------------------


def _cache_path(name: str, quick: bool) -> Path:
    return CACHE / "compat" / ("quick" if quick else "full") / f"{name}.json"


def _load(name: str, quick: bool) -> Row | None:
    try:
        d = json.loads(_cache_path(name, quick).read_text())
    except (OSError, ValueError):
        return None
    d["runs"] = {k: Run(**v) for k, v in d["runs"].items()}
    return Row(**d)


def _save(row: Row, quick: bool) -> None:
    from onnx_backend.model_io import write_text_atomic

    path = _cache_path(row.name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(asdict(row), indent=1) + "\n")


def _sqnr_cell(row: Row, tool: str) -> str:
    run = row.runs.get(tool)
    if run is None:
        return "-"
    if not run.ok:
        return "fails"
    return "<br>".join(f"{k}: {v:.1f}" if len(run.sqnr) > 1 else f"{v:.1f}" for k, v in run.sqnr.items())


def _reasons(run: Run) -> str:
    counts = Counter(run.float_tensors.values())
    return "; ".join(f"{n} x {why}" if n > 1 else why for why, n in counts.most_common())


def render(rows: list[Row], command: str, minutes: float) -> str:
    passed = sum(r.verdict() == "pass" for r in rows)
    lines = [
        "# Compatibility: the architectures users bring",
        "",
        f"Generated by `{command}` ({minutes:.0f} minutes for the rows this run measured; each row is cached under bench/.cache/compat/ "
        f"until `--fresh`; the timed steps of all rows sum to {sum(x.seconds for r in rows for x in r.runs.values()) / 60:.0f} minutes on a loaded, "
        "shared 2-core machine, one thread: times are indicative). "
        f"{passed} of {len(rows)} models pass: with both torch exporters, 0 spec violations and every output's SQNR at least "
        f"onnxruntime `quantize_static`'s (QDQ, per-channel, MinMax, same calibration batches) - {FLOOR_DB:g} dB.",
        "",
        "Random weights with BatchNorm statistics from natural-photo crops (bench/compat_models.py), torchq's default "
        "configuration (target warboy) through its public API, SQNR (dB) of the INT8 model in onnxruntime's default session "
        "against the float PyTorch model on evaluation inputs disjoint from calibration's. Detectors: each raw head output, "
        "and each part of a concatenated one. `viol.`: the spec validator's count (dynamo / dynamo=False; onnxruntime's own model "
        "in the last column). `float`: tensors the report keeps in float (reasons below), `host`: nodes the target leaves on "
        "the host. Time: calibration + export + quantization (s), and onnxruntime's quantize_static.",
        "",
        "Random weights make deep networks sensitive to any perturbation, so the absolute SQNR of deep random-weight CNNs is "
        "low for every tool (a trained network's is higher); what the table judges is the difference to onnxruntime on the "
        "same model, calibration batches and evaluation inputs. HF models: SQNR over the real (unpadded) tokens.",
        "",
    ]
    head = ["model", "family", "params (M)", "SQNR dynamo", "SQNR dynamo=False", "SQNR onnxruntime", "viol.", "float", "host", "time (s)", "verdict"]
    body = []
    for r in rows:
        d, t, o = (r.runs.get(k) for k in (*EXPORTERS, "onnxruntime"))
        viol = " / ".join(str(len(x.violations)) if x and x.ok else "-" for x in (d, t, o))
        floats = " / ".join(str(len(x.float_tensors)) if x and x.ok else "-" for x in (d, t))
        host = " / ".join(str(x.host_nodes) if x and x.ok else "-" for x in (d, t))
        secs = " / ".join(f"{x.seconds:.0f}" if x and x.ok else "-" for x in (d, t, o))
        verdict = r.verdict()
        verdict = verdict if len(verdict) <= 160 else verdict[:160] + " ... (below)"  # the whole message is in the per-model notes
        body.append([r.name, r.family, f"{r.params_m:.1f}", _sqnr_cell(r, "dynamo"), _sqnr_cell(r, "torchscript"), _sqnr_cell(r, "onnxruntime"), viol, floats, host, secs, verdict])
    lines.append(table(head, body))
    details = []
    for r in rows:
        notes = [f"- **{r.name}** ({r.notes}; {r.samples})"]
        for tool, run in r.runs.items():
            if not run.ok:
                notes.append(f"  - {tool}: fails: {run.error}")
                continue
            if run.violations:
                notes.append(f"  - {tool}: {len(run.violations)} violations, e.g. {run.violations[0]}")
            if run.float_tensors and tool in EXPORTERS:
                notes.append(f"  - {tool}: float tensors: {_reasons(run)}")
            for w in run.warnings[:5]:
                notes.append(f"  - {tool}: warning: {w}")
        if r.error:
            notes.append(f"  - fails: {r.error}")
        details.append("\n".join(notes))
    lines += ["", "## Per model: failures, violations, float tensors, warnings", "", *details, ""]
    return "\n".join(lines)


def run_models(names: list[str], quick: bool, fresh: bool = False, log=print) -> list[Row]:
    from .compat_models import ARCHES

    rows = []
    for name in names:
        row = None if fresh else _load(name, quick)
        if row is None:
            log(f"[compatibility] {name}")
            t0 = time.perf_counter()
            row = measure(ARCHES[name], quick, log=log)
            log(f"[compatibility] {name}: {row.verdict()} ({time.perf_counter() - t0:.0f} s)")
            _save(row, quick)
        rows.append(row)
    return rows


SMOKE = ("resnet18", "hf_bert")  # bench.run --quick: the section's code runs, in seconds


def section_text(rows: list[Row], command: str, minutes: float = 0.0) -> str:
    """The section of BENCHMARKS.md: COMPATIBILITY.md without its title."""
    return render(rows, command, minutes).split("\n", 2)[2].replace("\n## Per model", "\n### Per model")


def run_section(settings, workdir, log=print) -> tuple[str, list[Row]]:
    """The `compatibility` section of `python -m bench.run`; the full run also writes
    docs/COMPATIBILITY.md. Quick mode measures SMOKE afresh (no cache)."""
    from .compat_models import ARCHES

    t0 = time.perf_counter()
    rows = run_models(list(SMOKE) if settings.quick else list(ARCHES), settings.quick, fresh=settings.quick, log=log)
    command = "python -m bench.run --only compatibility" + (" --quick" if settings.quick else "")
    minutes = (time.perf_counter() - t0) / 60
    if not settings.quick:
        from onnx_backend.model_io import write_text_atomic

        write_text_atomic(DOCS / "COMPATIBILITY.md", render(rows, command, minutes))
    return section_text(rows, command, minutes), rows


def main(argv: list[str] | None = None) -> int:
    from .compat_models import ARCHES, QUICK

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, choices=list(ARCHES), metavar="MODEL", help=f"default: all {len(ARCHES)} ({', '.join(ARCHES)})")
    parser.add_argument("--quick", action="store_true", help=f"the quick subset ({', '.join(QUICK)}), fewer samples")
    parser.add_argument("--fresh", action="store_true", help="measure again instead of taking cached rows")
    parser.add_argument("--out", default=None, help="markdown file ('-': print only; default docs/COMPATIBILITY.md, or out/COMPATIBILITY-quick.md with --quick)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    names = args.models or (QUICK if args.quick else list(ARCHES))
    command = ("python -m bench.compatibility " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    t0 = time.perf_counter()
    rows = run_models(names, args.quick, args.fresh, log=lambda m: print(m, flush=True))
    text = render(rows, command, (time.perf_counter() - t0) / 60)
    if args.out == "-":
        print(text)
        return 0
    from onnx_backend.model_io import write_text_atomic

    from .common import ROOT

    out = Path(args.out) if args.out else (ROOT / "out" / "COMPATIBILITY-quick.md" if args.quick else DOCS / "COMPATIBILITY.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
