"""ONNX-side calibration in constant memory, with the FuriosaAI SDK's API names.

onnxruntime runs the model with every float activation exposed as an extra output; each batch's
tensors are folded into streaming `TensorStatistics` at once and dropped, so peak memory is one
batch's activations plus O(bins) per tensor, whatever the number of samples. Shapes may differ
from sample to sample (variable batch, image size, sequence length).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import reprlib
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from tqdm import tqdm

from . import masks, model_io, sessions
from .errors import CalibrationError, ConfigError, InvalidModelError
from .parallel import cpus
from .range_selection import DEFAULT_PERCENTILE, DEFAULT_SQNR_GAMMA, Method, map_range_searches, select_range
from .statistics import DEFAULT_BINS, ChannelSums, NonFiniteError, TensorStatistics, channel_sums_of

RANGES_FORMAT = "torchq-ranges"
MAX_STACK = 256  # samples stacked into one onnxruntime call, at most
# Exposed activations per onnxruntime call. Runs about this size are 1.3-2x faster than one big
# run (fresh buffers of hundreds of MB cost page faults, and stay out of the cache): digits
# models, 256 samples, in docs/BENCHMARKS.md's calibration table.
RUN_BYTES = 12 << 20
OVERLAP_MAX_BYTES = 64 << 20  # larger runs do not overlap: memory before speed
STACK_RUNS = 8  # runs' worth of samples stacked and folded in together: runs overlap binning
RANGES_VERSION = 1


class CalibrationMethod(IntEnum):
    """The ten methods of the reference SDK (same names and values)."""

    MIN_MAX_ASYM = 0
    MIN_MAX_SYM = 1
    ENTROPY_ASYM = 2
    ENTROPY_SYM = 3
    PERCENTILE_ASYM = 4
    PERCENTILE_SYM = 5
    MSE_ASYM = 6
    MSE_SYM = 7
    SQNR_ASYM = 8
    SQNR_SYM = 9

    @property
    def method(self) -> Method:
        return Method(self.name.rsplit("_", 1)[0].lower())

    @property
    def symmetric(self) -> bool:
        return self.name.endswith("_SYM")

    @classmethod
    def from_parts(cls, method: str | Method, symmetric: bool) -> CalibrationMethod:
        return cls[f"{Method(method).name}_{'SYM' if symmetric else 'ASYM'}"]

    @classmethod
    def parse(cls, value: str | int | CalibrationMethod) -> CalibrationMethod:
        if isinstance(value, CalibrationMethod):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            allowed = ", ".join(m.name.lower() for m in cls)
            raise ConfigError(f"unknown calibration method {value!r}; allowed: {allowed}") from None


class Ranges(dict):
    """{tensor name: (min, max)} plus how they were chosen, and {tensor: (low, high)}: the mask
    values (statistics.MASK_MAGNITUDE) each tensor held, left out of its range (onnx_backend.masks),
    and {tensor: ChannelSums}: the per-channel sums whose means the analytic bias correction of
    the layers reading the tensor uses (onnx_backend.mean_correction)."""

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]] = (),
        *,
        method: str = "unknown",
        percentile: float | None = None,
        mask_values: Mapping[str, tuple[int, int]] | None = None,
        channel_sums: Mapping[str, ChannelSums] | None = None,
    ):
        super().__init__({k: (float(v[0]), float(v[1])) for k, v in dict(ranges).items()})
        self.method = method
        self.percentile = percentile
        self.mask_values = {k: (int(v[0]), int(v[1])) for k, v in dict(mask_values or getattr(ranges, "mask_values", {})).items()}
        self.channel_sums = dict(channel_sums if channel_sums is not None else getattr(ranges, "channel_sums", {}))

    def to_dict(self) -> dict:
        d = {
            "format": RANGES_FORMAT,
            "version": RANGES_VERSION,
            "method": self.method,
            "percentile": self.percentile,
            "ranges": {k: [v[0], v[1]] for k, v in sorted(self.items())},
        }
        if self.mask_values:
            d["mask_values"] = {k: {"low": lo, "high": hi} for k, (lo, hi) in sorted(self.mask_values.items())}
        if self.channel_sums:
            d["channel_sums"] = {k: v.to_dict() for k, v in sorted(self.channel_sums.items())}
        return d


def save_ranges(ranges: Mapping[str, tuple[float, float]], path: str | os.PathLike) -> Path:
    """Write ranges to JSON (.json) or YAML (.yaml/.yml), atomically."""
    r = ranges if isinstance(ranges, Ranges) else Ranges(ranges)
    path = Path(path)
    data = r.to_dict()
    text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=1) + "\n"
    return model_io.write_text_atomic(path, text)


def _parse_ranges_text(path: Path):
    """JSON with the json module; YAML with libyaml's safe loader when built in (pure-Python
    PyYAML takes seconds per MB), else yaml.SafeLoader. Never a loader that builds objects."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 -- a safe loader


