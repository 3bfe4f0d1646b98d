"""Hostile recipes through `torchq quantize --recipe`: wrong types, unknown keys, nesting and
size bombs, broken `extends`, import paths, misbehaving user code, hostile checkpoints, bad
outputs. Each gets exit 2 with one clear line naming the problem, no traceback, no output."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import onnx
import pytest
import torch
import yaml

from onnx_backend import validate
from tests.reliability.cli_harness import files_in, judge, run_cli
from tests.reliability.recipe_targets import base_recipe

T = "tests.reliability.recipe_targets"


def _run(folder: Path, recipe: dict | str | bytes, *extra: str) -> tuple[object, str | None]:
    path = folder / "recipe.yaml"
    if isinstance(recipe, dict):
        path.write_text(yaml.safe_dump(recipe))
    elif isinstance(recipe, str):
        path.write_text(recipe)
    else:
        path.write_bytes(recipe)
    before = files_in(folder)
    result = run_cli(["quantize", "--recipe", str(path), *extra])
    outputs = [] if "--check" in extra else [folder / "out.onnx"]
    return result, judge(result, outputs, before, folder)


def _edit(**changes):
    """A recipe edit: dotted key -> value (None deletes the key)."""

    def apply(r: dict) -> dict:
        for key, value in changes.items():
            node, parts = r, key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            if value is _DELETE:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
        return r

    return apply


_DELETE = object()

# name -> (edit of the base recipe, expected message); validated with --check (nothing runs)
INVALID = {
    "unknown_top_level_key": (_edit(modle={"factory": "x:y"}), r"modle: unknown key; allowed keys: name, description, model"),
    "unknown_nested_key": (_edit(**{"quantization.methd": "mse"}), r"quantization\.methd: unknown key; allowed keys: method"),
    "method_is_a_number": (_edit(**{"quantization.method": 5}), r"quantization\.method: .*'min_max'.*\(got 5\)"),
    "method_unknown": (_edit(**{"quantization.method": "kl"}), r"quantization\.method: .*\(got 'kl'\)"),
    "num_batches_is_text": (_edit(**{"calibration.num_batches": "ten"}), r"calibration\.num_batches: .*integer.*\(got 'ten'\)"),
    "num_batches_negative": (_edit(**{"calibration.num_batches": -1}), r"calibration\.num_batches: .*greater than or equal to 1"),
    "opset_out_of_range": (_edit(**{"export.opset": 99}), r"export\.opset: .*less than or equal to 23"),
    "percentile_out_of_range": (_edit(**{"quantization.percentile": 200}), r"quantization\.percentile: .*less than or equal to 100"),
    "bins_huge": (_edit(**{"quantization.histogram_bins": 10**12}), r"quantization\.histogram_bins"),
    "section_is_a_list": (_edit(quantization=[1, 2]), r"quantization: .*valid dictionary"),
    "exporter_unknown": (_edit(**{"export.exporter": "onnx2"}), r"export\.exporter"),
    "factory_without_colon": (_edit(**{"model.factory": "os.system"}), r"model\.factory: must be an import path 'package\.module:attribute'"),
    "factory_with_code": (_edit(**{"model.factory": "os:system; rm -rf /"}), r"model\.factory: must be an import path"),
    "device_unknown": (_edit(**{"calibration.device": "gpu9000"}), r"calibration\.device: not a torch device"),
    "target_unknown": (_edit(target="tpu"), r"target: unknown target 'tpu'"),
    "override_without_pattern": (_edit(**{"quantization.overrides": [{"method": "mse"}]}), r"quantization\.overrides\.0\.pattern: Field required"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_recipe_values(name, tmp_path):
    edit, expected = INVALID[name]
    result, verdict = _run(tmp_path, edit(base_recipe(tmp_path)), "--check")
    assert verdict is None, verdict
    assert result.code == 2 and re.search(expected, result.stderr), result.stderr
    assert "recipe.yaml" in result.stderr  # the file (and line) that set the key


def _nested(depth: int) -> str:
    return "name: tiny\ndescription: " + "{a: " * depth + "1" + "}" * depth + "\n"


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh"))

# name -> (file content, expected message)
MALFORMED = {
    "not_yaml": ("model: [\n", r"not valid YAML"),
    "empty": ("", r"the recipe is empty"),
    "a_list": ("- 1\n- 2\n", r"a recipe is a mapping of keys"),
    "binary": (b"\x00\xff\xfe garbage", r"cannot read the recipe|not valid YAML"),
    "deeply_nested": (_nested(40), r"nested more than 32 levels deep"),
    "very_deeply_nested": ("[" * 100_000 + "]" * 100_000, r"nested (more than 32 levels deep|too deeply)|not valid YAML"),
    "billion_laughs": (LAUGHS, r"recipe too large \(more than 20000 values"),
    "huge_file": ("name: tiny\n# " + "x" * (2 << 20) + "\n", r"bytes; a recipe is at most 1048576 bytes"),
    "duplicate_key": ("name: a\nname: b\n", r"recipe\.yaml:2: duplicate key 'name'"),
    "python_tag": ("name: !!python/object/apply:os.system ['touch pwned']\n", r"not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_recipe_files(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    content, expected = MALFORMED[name]
    result, verdict = _run(tmp_path, content, "--check")
    assert verdict is None, verdict
    assert result.code == 2 and re.search(expected, result.stderr), result.stderr
    assert not (tmp_path / "pwned").exists()


def test_broken_extends(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    for i in range(20):
        (tmp_path / f"chain{i}.yaml").write_text(f"extends: chain{i + 1}.yaml\n")
    (tmp_path / "chain20.yaml").write_text("name: end\n")
    cases = {
        "extends: a.yaml\n": r"extends forms a cycle",
        "extends: missing.yaml\n": r"missing\.yaml: no such recipe file",
        "extends: list.yaml\n": r"list\.yaml: a recipe is a mapping",
        "extends: /etc/passwd\n": r"/etc/passwd: (not valid YAML|a recipe is a mapping)",
        "extends: 5\n": r"extends: must be a file name or a list of file names",
        "extends: chain0.yaml\n": r"more than 16 levels of extends",
    }
    for text, expected in cases.items():
        result, verdict = _run(tmp_path, text, "--check")
        assert verdict is None, (text, verdict)
        assert result.code == 2 and re.search(expected, result.stderr), (text, result.stderr)


def test_hostile_set_overrides(tmp_path):
    cases = {
        "quantization.method": r"expected KEY=VALUE",
        "=mse": r"expected KEY=VALUE",
        "extends=/etc/passwd": r"extends cannot be set from the command line",
        "quantization.methd=mse": r"quantization\.methd: unknown key",
        "quantization.overrides.5.float=true": r"past the end of a list",
        "name.sub=1": r"name: .*valid string|name.sub|is not a mapping",
        "quantization.method=[[[[": r"quantization\.method",
    }
    recipe = base_recipe(tmp_path)
    recipe["quantization"]["overrides"] = [{"pattern": "0", "method": "min_max"}]
    for override, expected in cases.items():
        result, verdict = _run(tmp_path, recipe, "--check", "--set", override)
        assert verdict is None, (override, verdict)
        assert result.code == 2 and re.search(expected, result.stderr), (override, result.stderr)


# ---- recipes that validate, naming code or files that misbehave: full runs ---------------------

RUN_FAILURES = {
    "module_missing": (_edit(**{"model.factory": "nope.nothing:factory"}), r"model\.factory: cannot import 'nope\.nothing'"),
    "attribute_missing": (_edit(**{"model.factory": f"{T}:nothing"}), r"model\.factory: '[\w.]+' has no attribute 'nothing'"),
    "not_callable": (_edit(**{"model.factory": f"{T}:NOT_CALLABLE"}), r"model\.factory: .* is not a function or class"),
    "factory_raises": (_edit(**{"model.factory": f"{T}:raises"}), r"model\.factory: raises raised RuntimeError: user code failed"),
    "factory_wrong_kwargs": (_edit(**{"model.kwargs": {"depth": 3}}), r"model\.factory: tiny_model raised TypeError.*check model\.kwargs"),
    "factory_returns_text": (_edit(**{"model.factory": f"{T}:returns_a_string"}), r"returned a str, not a torch\.nn\.Module"),
    "loader_not_iterable": (_edit(**{"calibration.loader": f"{T}:not_iterable"}), r"calibration\.loader returned a int, which is not iterable"),
    "loader_yields_strings": (_edit(**{"calibration.loader": f"{T}:yields_strings"}), r"calibration"),
    "loader_yields_nan": (_edit(**{"calibration.loader": f"{T}:yields_nan"}), r"NaN in tensor '<input>:0' \(module '<input>'\) on calibration batch 0"),
    "loader_wrong_shape": (_edit(**{"calibration.loader": f"{T}:yields_wrong_shape"}), r"calibration: the model raised RuntimeError"),
    "loader_empty": (_edit(**{"calibration.loader": f"{T}:empty"}), r"empty"),
    "loader_fails_midway": (_edit(**{"calibration.loader": f"{T}:fails_midway"}), r"iterating the loader raised ValueError: the data source went away"),
    "output_folder_is_a_file": (lambda r: _edit(**{"export.path": str(Path(r["export"]["path"]).parent / "recipe.yaml" / "out.onnx")})(r), r"cannot create folder"),
    "output_not_onnx": (lambda r: _edit(**{"export.path": str(Path(r["export"]["path"]).with_suffix(".txt"))})(r), r"should end in \.onnx"),
    "checkpoint_missing": (_edit(**{"model.checkpoint": "nothere.pt"}), r"model\.checkpoint: no such file"),
}


@pytest.mark.parametrize("name", sorted(RUN_FAILURES))
def test_recipe_whose_code_or_files_misbehave(name, tmp_path):
    edit, expected = RUN_FAILURES[name]
    result, verdict = _run(tmp_path, edit(base_recipe(tmp_path)))
    assert verdict is None, verdict
    assert result.code == 2 and re.search(expected, result.stderr), result.stderr


class _Payload:
    """Unpickling this runs code (it touches a file): what a malicious checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_hostile_checkpoints_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "pickle_payload.pt": (lambda p: p.write_bytes(pickle.dumps({"0.weight": _Payload(str(marker))})), r"cannot load .* with torch\.load\(weights_only=True\)"),
        "torch_payload.pt": (lambda p: torch.save({"0.weight": _Payload(str(marker))}, p), r"cannot load .* with torch\.load\(weights_only=True\)"),
        "truncated.pt": (lambda p: (torch.save(torch.nn.Linear(2, 2).state_dict(), p), p.write_bytes(p.read_bytes()[:40])), r"cannot load"),
        "text.pt": (lambda p: p.write_text("hello"), r"cannot load"),
        "wrong_keys.pt": (lambda p: torch.save({"nope": torch.zeros(1)}, p), r"does not fit the model"),
        "a_tensor.pt": (lambda p: torch.save(torch.zeros(3), p), r"is not a state_dict"),
    }
    for name, (make, expected) in cases.items():
        make(tmp_path / name)
        recipe = _edit(**{"model.checkpoint": name})(base_recipe(tmp_path))
        result, verdict = _run(tmp_path, recipe)
        assert verdict is None, (name, verdict)
        assert result.code == 2 and re.search(expected, result.stderr), (name, result.stderr)
        assert not marker.exists(), f"{name}: unpickling ran code"


