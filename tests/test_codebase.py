"""The shape of the codebase: no import cycles, small modules, a short README with docs/ beside it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "opsd_ray"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside functions."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opsd_ray"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t not in (name, "opsd_ray")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_500_lines():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 500} == {}


def test_the_readme_is_a_tour_and_docs_hold_the_depth():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(docs) >= 3
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/{d}" in readme for d in docs), "the README links every page of docs/"


# Modules that import the package's own modules inside functions, and why.
LATE_IMPORTS = {
    "opsd_ray.cli": "each command imports what it runs: `opsd-ray --help` and a refused config stay fast",
}


def test_the_package_imports_its_own_modules_at_the_top_of_files():
    """A file's top shows what it uses (heavy optional packages such as vllm may load late; they are
    not the package's own)."""
    late = {}
    for path in PACKAGE.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    own = (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opsd_ray")) or (
                        isinstance(node, ast.Import) and any(a.name.startswith("opsd_ray") for a in node.names))
                    if own:
                        late.setdefault(module_name(path), set()).add(node.lineno)
    assert set(late) <= set(LATE_IMPORTS), {m: sorted(v) for m, v in late.items() if m not in LATE_IMPORTS}


def test_only_the_groups_reach_into_workers():
    """The driver, the schedule and the evaluation call group methods; they never call an actor's own
    methods (`.remote(`) or hold a role's list of actors."""
    for name in ("driver", "schedule", "evaluation", "checkpoints", "sync_check", "records"):
        text = (PACKAGE / "run" / f"{name}.py").read_text()
        assert ".remote(" not in text and ".workers[" not in text and "ray.get(" not in text, name
