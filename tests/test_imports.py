"""The structure of `jaxcodec/`: no import cycles, and the weight converters below the methods.

Imports are read with `ast` from the source, not by importing it: every `import` and
`from ... import` anywhere in a module counts (function-level and `TYPE_CHECKING` imports too),
because a lazy import that closes a cycle is still an arrow running back up. `from pkg import
name` is an edge to `pkg.name` when that is a module of the package, else to `pkg`.
"""

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxcodec"


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . / .. import
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    deps.add(f"{source}.{alias.name}")
                elif source in modules:
                    deps.add(source)
    deps.discard(name)
    return deps


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_function_level_imports_are_edges(tmp_path):
    pkg = tmp_path / "jaxcodec"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n")
    (pkg / "top.py").write_text("from jaxcodec.sub import leaf\n")
    modules = {
        "jaxcodec.sub": pkg / "sub" / "__init__.py",
        "jaxcodec.sub.leaf": pkg / "sub" / "leaf.py",
        "jaxcodec.top": pkg / "top.py",
    }
    graph = {n: imported_modules(n, p, modules) for n, p in modules.items()}
    assert graph == {
        "jaxcodec.sub": {"jaxcodec.sub.leaf"},
        "jaxcodec.sub.leaf": {"jaxcodec.top"},
        "jaxcodec.top": {"jaxcodec.sub.leaf"},
    }
    assert cycles(graph) == [["jaxcodec.sub.leaf", "jaxcodec.top"]]


def test_jaxcodec_has_no_import_cycles():
    graph = import_graph()
    assert "jaxcodec.train" in graph and "jaxcodec.sharding" in graph["jaxcodec.train"]
    found = cycles(graph)
    assert not found, "import cycles in jaxcodec/: " + "; ".join(" ↔ ".join(c) for c in found)


# The weight converters map foreign state dicts to parameters and back; building a codec (a
# method, its bundle, a checkpoint) from them belongs to the command that needs it
# (`jaxcodec.importers`), so `weights/` sits below `methods/`.
ABOVE_WEIGHTS = ("jaxcodec.methods", "jaxcodec.codec", "jaxcodec.checkpoint", "jaxcodec.train")


def test_weight_converters_import_nothing_above_them():
    graph = import_graph()
    upward = {
        name: sorted(d for d in deps if d.startswith(ABOVE_WEIGHTS))
        for name, deps in graph.items()
        if name.startswith("jaxcodec.weights")
    }
    assert "jaxcodec.weights.diffusers" in upward
    assert not any(upward.values()), f"weights/ imports from above it: {upward}"
