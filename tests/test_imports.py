"""The packages' import structure: every module imports on its own, no two modules import each other at module level,
and the packages keep their layers: parallel/ (which runs without Ray) and cluster/ import of orchestrator/ only the
contract modules the job spec is made of, parallel/ nothing of cluster/, dataprep/ nothing of training nor of the spec.

The cycle check reads module-level imports only: an import inside a function is a deliberate lazy seam (the engine
factory, the CLI's commands) that runs after every module is loaded. The layering check reads every import, lazy or
not, since a lazy import still ties one package to another.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "parallel", "dataprep", "cluster")
# The job spec and what it is built from: the only modules of orchestrator/ that the other packages may import.
CONTRACT = {"orchestrator.errors", "orchestrator.config_parser", "orchestrator.spec", "orchestrator.sizes"}


def modules() -> dict[str, Path]:
    """Dotted name → file of every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _statements(body: list[ast.stmt], top_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of `body`: with `top_level`, those run when the module is imported (inside `if`/`try`
    blocks too, but not under `if TYPE_CHECKING:`); otherwise every one, functions included."""
    if not top_level:
        return [n for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom)]
    found: list[ast.Import | ast.ImportFrom] = []
    for stmt in body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            found.append(stmt)
        elif isinstance(stmt, ast.If) and not (isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING"):
            found += _statements(stmt.body + stmt.orelse, True)
        elif isinstance(stmt, ast.Try):
            found += _statements(stmt.body + stmt.orelse + stmt.finalbody + [s for h in stmt.handlers for s in h.body],
                                 True)
    return found


def imports(name: str, path: Path, known: set[str], top_level: bool) -> set[str]:
    """The project modules `name` imports (a `from package import module` counted as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for stmt in _statements(ast.parse(path.read_text(encoding="utf-8")).body, top_level):
        if isinstance(stmt, ast.Import):
            found |= {alias.name for alias in stmt.names}
            continue
        base = stmt.module or ""
        if stmt.level:
            parent = package.split(".")[:len(package.split(".")) - stmt.level + 1]
            base = ".".join(parent + ([stmt.module] if stmt.module else []))
        found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in stmt.names}
    return {m for m in found if m.split(".")[0] in PACKAGES and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layering_problem(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported`, or None."""
    source, target = importer.split(".")[0], imported.split(".")[0]
    if source in ("parallel", "cluster", "dataprep") and target == "orchestrator" and imported not in CONTRACT:
        return f"{source}/ imports of orchestrator/ only the contract modules ({', '.join(sorted(CONTRACT))})"
    if source == "parallel" and target == "cluster":
        return "parallel/ runs without Ray, so it imports nothing of cluster/"
    if source == "dataprep" and target == "parallel":
        return "dataprep/ knows nothing of training"
    if source == "dataprep" and imported == "orchestrator.spec":
        return "dataprep/ knows nothing of the job spec"
    return None


def test_the_graph_reader_finds_a_cycle_and_reads_relative_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    (tmp_path / "stages.py").write_text("from . import keys\nfrom .readers import jsonl\nif TYPE_CHECKING:\n"
                                        "    import cluster.local\ndef f():\n    import parallel.train\n")
    known = {"dataprep.keys", "dataprep.readers.jsonl"}
    assert imports("dataprep.stages", tmp_path / "stages.py", known, True) == known
    assert imports("dataprep.stages", tmp_path / "stages.py", known, False) == known | {"cluster.local",
                                                                                        "parallel.train"}
    assert layering_problem("dataprep.stages", "parallel.train") == "dataprep/ knows nothing of training"


def test_no_two_modules_import_each_other_at_module_level():
    found = modules()
    graph = {name: imports(name, path, set(found), top_level=True) for name, path in found.items()}
    assert sum(len(targets) for targets in graph.values()) > 100, "the reader found the imports"
    assert cycles(graph) == [], "module-level import cycles: move the shared part into a module both import"


def test_the_packages_keep_their_layers():
    found = modules()
    problems = sorted(f"{name} imports {target}: {why}" for name, path in found.items()
                      for target in imports(name, path, set(found), top_level=False)
                      if (why := layering_problem(name, target)))
    assert problems == []


def test_every_module_imports_on_its_own():
    """Each module imported first, in one interpreter with the project's modules cleared between them: a module that
    works only when another was imported first fails here."""
    names = sorted(modules())
    script = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        f"packages = {PACKAGES!r}\n"
        "imported = 0\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in packages]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        imported += 1\n"
        "    except Exception:\n"
        "        print('FAILED', name + ':', traceback.format_exc().strip().splitlines()[-1])\n"
        "print('IMPORTED', imported)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()  # DeepSpeed writes its accelerator notice to stdout
    assert [line for line in lines if line.startswith("FAILED ")] == []
    assert f"IMPORTED {len(names)}" in lines
