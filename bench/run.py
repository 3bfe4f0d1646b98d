"""Regenerate docs/BENCHMARKS.md and its plots: `python -m bench.run [--quick] [--out DIR]`.

Sections (each also runnable alone with --only): imagenet (ImageNet-pretrained EfficientNet-Lite0 /
Lite1 on natural-photo crops, issue 16), accuracy (issue 6), seed (the reference
product's families), onnx (issue 3: ONNX path vs onnxruntime), zoo (issue 2: latency), robustness
(issue 18: the ten methods on real OCR models and a hard-swish net), compatibility (issue 16: torchvision,
timm, detection heads and HF transformers through both exporters -> also docs/COMPATIBILITY.md), qat (issue 20:
quantization-aware fine-tuning of MiniLM and EfficientNet-Lite0).
--quick runs tiny settings (the test suite uses it) and writes to out/bench-quick by default,
never over docs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .common import DOCS, ROOT, Settings  # noqa: E402

SECTIONS = ("imagenet", "accuracy", "seed", "onnx", "zoo", "robustness", "compatibility", "qat")


def _machine() -> str:
    import onnxruntime
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible; Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):  # vars, not asdict: rows cached by an older version may lack new fields
        return {k: _jsonable(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else "/".join(map(str, k)) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    if hasattr(obj, "item"):
        return obj.item()
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)


def _save_section(workdir: Path, name: str, text: str, result, seconds: float) -> None:
    import pickle

    from onnx_backend.model_io import atomic_output

    path = workdir / "sections" / f"{name}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # a staging name of its own: two runs at once never share one
        tmp.write_bytes(pickle.dumps((text, result, seconds, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))))


def _load_section(workdir: Path, name: str):
    """A section saved by an earlier run of this checkout (our own cache file, not user input)."""
    import pickle

    path = workdir / "sections" / f"{name}.pkl"
    try:
        saved = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, AttributeError, EOFError):
        return None
    if len(saved) == 4:
        return saved
    return (*saved, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime)))


def _rerender(name: str, result, text: str) -> str:
    """A cached section's markdown from its measurements, with the current rendering code."""
    from . import accuracy, compatibility, imagenet, onnx_path, robustness, seed, zoo_latency

    try:
        if name == "compatibility":
            return compatibility.section_text(result, "python -m bench.run --only compatibility")
        if name == "imagenet":
            return imagenet.render(result, "python -m bench.run --only imagenet")
        if name == "robustness":
            return robustness.render_models(result)
        if name == "accuracy":
            return accuracy.render(result)
        if name == "seed":
            return seed.render(result)
        if name == "onnx":
            return onnx_path.render(result["rows"], result["memory"], result.get("memory_model", onnx_path.MEMORY_MODEL + ".float.onnx"))
        if name == "zoo":
            return zoo_latency.render(result)
        if name == "qat":
            from . import qat

            return qat.render(result, "python -m bench.run --only qat")
    except Exception as exc:  # an old cache the current code cannot render: keep its text
        print(f"cannot re-render {name} from the cache ({type(exc).__name__}: {exc}); keeping its old text", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds to a minute); writes to out/bench-quick")
    parser.add_argument("--out", type=Path, default=None, help="where BENCHMARKS.md and bench/ go (default: docs/, or out/bench-quick with --quick)")
    parser.add_argument("--render", action="store_true", help="measure nothing: rebuild the report and plots from the last run's cached sections")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections (repeatable); the others are taken from the last run's cache")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    settings = Settings.make(args.quick)
    out = args.out or (ROOT / "out" / "bench-quick" if args.quick else DOCS)
    workdir = settings.cache / "work"
    (out / "bench").mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    sections = [] if args.render else args.only or list(SECTIONS)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    from . import accuracy, compatibility, imagenet, onnx_path, plots, report, robustness, seed, zoo_latency

    results: dict = {}
    texts: dict[str, str] = {}
    section_time: dict[str, float] = {}
    stamps: dict[str, str] = {}  # sections taken from an earlier run's cache: when they were measured
    for name in sections:
        t0 = time.perf_counter()
        if name == "imagenet":
            texts[name], results[name] = imagenet.run_section(settings, workdir, log)
        elif name == "accuracy":
            texts[name], results[name] = accuracy.run_section(settings, workdir, log)
        elif name == "seed":
            texts[name], results[name] = seed.run_section(settings, workdir, log)
        elif name == "onnx":
            texts[name], results[name] = onnx_path.run_section(settings, workdir, [s for s in accuracy.subjects(settings) if "unpadded" not in s.name], log)
        elif name == "zoo":
            texts[name], results[name] = zoo_latency.run_section(settings, workdir, log)
        elif name == "robustness":
            texts[name], results[name] = robustness.run_section(settings, workdir, log)
        elif name == "compatibility":
            texts[name], results[name] = compatibility.run_section(settings, workdir, log)
        elif name == "qat":
            from . import qat

            texts[name], results[name] = qat.run_section(settings, workdir, log)
        section_time[name] = time.perf_counter() - t0
        log(f"section {name} done in {section_time[name]:.0f} s")
        _save_section(workdir, name, texts[name], results[name], section_time[name])
    if args.only or args.render:  # the other sections as the last full run left them, so the report stays whole
        for name in SECTIONS:
            if name not in texts and (saved := _load_section(workdir, name)) is not None:
                texts[name], results[name], section_time[name], stamps[name] = saved
                texts[name] = _rerender(name, results[name], texts[name])

    figures = plots.make(results, out / "bench")
    command = "python -m bench.run" + (" --quick" if args.quick else "") + "".join(f" --only {s}" for s in args.only or [])
    if args.render or args.only:
        seconds_total = sum(section_time.values())
    else:
        seconds_total = time.perf_counter() - started
    text = report.assemble(texts, figures, command=command, machine=_machine(), seconds=seconds_total, section_time=section_time, quick=args.quick, results=results, stamps=stamps)
    from onnx_backend.model_io import write_text_atomic

    write_text_atomic(out / "BENCHMARKS.md", text)
    write_text_atomic(out / "bench" / "results.json", json.dumps(_jsonable(results), indent=1, ensure_ascii=False) + "\n")
    log(f"wrote {out / 'BENCHMARKS.md'} and {out / 'bench'}/ in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
