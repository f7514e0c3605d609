"""The package layout of docs/architecture.md: no import cycles, no flat reader modules."""

import ast
import os
import pathlib

import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("uda_tf", "augment", "flags")


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports, anywhere in its body (lazy imports too)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state = {}  # name -> "open" while on the stack, "done" after

    def visit(name, stack):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                cycle = visit(dep, stack + [dep])
                if cycle:
                    return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            if cycle:
                return cycle
    return None


class ArchitectureTest(tf.test.TestCase):
    def test_no_import_cycle(self):
        self.assertIsNone(find_cycle(import_graph()))

    def test_find_cycle_finds_one(self):
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
        self.assertEqual(find_cycle(graph), ["a", "b", "c", "a"])

    def test_packages_hold_the_pipeline(self):
        top = {p.name for p in (REPO / "uda_tf").glob("*.py")}
        self.assertEmpty([n for n in top if n.startswith("readers")])
        self.assertNotIn("data.py", top)
        self.assertNotIn("export.py", top)
        for package in ("data", "export", "models", "experiments"):
            self.assertTrue(os.path.isfile(REPO / "uda_tf" / package / "__init__.py"), package)
