"""The package's modules import one another one way: no import cycle, lazy imports included.

The data flows sites -> measurement -> report -> {loggers and dashboards, remedies} (see
``docs/guide/architecture.md``); an import cycle is a place where that flow runs backwards. The graph is read
with :mod:`ast` from the source, without importing anything:

- every ``import``/``from ... import`` counts, at module level or inside a function or method (a lazy import
  still couples the two modules at run time), and so does ``importlib.import_module("lightning_relu....")``
  with a literal name;
- imports under ``if TYPE_CHECKING:`` do not count: they never run, they only name types for the type checker;
- ``from lightning_relu.a import b`` is an edge to ``lightning_relu.a.b`` where ``b`` is a submodule, else to
  ``lightning_relu.a``;
- the package's own ``__init__`` is left out as a hub: it imports nothing at import time and loads each public
  name on first use from the submodule its ``_LAZY`` table names, so ``from lightning_relu import X`` is an edge
  to that submodule (the place the name really comes from), never to the hub;
- importing ``lightning_relu.a.b`` first runs ``lightning_relu/a/__init__.py``: that implicit import of the parent
  package is an edge too (a module importing ``a.b`` where ``a/__init__`` imports the module back is a cycle that
  fails at import time as soon as either import moves to module level).
"""

from __future__ import annotations

import ast
import itertools
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import lightning_relu

PACKAGE_DIR = Path(lightning_relu.__file__).parent


@dataclass(frozen=True)
class Edge:
    """One run-time import of ``target`` by ``source``, at ``path:line``."""

    source: str
    target: str
    path: str
    line: int


def _module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg.sub`` for ``pkg/sub/__init__.py``)."""
    root = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([root, *parts])] = path
    return modules


def _lazy_table(init_path: Path) -> dict[str, str]:
    """The hub's ``_LAZY`` table (public name -> submodule name), read as a literal from its source."""
    for node in ast.parse(init_path.read_text()).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets) and node.value is not None:
            return dict(ast.literal_eval(node.value))
    return {}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_time_nodes(tree: ast.AST, type_checking: bool = False) -> list[ast.AST]:
    """Every node of ``tree`` that can run: the body of ``if TYPE_CHECKING:`` left out (its ``else`` kept), unless
    ``type_checking``."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(package_dir: Path, type_checking: bool = False) -> list[Edge]:
    """Every run-time import between two modules of the package at ``package_dir`` (see the module docstring);
    with ``type_checking``, the imports under ``if TYPE_CHECKING:`` too."""
    root = package_dir.name
    modules = _module_files(package_dir)
    lazy = {name: f"{root}.{sub}" for name, sub in _lazy_table(package_dir / "__init__.py").items()}
    edges = []
    for source, path in modules.items():
        if source == root:
            continue  # the lazy hub
        is_package = path.name == "__init__.py"
        here = source if is_package else source.rpartition(".")[0]  # the package a relative import starts from

        def resolve(base: str, name: str | None) -> str | None:
            if name is not None and f"{base}.{name}" in modules:
                return f"{base}.{name}"
            if name is not None and base == root and name in lazy:
                return lazy[name]
            return base if base in modules and base != root else None

        for node in _run_time_nodes(ast.parse(path.read_text(), str(path)), type_checking):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [resolve(alias.name, None) for alias in node.names if alias.name.split(".")[0] == root]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if base.split(".")[0] == root:
                    targets = [resolve(base, alias.name) for alias in node.names]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, (ast.Attribute, ast.Name))
                and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.split(".")[0] == root
            ):
                targets = [resolve(node.args[0].value, None)]
            for target in targets:
                while target is not None and target != root:
                    if target != source and not source.startswith(target + "."):  # a module's own packages run first
                        edges.append(Edge(source, target, str(path.relative_to(package_dir.parent)), node.lineno))
                    target = target.rpartition(".")[0]  # ... and importing `a.b` runs `a/__init__.py` first
                    if target not in modules or modules[target].name != "__init__.py":
                        break
    return edges


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One shortest cycle per strongly connected component of more than one module, as the edges that close it."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in sorted(edges, key=lambda e: (e.path, e.line)):
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)  # the first import of each pair
        graph.setdefault(edge.target, {})

    # Tarjan's strongly connected components, iterative
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        members = set(component)
        start = component[0]
        # breadth-first from start back to start, inside the component: the shortest cycle through start
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parent:
            following = []
            for node in frontier:
                for child in sorted(graph[node]):
                    if child in members and child not in parent:
                        parent[child] = node
                        following.append(child)
            frontier = following
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(parent[path[-1]])
        path.reverse()  # start -> ... -> start
        cycles.append([graph[a][b] for a, b in itertools.pairwise(path)])
    return cycles


def describe(cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].source, *(edge.target for edge in cycle)])
    lines = [f"  {edge.path}:{edge.line}: {edge.source} imports {edge.target}" for edge in cycle]
    return "\n".join([chain, *lines])


#: Cycles allowed to remain, each named module by module so that it cannot grow or hide another. None is left: the
#: one there was (the site discovery on a forward, the structure's `observe` and the tracker importing one another)
#: is gone since the site's record and keys moved to `site.py` and the recording to `observation.py`, below the
#: tracker (see docs/guide/architecture.md). An entry added here must name every module of its cycle.
KNOWN_CYCLES: list[frozenset[str]] = []


def _components(cycles: list[list[Edge]], edges: list[Edge]) -> list[frozenset[str]]:
    """The modules of each cycle's strongly connected component (every module that some cycle joins)."""
    reaches = _reacher(edges)
    components = []
    for cycle in cycles:
        start = cycle[0].source
        components.append(frozenset(m for m in {start} | reaches(start) if m == start or start in reaches(m)))
    return components


