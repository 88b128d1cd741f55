"""The package's import graph: no cycles (counting imports inside functions), imports that point down the stages
only, every module importing alone; and no module or function grown past what a reader takes in at once."""

import ast
import subprocess
import sys
from pathlib import Path

import model_export

PACKAGE = Path(model_export.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside functions (relative and absolute imports)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            edges |= {c for c in candidates if c in modules and c != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "model_export":  # the package's own __init__ re-exports; importing it is not a dependency cycle
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = {name: edges for name, edges in import_graph().items() if name != "model_export"}
    assert find_cycle(graph) is None


def test_the_pipeline_imports_no_exporter_by_name_at_the_top():
    tree = ast.parse((PACKAGE / "pipeline" / "run.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert not [n.module for n in top if n.module and "exporters" in n.module]


# The stages, lowest first (docs/design.md draws them): a module imports from its own stage or the ones before it.
# The foundation is the package's top-level modules (errors, i18n, config, monitoring, steps, ...); runtimes come
# before exporters because an exporter reads its artifact back in its runtime; the application (CLI, doctor, demo,
# the package's API) is last.
STAGES = [
    "foundation",
    "checkpoint",
    "merging",
    "quantize",
    "runtimes",
    "exporters",
    "verify",
    "pipeline",
    "application",
]
APPLICATION = {"cli", "console", "doctor", "demo", "__main__"}


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in APPLICATION:
        return "application"
    return parts[1] if parts[1] in STAGES else "foundation"


def test_every_subpackage_is_a_stage_and_imports_point_down_the_stages():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages <= set(STAGES) | APPLICATION, "a new subpackage: place it among the stages"
    upward = [
        f"{module} ({stage_of(module)}) imports {target} ({stage_of(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if target != "model_export" and STAGES.index(stage_of(target)) > STAGES.index(stage_of(module))
    ]
    assert upward == []


def test_the_layering_rule_finds_an_upward_import():
    assert stage_of("model_export.merging.merger") == "merging" and stage_of("model_export.errors") == "foundation"
    assert STAGES.index(stage_of("model_export.pipeline.run")) > STAGES.index(stage_of("model_export.verify.step"))


def test_no_subpackage_is_hidden_behind_a_public_name():
    """``model_export.merge`` is the merge function: a subpackage of that name could not be reached as
    ``import model_export.merge.x as y`` (the attribute wins), so the stages are named otherwise."""
    import model_export

    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages & set(model_export.__all__) == set()


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def sizes() -> tuple[dict[str, int], dict[str, int]]:
    """Lines of every module, and of every function or method (decorators and docstring included)."""
    modules, functions = {}, {}
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        modules[module_name(path)] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                functions[f"{module_name(path)}.{node.name}:{node.lineno}"] = node.end_lineno - start + 1
    return modules, functions


def test_no_module_and_no_function_grows_past_what_a_reader_takes_in():
    modules, functions = sizes()
    assert {m: n for m, n in modules.items() if n > MAX_MODULE_LINES} == {}
    assert {f: n for f, n in functions.items() if n > MAX_FUNCTION_LINES} == {}


def test_every_module_imports_alone():
    names = sorted(n for n in import_graph() if n != "model_export")
    code = (
        "import importlib, sys\nfor name in sys.argv[1:]:\n    for m in [k for k in sys.modules if "
        "k.startswith('model_export')]:\n"
        "        del sys.modules[m]\n    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
