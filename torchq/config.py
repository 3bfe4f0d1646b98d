"""QuantConfig: one small typed object describes a quantization setting."""

from __future__ import annotations

import fnmatch
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from onnx_backend.errors import ConfigError
from onnx_backend.range_selection import DEFAULT_PERCENTILE, DEFAULT_SQNR_GAMMA
from onnx_backend.statistics import DEFAULT_BINS

MethodName = Literal["min_max", "percentile", "mse", "entropy", "sqnr"]
METHODS: tuple[str, ...] = ("min_max", "percentile", "mse", "entropy", "sqnr")
MethodOrAuto = Literal["min_max", "percentile", "mse", "entropy", "sqnr", "auto"]
DEFAULT_MAX_SAMPLES = 512
DEFAULT_MAX_SAMPLE_BYTES = 256 * 2**20
DEFAULT_OPSET = 20  # the TorchScript exporter's newest; every entry point starts from this one
Opset = Annotated[int, Field(ge=13, le=23)]  # per-axis Q/DQ needs 13


class Override(BaseModel):
    """Settings for the modules whose qualified name matches `pattern` (a glob)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    pattern: str
    method: MethodOrAuto | None = None
    symmetric: bool | None = None
    percentile: float | None = Field(default=None, gt=0, le=100)
    keep_float: bool = Field(default=False, alias="float")  # keep these modules in float


class QuantizationSettings(BaseModel):
    """Every QuantConfig field but `opset` and `target`: a recipe's `quantization` section is this
    class itself (opset sits in `export`, target at the top level), so each field and its default
    is defined once, here. See QuantConfig for what each field means."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MethodOrAuto = "mse"
    symmetric: bool = False
    percentile: float = Field(default=DEFAULT_PERCENTILE, gt=0, le=100)
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    histogram_bins: int = Field(default=DEFAULT_BINS, ge=256, le=1 << 16)
    sqnr_gamma: float = Field(default=DEFAULT_SQNR_GAMMA, gt=0)
    activation_dtype: Literal["int8", "uint8"] = "int8"
    optimize: bool = True
    mean_correction: bool = True
    equalization: bool = False
    equalization_clip: Literal["keep", "relu"] = "keep"
    bias_correction: bool = False
    adaround: bool = False
    adaround_iterations: int = Field(default=1000, ge=1, le=100_000)
    smoothquant: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"] | None = None
    attention_masks: bool = False
    max_samples: int = Field(default=DEFAULT_MAX_SAMPLES, ge=1)
    max_sample_bytes: int = Field(default=DEFAULT_MAX_SAMPLE_BYTES, ge=1)

    @field_validator("exclude", "exclude_nodes", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, v):
        return (v,) if isinstance(v, str) else v


