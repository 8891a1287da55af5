"""The package's import graph, read with `ast` (nothing is imported): no cycles, and no library module imports a
command-line module. Every `import` / `from` form counts, relative ones and those inside functions included, since
a deferred import still ties the two modules together."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("vital_jax", "conversion")
# The commands: they sit on top and may use each other (without a cycle); nothing below them imports one.
CLI_MODULES = {f"vital_jax.{name}" for name in ("train", "evaluate", "explain", "demo", "pretrain", "study")}


def modules(root: str, packages=PACKAGES) -> dict[str, str]:
    """Dotted module name -> file, for every .py file of `packages` under `root` (a package is its __init__)."""
    found = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def _imported(node, module: str, is_package: bool, known) -> set[str]:
    """The known modules one import statement of `module` loads (the deepest known module of each name)."""
    def deepest(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    if isinstance(node, ast.Import):
        return {m for m in (deepest(alias.name) for alias in node.names) if m}
    base = node.module or ""
    if node.level:  # from . import x / from ..a import b: relative to the importing module's package
        package = module if is_package else module.rpartition(".")[0]
        parts = package.split(".")
        anchor = ".".join(parts[:len(parts) - node.level + 1])
        base = f"{anchor}.{base}" if base else anchor
    targets = set()
    for alias in node.names:
        target = deepest(f"{base}.{alias.name}")  # `from pkg import submodule` loads the submodule
        if target is not None:
            targets.add(target)
    return targets


def import_graph(root: str, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file. An import of one of its own parent packages
    is left out (Python has already started loading those when the module runs)."""
    known = modules(root, packages)
    graph = {}
    for module, path in known.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, is_package, known)
        graph[module] = {m for m in edges if m != module and not module.startswith(m + ".")}
    return graph


def components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each module of one lies on a cycle."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Per component: one cycle through its first module, and the component's other modules."""
    lines = []
    for component in components(graph):
        cycle = _cycle_in(graph, component)
        others = sorted(component - set(cycle))
        lines.append(" -> ".join(cycle) + (f"   (with {', '.join(others)})" if others else ""))
    return lines


def _cycle_in(graph, component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, within the component."""
    start = min(component)
    previous, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in {component}")


def _write(root, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def test_cycle_finder_sees_relative_and_function_level_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from . import b\n",
        "pkg/b.py": "from pkg.sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import pkg.a as a\n",
        "pkg/d.py": "from .sub.c import nothing_here\n",  # imports c, but nothing imports d: no cycle
        "pkg/sub/e.py": "from .. import d\nfrom ..sub import c\n",
    })
    graph = import_graph(str(tmp_path), ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.sub.e"] == {"pkg.d", "pkg.sub.c"}
    assert cycles(graph) == ["pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"]


def test_the_package_has_no_import_cycles():
    found = cycles(import_graph(REPO))
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_library_module_imports_a_command():
    graph = import_graph(REPO)
    assert CLI_MODULES <= set(graph)
    bad = sorted(f"{module} imports {', '.join(sorted(graph[module] & CLI_MODULES))}"
                 for module in graph if module not in CLI_MODULES and graph[module] & CLI_MODULES)
    assert not bad, "library modules importing a command:\n" + "\n".join(bad)
