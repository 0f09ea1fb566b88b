"""The package's import graph: cycles among module-level imports, and imports written inside
functions (docs/design.md §15: dependencies point one way; none hidden inside functions).

    python scripts/import_graph.py [-v] [SRC]    # SRC defaults to src/ of this repository

Prints the elementary cycles of three graphs: module-level imports; those plus the imports written
inside functions; and the subpackages (``stagerl.rewards``, ``stagerl.worlds.shapes``, a top-level
module on its own) under all imports. Then the function-local imports of stagerl modules that lie
on a cycle, i.e. that only hide it (all of them with ``-v``). Exit status 1 when there is a cycle. Importing a submodule also runs its package's ``__init__``; that implicit edge is not counted
(as in the usual import linters), only the imports written in the code.
tests/test_import_graph.py runs :func:`analyse` on the package.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = "stagerl"


@dataclass
class Graph:
    modules: set[str]
    edges: dict[str, set[str]]  # module-level imports, module -> stagerl modules
    local: list[tuple[str, str, int]] = field(default_factory=list)  # (module, target, line)


def module_files(src: Path) -> dict[str, Path]:
    """stagerl module name -> file, for every .py under ``src/stagerl``."""
    out = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool,
             modules: set[str]) -> list[str]:
    """The stagerl modules an import statement loads (a name imported from a package counts as
    its submodule when there is one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if is_pkg else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = []
    for name in names:
        while name and name not in modules:  # `import stagerl.a.b as x` names a module; trim attrs
            name = name.rpartition(".")[0]
        if name and name != ROOT:
            found.append(name)
    return found


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(body: list[ast.stmt], in_function: bool):
    """(statement, inside a function?) for every import, skipping ``if TYPE_CHECKING:`` blocks."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, ast.If) and _is_type_checking(node):
            continue
        for name in ("body", "orelse", "finalbody", "handlers"):
            child = getattr(node, name, None)
            if isinstance(child, list) and child and isinstance(child[0], (ast.stmt,
                                                                            ast.excepthandler)):
                inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                         ast.Lambda))
                yield from _walk(child, inner)


def build(src: Path) -> Graph:
    files = module_files(src)
    modules = set(files)
    g = Graph(modules, {m: set() for m in modules})
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _walk(tree.body, False):
            for target in _targets(node, mod, path.name == "__init__.py", modules):
                if target == mod:
                    continue
                if in_function:
                    g.local.append((mod, target, node.lineno))
                else:
                    g.edges[mod].add(target)
    return g


def components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def simple_cycles(edges: dict[str, set[str]], comp: list[str],
                  limit: int = 10000) -> list[list[str]]:
    """Elementary cycles inside one component, each starting at its smallest node."""
    members = set(comp)
    cycles: list[list[str]] = []
    for start in comp:
        path = [start]

        def dfs(v: str) -> None:
            for w in sorted(edges[v] & members):
                if len(cycles) >= limit:
                    return
                if w == start:
                    cycles.append(list(path))
                elif w > start and w not in path:
                    path.append(w)
                    dfs(w)
                    path.pop()

        dfs(start)
    return cycles


def package_of(module: str, modules: set[str]) -> str:
    """The subpackage a module belongs to (``stagerl.rewards.shapes`` -> ``stagerl.rewards``); a
    top-level module (``stagerl.eval``) and a package itself stand for themselves."""
    parts = module.split(".")
    if len(parts) <= 2:
        return module
    return ".".join(parts[:-1])


def _cycles(edges: dict[str, set[str]]) -> dict:
    comps = components(edges)
    return {"components": comps, "cycles": [c for comp in comps
                                            for c in simple_cycles(edges, comp)]}


def analyse(src: Path) -> dict:
    """Cycles of the module-level graph, of the graph with function-local imports added, and of
    the subpackage graph (all imports); the function-local imports, each marked when it lies on
    a cycle of the full graph (it hides that cycle)."""
    g = build(src)
    full = {m: set(ts) for m, ts in g.edges.items()}
    local = sorted(set(g.local))
    for m, t, _ in local:
        full[m].add(t)
    comp_of = {m: i for i, comp in enumerate(components(full)) for m in comp}
    pkgs: dict[str, set[str]] = {}
    for m, ts in full.items():
        pm = package_of(m, g.modules)
        pkgs.setdefault(pm, set())
        pkgs[pm] |= {package_of(t, g.modules) for t in ts} - {pm}
    for ts in list(pkgs.values()):
        for t in ts:
            pkgs.setdefault(t, set())
    return {"modules": len(g.modules), "edges": sum(map(len, g.edges.values())),
            "module_level": _cycles(g.edges), "with_local": _cycles(full),
            "packages": _cycles(pkgs),
            "local": [(m, t, line, m in comp_of and comp_of.get(t) == comp_of[m])
                      for m, t, line in local]}


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "-v"]
    src = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "src"
    res = analyse(src)
    print(f"{res['modules']} modules, {res['edges']} module-level import edges")
    for key, what in (("module_level", "module-level imports"),
                      ("with_local", "module-level + function-local imports"),
                      ("packages", "subpackages, all imports")):
        r = res[key]
        print(f"cycles among {what}: {len(r['cycles'])} elementary, in "
              f"{len(r['components'])} strongly connected components")
        for cyc in r["cycles"]:
            print("  " + " -> ".join(cyc + cyc[:1]))
    hiding = [x for x in res["local"] if x[3]]
    print(f"function-local imports of stagerl modules: {len(res['local'])}, "
          f"{len(hiding)} of them on a cycle (hiding it):")
    for mod, target, line, hides in res["local"]:
        if hides or "-v" in argv:
            print(f"  {mod}:{line} -> {target}")
    return 1 if any(res[k]["cycles"] for k in ("module_level", "with_local", "packages")) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