class QuantConfig(QuantizationSettings):
    """How to quantize. Every field has a default; unknown fields are an error.

    method      range selection: min_max | percentile | mse | entropy | sqnr, or auto: per
                tensor, the method (of all ten, symmetric or not) whose range best preserves the
                outputs of the nodes reading the tensor on the calibration data
    symmetric   zero point 0 and [-a, a] (a never-negative tensor uses [0, a])
    percentile  for method=percentile: share of the mass kept (99.99 by default)
    per_channel per-output-channel weight scales (True) or one per tensor
    exclude     PyTorch module-path globs kept in float (e.g. "head.*"); torchq.prepare/export only:
                an ONNX model has no modules, so quantize_onnx refuses it (use exclude_nodes)
    exclude_nodes  ONNX node-name or op-type globs kept in float (e.g. "Softmax", "/head/*"), on
                either path: the nodes of the exported graph, or of the ONNX model given
    overrides   per-module method / symmetric / percentile / float, by glob; last match wins
                (PyTorch module paths, like exclude)
    opset       ONNX opset of the exported model (>= 13)
    target      the NPU whose op support decides what runs in int8: "warboy", "tflite", or None
    activation_dtype  int8 (the spec, the NPU) or uint8: the same grid with zero points + 128,
                which onnxruntime needs on x86 to run every quantized op in integer kernels
    histogram_bins  resolution of the streaming histograms
    optimize    fold BatchNorm, fuse activations and fold constants (onnx_backend.optimize) before
                the graph is calibrated and quantized; False: the graph as exported or given
    sqnr_gamma  weight of clipping noise in the sqnr method (1 would make it mse)
    mean_correction  analytic bias correction (on by default): each layer's bias takes out the
                shift of its output mean that rounding its weights causes, (W_q - W) E[x], from
                the per-channel means of its input gathered during calibration (no extra pass)

    Accuracy techniques (docs/ACCURACY.md), all off by default:
    equalization     cross-layer equalization + high-bias absorption of Conv/Linear pairs
    equalization_clip  "keep": pairs joined by ReLU6 / Clip(0, c) are left alone (the float function
                     is preserved exactly); "relu": such a Clip becomes a Relu so the pair can be
                     equalized, as AIMET does (changes the function wherever a pre-activation
                     exceeded c; the report gives the share of calibration values that did)
    bias_correction  empirical bias correction of each layer's quantization-induced mean shift
    adaround         learned up/down rounding of weights, layer by layer (PyTorch autograd)
    adaround_iterations  optimization steps per layer
    smoothquant      SmoothQuant for Linear layers after LayerNorm / Linear: alpha in (0, 1), or
                     "auto" to choose alpha per layer on the calibration data
    attention_masks  recalibrate so that additive attention masks (values <= -1e4 or -inf added
                     before a Softmax) do not set ranges; on whenever a technique above is on
    max_samples, max_sample_bytes  with any technique on (or method auto), `prepare` keeps up to
                     this many calibration samples (items along the batch axis) and bytes of
                     model inputs, from the first batches; `export` recalibrates on them
    """

    opset: Opset = DEFAULT_OPSET
    target: str | None = "warboy"

    @property
    def needs_samples(self) -> bool:
        """Whether a data-driven technique is on, so `prepare` keeps calibration samples."""
        methods = {self.method} | {o.method for o in self.overrides}
        return self.equalization or self.bias_correction or self.adaround or self.smoothquant is not None or self.attention_masks or "auto" in methods

    def check_for_onnx_model(self) -> None:
        """The ONNX path has nodes, not modules: module globs there would silently match nothing."""
        named = [name for name in ("exclude", "overrides") if getattr(self, name)]
        if named:
            raise ConfigError(
                f"QuantConfig.{' and '.join(named)} name PyTorch module paths, and an ONNX model has no modules; "
                "keep ONNX nodes in float with exclude_nodes=[...] (node-name or op-type globs, e.g. exclude_nodes=['Softmax'])"
            )

    def settings_for(self, module_path: str) -> dict:
        """method / symmetric / percentile / float for a module, after overrides."""
        s = {"method": self.method, "symmetric": self.symmetric, "percentile": self.percentile, "float": False}
        if any(fnmatch.fnmatchcase(module_path, p) for p in self.exclude):
            s["float"] = True
        for o in self.overrides:
            if fnmatch.fnmatchcase(module_path, o.pattern):
                s.update({k: v for k, v in o.model_dump(exclude={"pattern", "keep_float"}).items() if v is not None})
                s["float"] = s["float"] or o.keep_float
        return s


def make_config(config: QuantConfig | dict | None = None, **kwargs) -> QuantConfig:
    """A QuantConfig from an instance, a dict, or keyword arguments, with clear errors."""
    if isinstance(config, QuantConfig) and not kwargs:
        return config
    data = dict(config.model_dump() if isinstance(config, QuantConfig) else (config or {}))
    data.update(kwargs)
    try:
        return QuantConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "QuantConfig")) from None


def format_validation_error(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"{where}: {loc}: {msg}")
    return "\n".join(lines)
