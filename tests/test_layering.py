"""The package's import graph: no cycles, and each layer imports only the layers below it.

Every import statement counts, at module level or inside a function. An
import of `starcoder_jax.a.b` or `from starcoder_jax.a import b` is an edge
to the module it names (`starcoder_jax.a.b` when that is a module, else the
package `starcoder_jax.a`, whose `__init__` runs). Python's implicit import
of a module's parent packages is not an edge: every parent's `__init__` is
listed explicitly where it matters (a module that imports the package root
`starcoder_jax` imports everything the root re-exports). Calls of
`importlib.import_module` with a literal name count as imports too.
"""

import ast
import os

from builders import REPO_ROOT

PACKAGE = "starcoder_jax"
PACKAGE_DIR = os.path.join(REPO_ROOT, PACKAGE)
# layer -> the layers it must not import
FORBIDDEN = {
    "ops": ("model", "inference", "training", "eval", "serve", "cli"),
    "parallel": ("model", "inference", "training", "eval", "serve", "cli"),
    "model": ("inference", "training", "eval", "serve", "cli"),
    "inference": ("training", "eval", "serve", "cli"),
    "serve": ("training", "eval", "cli"),
}


def _modules() -> dict[str, str]:
    """Module name -> file, for every .py file of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), REPO_ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join(rel)] = os.path.join(root, f)
    return found


def _imports(file: str, modules) -> set[str]:
    """The package modules a file's import statements name."""
    tree = ast.parse(open(file, encoding="utf-8").read(), file)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{file}: relative import"
            base = node.module or ""
            names |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                      for alias in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)  # importlib.import_module("starcoder_jax....")
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, file in modules.items():
        targets = set()
        for target in _imports(file, modules):
            while target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _cycle(graph) -> list[str] | None:
    """One cycle of the graph as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert len(graph) > 30 and "starcoder_jax.model.modules" in graph
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_layer_imports_only_the_layers_below_it():
    graph = _graph()
    problems = []
    for module, targets in sorted(graph.items()):
        forbidden = FORBIDDEN.get(_layer(module), ())
        for target in sorted(targets):
            if _layer(target) in forbidden or (forbidden and target == PACKAGE):
                problems.append(f"{module} imports {target}")
    assert not problems, "\n".join(problems)


def test_the_checks_see_a_cycle_and_a_layer_violation():
    """The two checks above fail on a graph that breaks them."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    modules = _modules()
    sample = os.path.join(PACKAGE_DIR, "ops", "matmul.py")
    assert "starcoder_jax.parallel.rules" not in _imports(sample, modules)
    assert _layer("starcoder_jax.ops.int8") == "ops" and "model" in FORBIDDEN["ops"]
