"""The import graph of tinyllm/ has no cycles (checked statically, with ast).

Every `import` and `from ... import` in every module counts: at module level, inside
functions and methods, and under `if TYPE_CHECKING:` alike (a function-level import is still
a dependency; it only hides the cycle until the function runs). `from pkg import name` is an
edge to `pkg.name` when that is a module, else to `pkg`. Importing `a.b.c` is not counted as
importing the packages `a` and `a.b` (Python runs their __init__ first, but a package's
__init__ re-exporting its own submodules would otherwise always look like a cycle), and
`importlib.import_module("...")` strings are not followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str = "tinyllm") -> dict[str, Path]:
    """{dotted module name: file} for every .py under root/package, and for every compiled
    extension (`_fastbpe.c`, built or not, and its .so/.pyd): leaves that import nothing."""
    out = {}
    for path in sorted((root / package).rglob("*")):
        if path.suffix not in (".py", ".c", ".so", ".pyd"):
            continue
        parts = list(path.relative_to(root).parts)
        parts[-1] = parts[-1].split(".")[0]  # _fastbpe.cpython-311-x86_64-linux-gnu.so
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if path.suffix == ".py" or name not in out:
            out[name] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` (file `path`) imports, anywhere in it."""
    if path.suffix != ".py":
        return set()
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start at
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here.split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles_in_tinyllm() -> None:
    graph = import_graph()
    assert len(graph) > 30 and sum(map(len, graph.values())) > 50  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_directions_the_design_names() -> None:
    graph = import_graph()
    assert graph["tinyllm.model.config"] <= {"tinyllm.errors"}  # plain data, a leaf
    assert "tinyllm.tokenizer.bpe" in graph["tinyllm.tokenizer.hf"]
    assert "tinyllm.tokenizer.bpe" in graph["tinyllm.tokenizer.tiktoken_io"]
    core = reaches(graph, "tinyllm.tokenizer.bpe")
    assert not core & {"tinyllm.tokenizer.hf", "tinyllm.tokenizer.tiktoken_io"}
    assert not any(m.startswith("tinyllm.data") for m in reaches(graph, "tinyllm.sampling"))
    assert (
        "tinyllm.chat" in graph["tinyllm.sampling"] and "tinyllm.chat" in graph["tinyllm.data.qa"]
    )


@pytest.mark.parametrize("function_level", [False, True])
def test_a_cycle_is_found_and_named(tmp_path: Path, function_level: bool) -> None:
    pkg = tmp_path / "tinyllm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from tinyllm.sub import b\n")  # package -> child: no cycle
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom tinyllm import errors\n")
    (pkg / "errors.py").write_text("")
    (pkg / "sub" / "_ext.c").write_text("int x;")  # an extension: a module, not its package
    (pkg / "sub" / "ext_user.py").write_text("from tinyllm.sub import _ext\n")
    late = "def f():\n    from tinyllm import a\n" if function_level else "from .. import a\n"
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text(late)
    graph = import_graph(tmp_path)
    assert graph["tinyllm.sub.ext_user"] == {"tinyllm.sub._ext"}
    assert find_cycle(graph) is None  # c -> a -> errors: no way back
    (pkg / "errors.py").write_text("from tinyllm.sub.b import thing\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None
    assert cycle[0] == cycle[-1] and len(cycle) == 5  # named in import order, closed
    assert set(cycle) == {"tinyllm.a", "tinyllm.errors", "tinyllm.sub.b", "tinyllm.sub.c"}