def _reacher(edges: list[Edge]) -> Callable[[str], set[str]]:
    """A function giving the modules a module reaches through one or more imports (itself only on a cycle)."""
    imports: dict[str, set[str]] = {}
    for edge in edges:
        imports.setdefault(edge.source, set()).add(edge.target)

    def reaches(source: str) -> set[str]:
        seen: set[str] = set()
        todo = [source]
        while todo:
            for target in imports.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    return reaches


def test_the_package_has_no_import_cycle() -> None:
    edges = import_graph(PACKAGE_DIR)
    assert len(edges) > 20  # the scan sees the package's imports at all
    cycles = find_cycles(edges)
    components = _components(cycles, edges)
    new = [cycle for cycle, members in zip(cycles, components, strict=True) if members not in KNOWN_CYCLES]
    assert not new, "import cycles inside the package (lazy imports count):\n" + "\n".join(map(describe, new))
    gone = [sorted(members) for members in KNOWN_CYCLES if members not in components]
    assert not gone, f"these known cycles are gone (or changed): remove them from KNOWN_CYCLES: {gone}"


def test_the_data_flows_one_way() -> None:
    """The layers of ``docs/guide/architecture.md``: nothing lower imports anything higher, even lazily."""
    reaches = _reacher(import_graph(PACKAGE_DIR))
    p = "lightning_relu."
    # measurement and structure never reach the remedies, the callbacks, the dashboards or the demo
    for lower in ("site", "sites", "observation", "structure", "tracker", "stats", "functional", "report"):
        reached = reaches(p + lower)
        for higher in ("monitor", "revive", "surgery", "compaction", "dashboards", "demo", "_demo"):
            assert p + higher not in reached, f"{p + lower} reaches {p + higher}"
    # the sites layer (a site's record and key, the recording of a forward) is below the measurement that builds on it
    for bottom in ("site", "observation"):
        for above in ("tracker", "stats", "structure", "sites"):
            assert p + above not in reaches(p + bottom), f"{p + bottom} reaches {p + above}"
    # the dashboards take data, not the monitor; the reviver never reaches the monitor that drives it
    assert p + "monitor" not in reaches(p + "dashboards")
    for remedy in ("revive", "surgery"):
        assert p + "monitor" not in reaches(p + remedy), f"{p + remedy} reaches {p}monitor"
    # the demo's runner never reaches the command line that launches it
    assert p + "demo" not in reaches(p + "_demo")
    # the dashboards take the reports as data: they do not name the monitor even for the type checker
    typed = {(e.source, e.target) for e in import_graph(PACKAGE_DIR, type_checking=True)}
    assert (p + "dashboards", p + "report") in typed
    assert not any(source == p + "dashboards" and target == p + "monitor" for source, target in typed)