@pytest.mark.parametrize(("function", "expected"), [("raises", r"evaluation\.function: raises raised RuntimeError: user code failed"), ("returns_nan", r"evaluation\.function: returned nan")])
def test_failing_evaluation_leaves_the_complete_int8_model(function, expected, tmp_path):
    """Evaluation runs on the written INT8 file (the recipe's function gets its path), so when the
    user's evaluation fails the model is already complete and valid; exit 2 names the function."""
    result, _ = _run(tmp_path, _edit(evaluation={"function": f"{T}:{function}"})(base_recipe(tmp_path)))
    assert result.code == 2 and re.search(expected, result.error_lines[-1]) and "Traceback" not in result.stderr, result.stderr
    assert validate(onnx.load(tmp_path / "out.onnx")) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


def test_the_valid_base_recipe_runs(tmp_path):
    result, verdict = _run(tmp_path, base_recipe(tmp_path))
    assert verdict is None and result.code == 0, result.stderr
    assert validate(onnx.load(tmp_path / "out.onnx")) == []


def test_interrupted_recipe_writes_nothing(tmp_path):
    recipe = _edit(**{"calibration.loader": f"{T}:interrupted_midway"})(base_recipe(tmp_path))
    result, _ = _run(tmp_path, recipe)
    assert result.code == 130 and "nothing was written" in result.stderr
    assert not (tmp_path / "out.onnx").exists()
