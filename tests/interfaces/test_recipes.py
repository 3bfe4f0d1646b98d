"""YAML recipes: schema, composition, overrides, clear errors, and real end-to-end runs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
import yaml

import torchq
from onnx_backend import assert_valid
from onnx_backend.errors import ConfigError, TorchqError
from torchq.recipes import MAX_DEPTH, QuantizationSection, Recipe, RecipeError, RecipeSpec

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


CALIBRATION = 'calibration: {loader: "torchq.examples.digits:calibration_loader", kwargs: {num_samples: 64}}\n'
MINIMAL = 'model: {factory: "torchq.examples.digits:build_model"}\n' + CALIBRATION


# ---- the shipped recipes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")))
def test_every_shipped_recipe_validates_and_names_code_that_exists(name, monkeypatch):
    from torchq.recipes import resolve_import

    recipe = Recipe.load(RECIPES / name)
    assert recipe.quant_config().method in ("min_max", "percentile", "mse", "entropy", "sqnr")
    monkeypatch.syspath_prepend(str(ROOT))  # as `torchq quantize` run from the repository root
    spec = recipe.spec
    paths = {"model.factory": spec.model and spec.model.factory, "calibration.loader": spec.calibration and spec.calibration.loader}
    paths["evaluation.function"] = spec.evaluation and spec.evaluation.function
    for key, path in paths.items():
        if path and not path.startswith("mypackage."):  # the template's placeholders
            assert callable(resolve_import(path, key, name))
    if name.startswith("bench/") and name != "bench/digits_base.yaml":  # a benchmark job: complete
        assert spec.model and spec.calibration and spec.export.path.startswith("out/bench/")


def test_template_documents_every_key_with_its_default():
    template = yaml.safe_load((RECIPES / "template.yaml").read_text())
    spec = RecipeSpec.model_validate(template)

    def check(model_cls, data, where):
        keys = {(f.alias or n) for n, f in model_cls.model_fields.items()}
        assert set(data) == keys, f"{where}: template keys differ from the schema"

    from torchq.recipes import CalibrationSection, EvaluationSection, ExportSection, ModelSection, QATSection

    check(RecipeSpec, template, "<root>")
    for name, cls in (("model", ModelSection), ("calibration", CalibrationSection), ("quantization", QuantizationSection), ("export", ExportSection), ("evaluation", EvaluationSection), ("qat", QATSection)):
        check(cls, template[name], name)
    # the values shown are the defaults (except the placeholders a user must fill in)
    assert spec.quantization == QuantizationSection()
    assert spec.qat == QATSection()
    defaults = RecipeSpec.model_fields["export"].default
    assert spec.export.model_copy(update={"path": None}) == defaults
    assert spec.target == RecipeSpec.model_fields["target"].default


def test_extends_deep_merges_and_resolves_paths_relative_to_each_file(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "base.yaml", CALIBRATION + "model: {factory: 'torchq.examples.digits:build_model', checkpoint: w.pt}\nquantization: {method: entropy, symmetric: true, exclude: [a]}\n")
    child = write(tmp_path / "child.yaml", "extends: base/base.yaml\nquantization: {symmetric: false, exclude: [b]}\n")
    r = Recipe.load(child)
    q = r.spec.quantization
    assert (q.method, q.symmetric, q.exclude) == ("entropy", False, ("b",))  # merged; the list replaced
    assert Path(r.spec.model.checkpoint) == tmp_path / "base" / "w.pt"  # relative to base.yaml
    assert [f.name for f in r.files] == ["base.yaml", "child.yaml"]


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: [c.yaml]\n")
    write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match=r"extends forms a cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        Recipe.load(tmp_path / "a.yaml")


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL + "quantization: {overrides: [{pattern: head, method: mse}]}\n")
    r = Recipe.load(path, overrides=["quantization.method=percentile", "quantization.percentile=99.9", "quantization.overrides.0.float=true", "target=null", "calibration.num_batches=3"])
    cfg = r.quant_config()
    assert (cfg.method, cfg.percentile, cfg.target, r.spec.calibration.num_batches) == ("percentile", 99.9, None, 3)
    assert cfg.overrides[0].keep_float and cfg.settings_for("head")["float"]
    with pytest.raises(RecipeError, match=r"--set quantization.method=kl: quantization.method: Input should be 'min_max', 'percentile', 'mse', 'entropy', 'sqnr' or 'auto' \(got 'kl'\)"):
        Recipe.load(path, overrides=["quantization.method=kl"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        Recipe.load(path, overrides=["quantization.method"])


# ---- errors name the file, the line, the key and what is allowed -------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ("quantization: {methd: mse}", r"r\.yaml:3: quantization\.methd: unknown key; allowed keys: method, symmetric, percentile, per_channel, exclude, exclude_nodes, overrides, histogram_bins, sqnr_gamma"),
        ("quantization: {method: minmax}", r"r\.yaml:3: quantization\.method: Input should be 'min_max', 'percentile', 'mse', 'entropy', 'sqnr' or 'auto' \(got 'minmax'\)"),
        ("quantization: {per_channel: maybe}", r"quantization\.per_channel: Input should be a valid boolean.*\(got 'maybe'\)"),
        ("quantization: {percentile: 120}", r"quantization\.percentile: Input should be less than or equal to 100 \(got 120\)"),
        ("quantization: {overrides: [{pattern: a, flot: true}]}", r"quantization\.overrides\.0\.flot: unknown key; allowed keys: pattern, method, symmetric, percentile, float"),
        ("target: npu9000", r"target: unknown target 'npu9000'; allowed: tflite, warboy, null"),
        ("export: {exporter: onnx}", r"export\.exporter: Input should be 'dynamo' or 'torchscript' \(got 'onnx'\)"),
        ("export: {opset: 11}", r"export\.opset: Input should be greater than or equal to 13 \(got 11\)"),
        ("evaluation: {function: not-an-import-path}", r"evaluation\.function: must be an import path 'package\.module:attribute', got 'not-an-import-path'"),
        ("colour: red", r"r\.yaml:3: colour: unknown key; allowed keys: name, description, model, calibration, quantization, target, export, evaluation, qat, extends"),
    ],
)
def test_bad_values_name_file_line_key_and_allowed_values(tmp_path, body, message):
    path = write(tmp_path / "r.yaml", MINIMAL + body + "\n")
    with pytest.raises(RecipeError, match=message):
        Recipe.load(path)


def test_an_error_in_a_base_file_names_that_file(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL + "quantization:\n  method: bogus\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: x\n")
    with pytest.raises(RecipeError, match=r"base\.yaml:4: quantization\.method"):
        Recipe.load(child)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the recipe is empty"),
        ("- a\n- b\n", "a recipe is a mapping of keys"),
        ("model: {factory: a:b\n", "not valid YAML"),
        ("name: a\nname: b\n", r"r\.yaml:2: duplicate key 'name'"),
        ("!!python/object/apply:os.system [echo hacked]\n", "not valid YAML"),
        ("a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n", "nested more than"),
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]\n", "recipe too large"),
    ],
)
def test_malformed_and_hostile_files_are_clear_errors(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.load(write(tmp_path / "r.yaml", text))


def test_missing_file_and_oversized_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        Recipe.load(tmp_path / "nope.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(RecipeError, match="a recipe is at most"):
        Recipe.load(big)


@pytest.mark.parametrize(
    "factory, message",
    [
        ("no_such_package_xyz:build", "cannot import 'no_such_package_xyz' \\(no module named 'no_such_package_xyz'"),
        ("torchq.examples.digits:no_such_function", "'torchq.examples.digits' has no attribute 'no_such_function'"),
        ("torchq.examples.digits:SEED", "is not a function or class \\(it is of type int\\)"),
        ("torchq.examples.digits:test_set", "returned a tuple, not a torch.nn.Module"),
        ("torchq.examples.digits:load_data", "returned a dict, not a torch.nn.Module"),
    ],
)
def test_bad_import_paths_are_clear_errors(tmp_path, factory, message):
    path = write(tmp_path / "r.yaml", CALIBRATION + f"model: {{factory: '{factory}'}}\n")
    with pytest.raises(RecipeError, match=message):
        Recipe.load(path).run(tmp_path / "m.onnx", quiet=True)


def test_failures_inside_recipe_code_name_the_key(tmp_path):
    path = write(tmp_path / "r.yaml", CALIBRATION + "model: {factory: 'torchq.examples.digits:build_model', kwargs: {depth: 3}}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:2: model\.factory: build_model raised TypeError: .*unexpected keyword argument 'depth' \(check model\.kwargs\)"):
        Recipe.load(path).run(tmp_path / "m.onnx", quiet=True)
    assert not (tmp_path / "m.onnx").exists()


def test_a_job_without_model_or_calibration_says_which_section_is_missing(tmp_path):
    path = write(tmp_path / "r.yaml", "quantization: {method: mse}\n")
    with pytest.raises(RecipeError, match="model: this job needs a 'model' section"):
        Recipe.load(path).run(tmp_path / "m.onnx")


# ---- checkpoints -------------------------------------------------------------------------------------


def test_checkpoint_is_loaded_with_weights_only(tmp_path):
    from torchq.examples import digits

    trained = digits.build_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}, tmp_path / "w.ckpt")
    path = write(tmp_path / "r.yaml", CALIBRATION + "model: {factory: 'torchq.examples.digits:build_model', checkpoint: w.ckpt, checkpoint_key: state_dict, strip_prefix: model.}\n")
    from torchq.recipe_run import build_model

    r = Recipe.load(path)
    model = build_model(r.spec.model, r.where)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))

    # without checkpoint_key the error says what to set
    path2 = write(tmp_path / "r2.yaml", CALIBRATION + "model: {factory: 'torchq.examples.digits:build_model', checkpoint: w.ckpt}\n")
    with pytest.raises(RecipeError, match="set model.checkpoint_key: state_dict"):
        build_model(Recipe.load(path2).spec.model, "r2.yaml")

    # a pickle that is not plain tensors is refused by torch.load(weights_only=True)
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    path3 = write(tmp_path / "r3.yaml", CALIBRATION + "model: {factory: 'torchq.examples.digits:build_model', checkpoint: evil.pt}\n")
    with pytest.raises(RecipeError, match=r"cannot load .*evil\.pt with torch\.load\(weights_only=True\)"):
        build_model(Recipe.load(path3).spec.model, "r3.yaml")


# ---- running -----------------------------------------------------------------------------------------


def test_digits_recipe_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe writes under out/ relative to the working directory
    r = Recipe.load(RECIPES / "digits.yaml", overrides=["calibration.kwargs.num_samples=96"])
    result = r.run(quiet=True)
    assert result.onnx_path == Path("out/digits/digits.int8.onnx") and result.onnx_path.is_file()
    qmodel = onnx.load(result.onnx_path)
    assert_valid(qmodel)
    assert [i.name for i in qmodel.graph.input] == ["image"] and [o.name for o in qmodel.graph.output] == ["logits"]
    assert result.calibration_batches == 3
    assert result.float_metric > 90 and abs(result.int8_metric - result.float_metric) < 2.0
    report = json.loads(Path("out/digits/digits.int8.report.json").read_text())
    assert report["metric"]["int8"] == result.int8_metric and report["spec_check"] == []
    assert report["recipe"]["calibration"]["kwargs"]["num_samples"] == 96
    assert "## Accuracy" in Path("out/digits/digits.int8.report.md").read_text()


def test_composed_recipe_applies_overrides_and_float_modules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = Recipe.load(RECIPES / "digits_percentile_sym.yaml", overrides=["calibration.num_batches=2", "evaluation=null", "export.path=m.onnx"])
    result = r.run(quiet=True)
    assert_valid(onnx.load(result.onnx_path))
    assert result.float_metric is None and result.calibration_batches == 2
    report = json.loads(Path("m.report.json").read_text())
    assert report["recipe"]["export"]["exporter"] == "torchscript"
    # the head (a Gemm) stays in float by the recipe's override
    assert any(why == "excluded by configuration" for why in report["quantization"]["float_nodes"].values())


def test_python_api_matches_the_cli_recipe(tmp_path):
    r = torchq.Recipe.from_dict(yaml.safe_load(MINIMAL), overrides=["calibration.num_batches=1", f"export.path={tmp_path / 'x.onnx'}"])
    result = r.run(quiet=True)
    assert_valid(onnx.load(result.onnx_path))
    assert result.calibration_batches == 1


def test_recipe_errors_are_torchq_errors():
    assert issubclass(RecipeError, ConfigError) and issubclass(RecipeError, TorchqError)


def test_the_docs_list_every_key():
    from torchq.recipes import CalibrationSection, EvaluationSection, ExportSection, ModelSection, QATSection

    text = (ROOT / "docs" / "INTERFACES.md").read_text()
    keys = [f"`{n}`" for n in RecipeSpec.model_fields if n not in ("model", "calibration", "quantization", "export", "evaluation")] + ["`extends`"]
    for section, cls in (("model", ModelSection), ("calibration", CalibrationSection), ("quantization", QuantizationSection), ("export", ExportSection), ("evaluation", EvaluationSection), ("qat", QATSection)):
        keys += [f"`{section}.{f.alias or n}`" for n, f in cls.model_fields.items()]
    missing = [k for k in keys if f"| {k} |" not in text]
    assert not missing, f"docs/INTERFACES.md lacks rows for {missing}"


def test_a_pattern_that_changes_nothing_is_reported(tmp_path, monkeypatch):
    # features.0 is the first conv: fused with its BatchNorm and ReLU, it computes no tensor of the
    # model any more (the ReLU, features.2, does); an override for it would silently do nothing.
    monkeypatch.chdir(tmp_path)
    r = Recipe.load(RECIPES / "digits.yaml", overrides=["calibration.num_batches=1", "evaluation=null", "export.path=m.onnx", "quantization.overrides=[{pattern: features.0, method: min_max}, {pattern: 'features.[25]', method: min_max}]", "quantization.exclude=[head]"])
    result = r.run(quiet=True)
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("quantization.overrides.0 (pattern 'features.0') matched no module") and "features.2" in result.warnings[0]
    assert "warning:" in "\n".join(result.summary_lines())
    assert json.loads(Path("m.report.json").read_text())["warnings"] == result.warnings


def test_recipes_carry_the_accuracy_techniques(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL + "quantization: {method: auto, equalization: true, bias_correction: true, smoothquant: auto}\n")
    cfg = Recipe.load(path, overrides=["quantization.adaround=true", "quantization.smoothquant=0.5"]).quant_config()
    assert (cfg.method, cfg.equalization, cfg.bias_correction, cfg.adaround, cfg.smoothquant) == ("auto", True, True, True, 0.5)
    assert cfg.needs_samples
    with pytest.raises(RecipeError, match="quantization.smoothquant"):
        Recipe.load(path, overrides=["quantization.smoothquant=1.5"])