def load_ranges(path: str | os.PathLike) -> Ranges:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such ranges file")
    try:
        data = _parse_ranges_text(path)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid JSON/YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (JSON or YAML expected)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a ranges file") from None
    if not isinstance(data, dict) or data.get("format") != RANGES_FORMAT:
        raise ConfigError(f"{path}: not a torchq ranges file (expected format: {RANGES_FORMAT})")
    if data.get("version") != RANGES_VERSION:
        raise ConfigError(f"{path}: ranges file version {data.get('version')!r}; this torchq reads version {RANGES_VERSION}")
    raw = data.get("ranges")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'ranges' must be a mapping of tensor name to [min, max]")
    out = {}
    for name, pair in raw.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_float32(x) for x in pair)) or pair[0] > pair[1]:
            shown = reprlib.repr(pair)  # bounded: a hostile file may nest millions of values here
            raise ConfigError(f"{path}: range of tensor {name!r} must be [min, max] of finite float32 numbers with min <= max, got {shown}")
        out[name] = (float(pair[0]), float(pair[1]))
    return Ranges(out, method=str(data.get("method", "unknown")), percentile=data.get("percentile"), mask_values=_mask_values_of(path, data.get("mask_values", {})), channel_sums=_channel_sums_of(path, data.get("channel_sums", {})))


def _mask_values_of(path: Path, raw) -> dict[str, tuple[int, int]]:
    """The optional `mask_values` of a ranges file ({tensor: {low: n, high: n}}; files written
    before it existed have none)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'mask_values' must be a mapping of tensor name to {{low: n, high: n}}")
    out = {}
    for name, v in raw.items():
        if not (isinstance(v, dict) and all(isinstance(v.get(k), int) and not isinstance(v.get(k), bool) and v.get(k) >= 0 for k in ("low", "high"))):
            raise ConfigError(f"{path}: mask_values of tensor {name!r} must be {{low: n, high: n}} with counts >= 0, got {reprlib.repr(v)}")
        out[name] = (v["low"], v["high"])
    return out


def _channel_sums_of(path: Path, raw) -> dict[str, ChannelSums]:
    """The optional `channel_sums` of a ranges file ({tensor: ChannelSums.to_dict()}; files
    written before they existed have none)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'channel_sums' must be a mapping of tensor name to {{ndim, axes}}")
    out = {}
    for name, v in raw.items():
        try:
            sums = ChannelSums.from_dict(v) if isinstance(v, dict) and isinstance(v.get("axes"), dict) else None
            valid = sums is not None and all(s.ndim == 1 and s.shape == sums.counts[a].shape and np.all(np.isfinite(s)) and np.all(sums.counts[a] >= 0) for a, s in sums.sums.items())
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError):
            valid = False
        if not valid:
            raise ConfigError(f"{path}: channel_sums of tensor {name!r} must be {{ndim: n, axes: {{axis: {{sums: [...], counts: [...]}}}}}} with finite sums and counts >= 0, got {reprlib.repr(v)}")
        out[name] = sums
    return out


