"""Safety: nothing torchq reads can make it run code, except what a recipe names on purpose.

The source is checked by its syntax tree (not by grep), so an aliased import or a keyword in a
different place does not slip through:

* YAML only through a safe loader (yaml.safe_load, or yaml.load with SafeLoader / CSafeLoader);
* no pickle / marshal / shelve / dill loading in the library; torch.load only with
  weights_only=True (library and benchmarks); np.load never with allow_pickle=True;
* no eval / exec / shell=True in the library.

Recipes name code on purpose (`package.module:attribute`, imported and called): that is checked
to be the only form accepted, and documented as code the recipe runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.reliability.cli_harness import ROOT, run_cli

LIBRARY = ["torchq", "onnx_backend", "npu"]
EVERYWHERE = LIBRARY + ["tests", "bench"]
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
UNSAFE_YAML = {"unsafe_load", "full_load", "unsafe_load_all", "full_load_all", "Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}


def _sources(folders: list[str]) -> list[Path]:
    return sorted(p for f in folders if (ROOT / f).is_dir() for p in (ROOT / f).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):  # getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        if _dotted(node.func) == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            return f"{_dotted(node.args[0])}.{node.args[1].value}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_safe_loader(node: ast.AST | None) -> bool:
    if node is None:
        return False
    if isinstance(node, ast.Call) and _dotted(node.func) == "getattr":  # getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        names = [_dotted(a).rsplit(".", 1)[-1] for a in node.args[2:]] + [node.args[1].value if isinstance(node.args[1], ast.Constant) else ""]
        return all(n in SAFE_LOADERS for n in names)
    return _dotted(node).rsplit(".", 1)[-1] in SAFE_LOADERS


def violations(path: Path, library: bool, torch_load: bool | None = None) -> list[str]:
    """Unsafe loading in one file. `library`: also pickle imports, eval/exec and shell commands;
    `torch_load` (default: as `library`): torch.load must pass weights_only=True."""
    torch_load = library if torch_load is None else torch_load
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for n in names:
                if n.split(".")[0] in PICKLE_MODULES and library:
                    out.append(f"{where}:{node.lineno}: imports {n}")
                if isinstance(node, ast.ImportFrom) and node.module == "yaml" and n in UNSAFE_YAML:
                    out.append(f"{where}:{node.lineno}: imports yaml.{n}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml" and node.attr in UNSAFE_YAML:
            out.append(f"{where}:{node.lineno}: uses yaml.{node.attr}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not _is_safe_loader(loader):
                out.append(f"{where}:{node.lineno}: {name} without a safe Loader")
        if name.split(".")[0] in PICKLE_MODULES and last in ("load", "loads", "Unpickler", "open") and library:
            out.append(f"{where}:{node.lineno}: {name}")
        if name in ("torch.load",) and torch_load:
            w = _keyword(node, "weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                out.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load"):
            a = _keyword(node, "allow_pickle")
            if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                out.append(f"{where}:{node.lineno}: np.load with allow_pickle")
        if library and name in ("eval", "exec", "compile", "__import__"):
            out.append(f"{where}:{node.lineno}: {name}()")
        if library and last in ("run", "Popen", "call", "check_call", "check_output", "system"):
            shell = _keyword(node, "shell")
            if name == "os.system" or (isinstance(shell, ast.Constant) and shell.value):
                out.append(f"{where}:{node.lineno}: shell command")
    return out


def test_the_checker_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import yaml, pickle, torch, numpy as np\n"
        "yaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\nyaml.unsafe_load(s)\npickle.loads(b)\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\neval('1')\n"
    )
    good = tmp_path / "good.py"
    good.write_text(
        "import yaml, torch, numpy as np\n"
        "yaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.load(s, Loader=getattr(yaml, 'CSafeLoader', yaml.SafeLoader))\n"
        "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, allow_pickle=False)\nnp.load(p)\n"
    )
    flagged = {int(v.split(":")[1]) for v in violations(bad, library=True)}
    assert flagged == set(range(1, 10)), violations(bad, library=True)  # every line of bad.py
    assert violations(good, library=True) == []


@pytest.mark.parametrize("folder", EVERYWHERE)
def test_no_unsafe_loading_anywhere(folder):
    """The library: every rule. Benchmarks: YAML, np.load and torch.load rules (bench/run.py
    pickles its own section cache, which no user supplies). Tests: YAML and np.load rules (a
    test may torch.load a Lightning checkpoint it wrote itself with weights_only=False)."""
    found = [v for p in _sources([folder]) for v in violations(p, library=folder in LIBRARY, torch_load=folder in LIBRARY + ["bench"])]
    assert not found, "\n".join(found)


def test_sources_were_found():
    assert len(_sources(LIBRARY)) > 30


def test_recipes_accept_only_explicit_module_attribute_import_paths():
    from torchq.recipes import _IMPORT_PATH

    for ok in ("pkg.mod:fn", "a:b.c", "torchq.examples.digits:load_trained"):
        assert _IMPORT_PATH.match(ok)
    for bad in ("os.system", "os:system; rm -rf /", "__import__('os').system", "mod:fn()", ":fn", "mod:", "mod: fn", "../x:y", "a b:c"):
        assert not _IMPORT_PATH.match(bad), bad


def test_recipe_code_is_documented_as_code_the_recipe_runs():
    docs = (ROOT / "docs" / "INTERFACES.md").read_text()
    template = (ROOT / "recipes" / "template.yaml").read_text()
    assert "a recipe runs code" in docs.lower() and "recipes you trust" in docs
    assert "SECURITY" in template and "Run only recipes you trust" in template
    help_text = run_cli(["quantize", "--help"]).stdout
    assert "run only recipes you trust" in " ".join(help_text.split())
