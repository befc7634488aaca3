"""The project's shape: scripts import packages only, functions stay short, CI runs the README's command."""
from __future__ import annotations

import ast
import re

from conftest import ROOT

SCRIPTS = ("train", "valid", "predict", "bench")
LIMIT = 80  # lines per function outside tests/


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "results", "datasets") or any(p.startswith(".") for p in rel.parts):
            continue
        yield rel, ast.parse(path.read_text())


def test_no_script_imports_another_script():
    for rel, tree in _sources():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in SCRIPTS, f"{rel}:{node.lineno} imports the script {name}"


def test_no_function_is_longer_than_the_limit():
    long = [f"{rel}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for rel, tree in _sources() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > LIMIT]
    assert not long, "functions to split: " + "; ".join(long)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Tests", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(blocks) == 1, "the Tests section gives one command"
    command = blocks[0].strip()
    assert re.search(r"pip install .*-r requirements.txt", command) and "pytest" in command and "ruff check" in command
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci, f".ci/run does not run the README's test command: {command}"


def _string_constants(tree: ast.AST):
    """``(node, value)`` of the string constants of a module that are not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node, node.value


def _exempt_lines(rel, tree) -> set[int]:
    """config.py's presets and its Config defaults (which are the default preset's values) may name models."""
    if str(rel) != "config.py":
        return set()
    lines = set()
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if (isinstance(node, ast.ClassDef) and node.name == "Config") or any(
                isinstance(t, ast.Name) and t.id == "PRESETS" for t in targets):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def test_no_model_is_named_outside_models_and_presets():
    """Adding a model touches models/ (and the presets): no other code compares or lists model names.
    A name counts as used when a string is the name, or holds it as a ``--model=NAME`` value or in a
    ``a,b`` / ``a|b`` list."""
    from models import MODELS
    found = []
    for rel, tree in _sources():
        if rel.parts[0] == "models":
            continue
        exempt = _exempt_lines(rel, tree)
        for node, value in _string_constants(tree):
            tokens = set(re.split(r"[,|=]", value)) if re.search(r"[,|=]", value) else {value}
            if node.lineno not in exempt and tokens & set(MODELS):
                found.append(f"{rel}:{node.lineno} {value!r}")
    assert not found, "model names outside models/ and the presets: " + "; ".join(found)


def test_only_config_reads_the_command_line():
    """Scripts hand their arguments to config.parse_command; no other code reads sys.argv or
    inspects ``--option`` strings."""
    found = []
    for rel, tree in _sources():
        if str(rel) == "config.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", "") == "sys":
                found.append(f"{rel}:{node.lineno} sys.argv")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "startswith", "partition", "split", "removeprefix") and any(
                    isinstance(a, ast.Constant) and isinstance(a.value, (str, tuple)) and
                    any(str(v).startswith("--") for v in (a.value if isinstance(a.value, tuple) else (a.value,)))
                    for a in node.args):
                found.append(f"{rel}:{node.lineno} .{node.func.attr}('--...')")
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith("--")
                    for c in [node.left, *node.comparators]):
                found.append(f"{rel}:{node.lineno} compares with an '--option' string")
    assert not found, "command-line parsing outside config.py: " + "; ".join(found)


# The stack, bottom up: utils -> models -> data, config -> engine -> scripts. Each package may import
# only the packages listed for it (and itself); an arrow back up would tie a lower layer to a higher.
LAYERS = {"utils": set(), "models": {"utils"}, "data": {"utils", "models"}, "config": {"utils", "models", "data"},
          "engine": {"utils", "models", "data", "config"}}
PROJECT = set(LAYERS) | set(SCRIPTS) | {"benchmarks"}
MAX_FILE_LINES = 450


def _project_imports(tree: ast.AST):
    """``(line, top-level project package)`` of every absolute import of a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT:
                yield node.lineno, name.split(".")[0]


def test_each_layer_imports_only_the_layers_below():
    found = []
    for rel, tree in _sources():
        layer = rel.parts[0].removesuffix(".py")
        if layer not in LAYERS:
            continue
        for line, imported in _project_imports(tree):
            if imported != layer and imported not in LAYERS[layer]:
                found.append(f"{rel}:{line} ({layer}) imports {imported}")
    assert not found, "imports that run back up the stack: " + "; ".join(found)


def test_layer_rule_catches_an_arrow_back_up():
    """The rule above can fail: utils importing engine is reported."""
    tree = ast.parse("import torch\nfrom engine.trainer import Trainer\nfrom .files import atomic_path\n")
    assert [imp for imp in _project_imports(tree) if imp[1] not in LAYERS["utils"] | {"utils"}] == [(2, "engine")]


def test_no_file_outside_tests_is_longer_than_the_limit():
    long = [f"{rel} ({n} lines)" for rel, _ in _sources()
            if (n := len((ROOT / rel).read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines, to split by job: " + "; ".join(long)