def _is_float32(x) -> bool:
    """A number (not a bool) that is finite and within float32 range."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(float(x)) <= float(np.finfo(np.float32).max)


def get_pure_input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are not initializers (what a user feeds)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _elem_type(model: onnx.ModelProto) -> dict[str, int]:
    types = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of float32 activations: node outputs and pure inputs, in graph order."""
    try:
        inferred = model_io.infer_shapes(model)  # types only: a skeleton without the weights
    except Exception as exc:  # onnx raises InferenceError on types that contradict each other
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise InvalidModelError(f"shape inference fails on the model: {first}") from None
    types = _elem_type(inferred)
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = [i for i in get_pure_input_names(model) if types.get(i) == onnx.TensorProto.FLOAT]
    for n in model.graph.node:
        for o in n.output:
            if o and o not in consts and types.get(o) == onnx.TensorProto.FLOAT and n.op_type not in ("Constant",):
                names.append(o)
    return list(dict.fromkeys(names))


# Weights above this size reach onnxruntime as a temporary file, which it maps instead of holding
# a copy of them. ConvNeXt-B's 420 MiB: a calibration's peak RSS 1707 -> 1289 MiB, for runs 5-8 %
# slower and 0.7 s more to start (bench/scale.py, docs/reliability/scale_run9.txt).
SESSION_FROM_FILE_BYTES = 256 << 20

# Ops whose output holds exactly the values of their first input, rearranged: the same histogram.
VALUE_PRESERVING_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def value_sources(model: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, tuple[str, bool]]:
    """{tensor: (source, relu)} for the `tensors` whose values a chain of VALUE_PRESERVING_OPS and
    Relu makes from another of the `tensors` (nodes in graph order): they hold the source's
    values, or max(source, 0) where the chain has a Relu. The Calibrator observes only sources
    and folds the rest in from them: a quarter of a transformer's activations (its heads'
    reshapes and transposes) and a CNN's Relu outputs not copied out of onnxruntime, nor binned
    or searched twice."""
    candidates, sources = set(tensors), {}
    for node in model.graph.node:
        relu = node.op_type == "Relu"
        if (relu or node.op_type in VALUE_PRESERVING_OPS) and node.domain in ("", "ai.onnx") and node.input and node.input[0] in candidates:
            source, clipped = sources.get(node.input[0], (node.input[0], False))
            if node.output[0] in candidates:
                sources[node.output[0]] = (source, clipped or relu)
    return sources


def sample_feeds(sample, input_names: Sequence[str], index: int) -> dict[str, np.ndarray]:
    """One calibration sample -- a list of inputs in input order, a single array, or
    {input name: array} -- as {input name: array}, every input present (the one reading of a
    sample, for the Calibrator and the technique pipeline alike)."""
    if isinstance(sample, Mapping):
        feeds = {k: np.asarray(v) for k, v in sample.items()}
    else:
        sample = [sample] if isinstance(sample, np.ndarray) else list(sample)
        if len(sample) != len(input_names):
            raise CalibrationError(f"calibration sample {index} has {len(sample)} inputs; the model takes {len(input_names)} ({', '.join(input_names)})")
        feeds = {k: np.asarray(v) for k, v in zip(input_names, sample)}
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise CalibrationError(f"calibration sample {index} lacks model input(s) {missing}")
    return feeds
