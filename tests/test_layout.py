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