# --- the scanner itself, on a made-up package whose import graph is known ---


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _pairs(edges: list[Edge]) -> set[tuple[str, str]]:
    return {(e.source.removeprefix("pkg."), e.target.removeprefix("pkg.")) for e in edges}


def test_scanner_reads_every_kind_of_import(tmp_path: Path) -> None:
    pkg = _write(
        tmp_path / "pkg",
        {
            "__init__.py": """
                _LAZY = {"Thing": "things", "Other": "sub.deep"}
                from pkg import a  # the hub itself is not scanned
            """,
            "a.py": """
                from typing import TYPE_CHECKING
                import pkg.b
                if TYPE_CHECKING:
                    from pkg import c  # never runs
                else:
                    from pkg import d
                def f():
                    from pkg import Thing  # lazy, and through the hub's table
                    from pkg.sub import deep
                    from pkg import __version__  # a plain attribute of the hub: no edge
                class K:
                    def g(self):
                        import importlib
                        return importlib.import_module("pkg.e")
            """,
            "b.py": "from . import c\nfrom .sub.deep import x\nimport os\n",
            "c.py": "",
            "d.py": "from pkg import Other\n",
            "e.py": "from pkg.b import nothing_here\n",
            "things.py": "",
            "sub/__init__.py": "from .deep import x\n",
            "sub/deep.py": "from .. import c\nfrom pkg.sub import deep\n",  # a self-import is no edge
        },
    )
    assert _pairs(import_graph(pkg)) == {
        ("a", "b"),
        ("a", "d"),
        ("a", "things"),
        ("a", "sub.deep"),
        ("a", "e"),
        ("b", "c"),
        ("b", "sub.deep"),
        ("d", "sub.deep"),
        ("a", "sub"),  # importing `pkg.sub.deep` runs `pkg/sub/__init__.py` first
        ("b", "sub"),
        ("d", "sub"),
        ("e", "b"),
        ("sub", "sub.deep"),
        ("sub.deep", "c"),
    }


def test_scanner_names_each_cycle_with_its_import_lines(tmp_path: Path) -> None:
    pkg = _write(
        tmp_path / "pkg",
        {
            "__init__.py": '_LAZY = {"Monitor": "monitor"}\n',
            "monitor.py": "import pkg.revive\n",
            "revive.py": "def f():\n    from pkg import Monitor\n",  # lazy, through the hub: still a cycle
            "x.py": "import pkg.y\n",
            "y.py": "import pkg.z\n",
            "z.py": "import pkg.x\nimport pkg.monitor\n",
            "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.leaf\n",
            "leaf.py": "import pkg.typed\n",  # typed -> leaf only for the type checker: no cycle
            "sub/__init__.py": "import pkg.w\n",
            "sub/inner.py": "",
            "w.py": "def f():\n    import pkg.sub.inner\n",  # runs sub/__init__, which imports w: a cycle
        },
    )
    cycles = find_cycles(import_graph(pkg))
    chains = sorted(tuple(e.source.removeprefix("pkg.") for e in cycle) for cycle in cycles)
    assert chains == [("monitor", "revive"), ("sub", "w"), ("x", "y", "z")]
    typed = sorted(tuple(e.source.removeprefix("pkg.") for e in c) for c in find_cycles(import_graph(pkg, True)))
    assert typed == [("leaf", "typed"), ("monitor", "revive"), ("sub", "w"), ("x", "y", "z")]
    text = describe(next(c for c in cycles if c[0].source == "pkg.monitor"))
    assert text.splitlines() == [
        "pkg.monitor -> pkg.revive -> pkg.monitor",
        "  pkg/monitor.py:1: pkg.monitor imports pkg.revive",
        "  pkg/revive.py:2: pkg.revive imports pkg.monitor",
    ]


@pytest.mark.parametrize("module", ["sites", "tracker", "monitor", "revive"])
def test_scanner_sees_the_real_modules(module: str) -> None:
    """Guard against a scan that silently finds nothing: each of these modules imports others of the package."""
    sources = {edge.source for edge in import_graph(PACKAGE_DIR)}
    assert f"lightning_relu.{module}" in sources