def weighted_layer_inputs(model: onnx.ModelProto) -> set[str]:
    """The activation inputs of the layers the analytic bias correction corrects."""
    return {node.input[0] for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul") and node.domain in ("", "ai.onnx") and node.input}


def _progress(iterable, desc: str, quiet: bool | None):
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    total = len(iterable) if hasattr(iterable, "__len__") else None
    return tqdm(iterable, desc=desc, total=total, disable=quiet, unit="sample", leave=False)


class Calibrator:
    """Collects the values of tensors in an ONNX model and computes their ranges.

    `collect_data` may be called several times; statistics accumulate. `compute_range` returns
    {tensor name: (min, max)} for every float activation that was observed.
    """

    def __init__(
        self,
        model: onnx.ModelProto | bytes | str,
        calibration_method: CalibrationMethod | str = CalibrationMethod.MIN_MAX_ASYM,
        *,
        percentage: float = DEFAULT_PERCENTILE,
        sqnr_gamma: float = DEFAULT_SQNR_GAMMA,
        histogram_bins: int = DEFAULT_BINS,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        quiet: bool | None = None,
        batch_samples: bool = True,
        copy_model: bool = False,
    ):
        # The Calibrator only reads the model, while it builds its session: it keeps the given
        # ModelProto itself (a copy only if its nodes must first be sorted), one model's size
        # less in memory (MiniLM: 0.07 s less). copy_model=True keeps a copy of its own.
        self.model = model_io.load_model(model, copy=True if copy_model else None)
        self.calibration_method = CalibrationMethod.parse(calibration_method)
        if not 0 < percentage <= 100:
            raise ConfigError(f"percentage must be in (0, 100], got {percentage}")
        self.percentage = float(percentage)
        if not (sqnr_gamma > 0 and math.isfinite(sqnr_gamma)):
            raise ConfigError(f"sqnr_gamma must be a finite number > 0, got {sqnr_gamma}")
        self.sqnr_gamma = float(sqnr_gamma)
        self.quiet = quiet
        self.batch_samples = batch_samples
        self.input_names = get_pure_input_names(self.model)
        self.tensors = activation_tensors(self.model)
        if not self.tensors:
            raise InvalidModelError("the model has no float32 activations to calibrate")
        self.statistics: dict[str, TensorStatistics] = {t: TensorStatistics(histogram_bins) for t in self.tensors}
        self._plan_observation()
        self.samples = 0
        self._session = self._make_session(providers)
        self._batchable = batch_samples and all(len(m.shape) > 0 and not isinstance(m.shape[0], int) for m in self._input_meta.values())
        self._activations_per_input_byte: float | None = None

    def _plan_observation(self) -> None:
        """Which tensors onnxruntime hands out (`_observed`), which get max(x, 0) statistics
        from one of them (`_relu_of`: source -> the tensor holding them), and which share another
        tensor's statistics (`_aliases`: tensor -> observed or Relu tensor)."""
        sources = value_sources(self.model, self.tensors)
        # A weighted layer's input is observed itself, unless it is a Relu of its source (the same
        # shape): its per-channel sums (the analytic bias correction's input means) are not those
        # of a tensor it was reshaped from.
        producer = {o: n for n in self.model.graph.node for o in n.output}
        for tensor in weighted_layer_inputs(self.model) & set(sources):
            source, _ = sources[tensor]
            node = producer.get(tensor)
            if not (node is not None and node.op_type == "Relu" and node.input[0] == source):
                del sources[tensor]
        self._observed = [t for t in self.tensors if t not in sources]
        # Each observed tensor stands for itself and the tensors made from it, all of its size:
        # runs are sized by every activation they compute, exposed or not (see _runs).
        made_from = collections.Counter(source for source, _ in sources.values())
        self._sizes_in_run = [1 + made_from[t] for t in self._observed]
        self._relu_of: dict[str, str] = {}
        self._aliases: dict[str, str] = {}
        for tensor, (source, relu) in sources.items():
            if relu and source not in self._relu_of:
                self._relu_of[source] = tensor
            else:
                self._aliases[tensor] = self._relu_of[source] if relu else source

    def _make_session(self, providers: Sequence[str]) -> ort.InferenceSession:
        """A session on the model with every tensor to calibrate as an extra output, built from the
        model's skeleton and its weights as arrays (model_io.split_weights): the model itself is
        neither changed nor serialized whole. onnxruntime copies the arrays into the session,
        unless they are large: then it maps them from a temporary file."""
        skeleton, weights = model_io.split_weights(self.model)
        outputs = {o.name for o in skeleton.graph.output}
        skeleton.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in self._observed if name not in outputs)
        with contextlib.ExitStack() as stack:
            source: bytes | str | None = None
            if sum(w.nbytes for w in weights.values()) >= SESSION_FROM_FILE_BYTES:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="torchq-calibration-", ignore_cleanup_errors=True))
                try:
                    source, weights = str(model_io.write_with_external_weights(skeleton, weights, folder)), {}  # the file holds them
                except OSError:
                    pass  # no room for them: in memory, as for small models
            session = self._session_for(source or skeleton.SerializeToString(), weights, providers)
        self._input_meta = {i.name: i for i in session.get_inputs()}
        return session

    @staticmethod
    def _session_for(source: bytes | str, weights: Mapping[str, np.ndarray], providers: Sequence[str]) -> ort.InferenceSession:
        """All of onnxruntime's graph optimizations (its fusions keep every graph output, so every
        exposed tensor, and its x86 conv layouts make the runs 1.5x faster: digits_resnet 0.26 ->
        0.16 s), or basic ones where a full optimization fails on a model."""
        # One core is left to the thread that bins the previous run's activations while
        # onnxruntime computes the next (see _fold): 1.2-1.5x faster on the bench's models.
        # Errors reach the user as one CalibrationError line, not as a log.
        for level in ("all", "basic"):
            options = sessions.session_options(level, threads=max(1, cpus() - 1), log_severity=4)
            if weights:
                options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
            try:
                return ort.InferenceSession(source, options, providers=list(providers))
            except Exception as exc:
                error = exc
        raise InvalidModelError(f"onnxruntime cannot load the model: {error}") from None

    def _feeds(self, sample) -> dict[str, np.ndarray]:
        feeds = sample_feeds(sample, self.input_names, self.samples)
        for name in self.input_names:
            feeds[name] = self._check_input(name, feeds[name])
        return {k: v for k, v in feeds.items() if k in self._input_meta}

    def _check_input(self, name: str, x: np.ndarray) -> np.ndarray:
        meta = self._input_meta[name]
        want = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}.get(meta.type)
        if want is not None and x.dtype != want:
            if want == np.float32 and x.dtype == np.float64:
                x = x.astype(np.float32)
            else:
                raise CalibrationError(f"input {name!r} of sample {self.samples}: dtype {x.dtype}, the model expects {np.dtype(want)}")
        if len(meta.shape) != x.ndim or any(isinstance(d, int) and d != s for d, s in zip(meta.shape, x.shape)):
            raise CalibrationError(f"input {name!r} of sample {self.samples}: shape {list(x.shape)}, the model expects {meta.shape}")
        return x

    def collect_data(self, calibration_dataset: Iterable[Sequence[np.ndarray] | Mapping[str, np.ndarray]]) -> None:
        """Run each sample (a list of inputs in input order, or {input name: array}) and fold it in.

        When the model's batch dimension is dynamic, consecutive samples whose shapes agree are
        stacked along it (up to STACK_RUNS runs' worth), and stacks or large samples are cut into
        runs whose exposed activations fill about RUN_BYTES: few onnxruntime calls for many small
        samples, cache-sized runs for large ones, and runs that overlap the binning (_fold). The
        statistics are the same either way (they count values, not batches); pass
        `batch_samples=False` to the Calibrator for a model that mixes samples across its batch
        axis.
        """
        pending: list[dict[str, np.ndarray]] = []
        seen = 0
        for sample in _progress(calibration_dataset, "calibrating", self.quiet):
            feeds = self._feeds(sample)
            if pending and not self._stackable(pending[0], feeds):
                self._fold(pending)
                pending = []
            pending.append(feeds)
            seen += 1
            if not self._batchable or len(pending) >= MAX_STACK or self._activation_bytes(pending) >= STACK_RUNS * RUN_BYTES:
                self._fold(pending)
                pending = []
        if pending:
            self._fold(pending)
        if seen == 0 and self.samples == 0:
            raise CalibrationError("the calibration dataset is empty")

    def _rows(self, feeds: Mapping[str, np.ndarray]) -> int | None:
        """The shared batch size of a sample's inputs, or None if they do not share one."""
        sizes = {a.shape[0] if a.ndim else None for a in feeds.values()}
        return sizes.pop() if len(sizes) == 1 else None

    def _stackable(self, first: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray]) -> bool:
        if not self._batchable or self._rows(first) is None or self._rows(feeds) is None:
            return False
        return all(first[n].shape[1:] == feeds[n].shape[1:] and first[n].dtype == feeds[n].dtype for n in self._input_meta)

    def _activation_bytes(self, pending: list[dict[str, np.ndarray]]) -> float:
        """Bytes of exposed activations that running `pending` would give (inf until measured,
        so the first sample runs alone and measures it)."""
        inputs = sum(a.nbytes for f in pending for a in f.values())
        return math.inf if self._activations_per_input_byte is None else inputs * self._activations_per_input_byte

    def _runs(self, pending: list[dict[str, np.ndarray]]):
        """`pending` stacked, then cut along the batch axis into runs of about RUN_BYTES."""
        feeds = pending[0] if len(pending) == 1 else {k: np.concatenate([f[k] for f in pending]) for k in pending[0]}
        rows = self._rows(feeds) if self._batchable else None
        if not rows:
            yield feeds
            return
        start = 0
        while start < rows:
            # Before the first run the activation size is unknown: one row measures it.
            per_row = self._activation_bytes([feeds]) / rows
            step = 1 if math.isinf(per_row) else rows if per_row == 0 else max(1, int(RUN_BYTES // per_row))
            yield {k: v[start : start + step] for k, v in feeds.items()}
            start += step

    def _fold(self, pending: list[dict[str, np.ndarray]]) -> None:
        """Run the samples in `pending` and fold their activations into the statistics.

        onnxruntime computes the next run in a worker thread (it releases the GIL) while this one
        bins the current run's activations, unless a run's activations exceed OVERLAP_MAX_BYTES
        (one row of a large model): then one run's activations at a time.
        """
        where = f"sample {self.samples}" if len(pending) == 1 else f"samples {self.samples}..{self.samples + len(pending) - 1}"
        staged = dict(self.statistics)
        runs = self._runs(pending)
        with ThreadPoolExecutor(max_workers=1) as pool:
            feeds = next(runs)
            future = pool.submit(self._session.run, self._observed, feeds)
            while future is not None:
                try:
                    outputs = future.result()
                except Exception as exc:
                    raise CalibrationError(f"onnxruntime failed on calibration {where}: {exc}") from None
                inputs, produced = sum(a.nbytes for a in feeds.values()), sum(o.nbytes * k for o, k in zip(outputs, self._sizes_in_run))
                if inputs:
                    self._activations_per_input_byte = produced / inputs
                feeds = next(runs, None)  # sized by the activations just measured
                future = None
                if feeds is not None and produced <= OVERLAP_MAX_BYTES:
                    future = pool.submit(self._session.run, self._observed, feeds)  # runs while these are binned
                self._update(staged, outputs, where)
                del outputs
                if feeds is not None and future is None:
                    future = pool.submit(self._session.run, self._observed, feeds)
        for alias, source in self._aliases.items():
            # shared: updates replace statistics, never change them; an alias's channels are not
            # its source's (a Reshape or Transpose moved them), so it keeps none
            staged[alias] = dataclasses.replace(staged[source], channels=ChannelSums())
        # One statement, no call in it: an interrupt (Ctrl-C) leaves every tensor with these
        # samples or none with them, and `samples` counting exactly the samples folded in.
        self.statistics, self.samples = staged, self.samples + len(pending)

    def _update(self, staged: dict[str, TensorStatistics], outputs: list[np.ndarray], where: str) -> None:
        for name, value in zip(self._observed, outputs):
            targets = [(name, False)] + ([(self._relu_of[name], True)] if name in self._relu_of else [])
            for target, relu in targets:
                stats = staged[target].sharing_counts()
                try:
                    stats.update(value, relu=relu)
                except NonFiniteError:
                    raise CalibrationError(f"tensor {name!r} holds NaN on calibration {where}") from None
                staged[target] = stats

    def compute_range(self, verbose: bool = False) -> Ranges:
        if self.samples == 0:
            raise CalibrationError("no calibration data collected; call collect_data first")
        method = self.calibration_method
        observed = [name for name, stats in self.statistics.items() if not stats.empty]
        searched = [name for name in observed if name not in self._aliases]  # an alias's range is its source's
        chosen = map_range_searches(lambda name: select_range(self.statistics[name], method.method, method.symmetric, percentile=self.percentage, sqnr_gamma=self.sqnr_gamma), searched, lambda _: (method.method, method.symmetric))
        ranges = dict(zip(searched, chosen))
        ranges = {name: ranges[self._aliases.get(name, name)] for name in observed}
        ranges = masks.keep_masking(self.model, self.statistics, ranges)
        if verbose:
            for name, (lo, hi) in ranges.items():
                print(f"{name}: [{lo:.6g}, {hi:.6g}]")
        return Ranges(ranges, method=method.name.lower(), percentile=self.percentage if method.method is Method.PERCENTILE else None, mask_values=masks.mask_counts(self.statistics), channel_sums=channel_sums_of(self.statistics))
