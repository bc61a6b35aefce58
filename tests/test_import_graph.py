"""The package's modules import each other without a circle, and its parts are layered:
kernels <- diffattn's core (autograd, functional API, layers, conversions) <- models (CLIP) <-
evaluation <- training <- integrations (adapters for timm and CLIP_benchmark). Read statically from the source (every import, also those inside
functions), so a circle hidden in a function-level import is found too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGE_DIRS = {"diffattn": "diffattn", "kernels": "diffattn.kernels", "models": "diffattn.models"}
# Lower layers may not import higher ones.
LAYERS = {"kernels": 0, "core": 1, "models": 2, "evaluation": 3, "training": 4,
          "integrations": 5}


def _project_modules() -> dict:
    """{module name: source path} of every module of the package."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package] + parts)
            if name.startswith("diffattn.kernels.") and folder == "diffattn":
                continue
            modules[name] = path
    return modules


def _is_type_checking_block(node) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree) -> list:
    """Every Import/ImportFrom node, outside ``if TYPE_CHECKING:`` blocks."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _resolve(name: str, modules: dict):
    """The project module ``name`` refers to (its longest project prefix), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict:
    """{module: set of project modules it imports}."""
    modules = _project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = node.module or ""
                base = (f"{base}.{source}" if base and source else base or source) \
                    if node.level else source
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            edges.update(target for target in map(lambda t: _resolve(t, modules), targets)
                         if target is not None and target != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of nodes (first == last), or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_of(module: str) -> str:
    for prefix, layer in (("diffattn.kernels", "kernels"), ("diffattn.models", "models"),
                          ("diffattn.integrations", "integrations"),
                          ("diffattn.evaluation", "evaluation"), ("diffattn.eval", "evaluation"),
                          ("diffattn.training", "training"), ("diffattn.train", "training")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "core"


def test_the_graph_is_read():
    graph = import_graph()
    assert {"diffattn", "diffattn.kernels.diff_attn_fwd", "diffattn.models.clip",
            "diffattn.training.data", "diffattn.convert", "diffattn.module_v2"} <= set(graph)
    assert "diffattn.module" in graph["diffattn.convert"]
    assert "diffattn.kernels" in graph["diffattn.autograd"]
    assert "diffattn" in graph["diffattn.models.clip"]


def test_no_import_circle_among_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_parts_are_layered_kernels_core_models_training():
    upward = sorted(f"{source} ({layer_of(source)}) imports {target} ({layer_of(target)})"
                    for source, targets in import_graph().items() for target in targets
                    if LAYERS[layer_of(source)] < LAYERS[layer_of(target)]
                    or (LAYERS[layer_of(source)] == LAYERS[layer_of(target)]
                        and layer_of(source) != layer_of(target)))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


@pytest.mark.parametrize("graph, has_cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"a"}}, True),
    ({"a": {"b", "c"}, "b": {"c"}, "c": {"d"}, "d": {"b"}}, True),
])
def test_cycle_finder(graph, has_cycle):
    cycle = find_cycle(graph)
    assert (cycle is not None) == has_cycle
    if cycle:
        assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))
