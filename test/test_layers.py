"""The house rules of ``lmm_fusion``, read from the code: imports point down the layers of
``docs/architecture.md``, there is no import circle, every project import is at module top, and
only the optional heavy libraries are imported lazily."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmm_fusion"

#: Subpackage -> layer (docs/architecture.md). A module may import any lower layer.
LAYER = {
    "base": 0, "io": 1, "model": 1, "runtime": 2, "cycle": 3, "groundtruth": 3, "training": 4, "synth": 4,
    "ros": 5, "offline": 6, "carla": 6, "tools": 7, "cli": 8, "msg": 0,
}
#: Imports allowed within one layer, (importer, imported): ground truth scores a cycle's Assessment; a
#: training recipe synthesises its drives.
SAME_LAYER = {("groundtruth", "cycle"), ("training", "synth")}
#: Libraries that may be imported inside a function: optional, heavy, or ROS where a module must
#: stay importable without it.
LAZY_OK = {"rclpy", "tensorrt", "carla", "open3d", "ray", "ament_index_python", "builtin_interfaces", "rosgraph_msgs",
           "rcl_interfaces", "std_msgs", "sensor_msgs", "geometry_msgs", "nav_msgs", "tf2_msgs", "lifecycle_msgs"}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, module: str) -> Iterator[tuple[str, bool, int]]:
    """(imported module, at module top, line) for every import in ``path``; relative imports resolved.
    Imports under ``if TYPE_CHECKING:`` count as top-level (they never run)."""
    tree = ast.parse(path.read_text(), str(path))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # TYPE_CHECKING blocks and other module-level conditionals
            top.update(id(n) for n in ast.walk(node))
        top.add(id(node))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                # `from lmm_fusion.x import y` may name the module lmm_fusion.x.y
                named = f"{base}.{alias.name}"
                yield (named if named in _MODULES else base), id(node) in top, node.lineno


_MODULES = _modules()


def _role(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cli"


def _project_target(name: str) -> str | None:
    """The project module an import names (``lmm_fusion.a.b`` or its longest existing prefix)."""
    while name.startswith("lmm_fusion"):
        if name in _MODULES or name.split(".")[1:2] == ["msg"]:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_module_has_a_layer() -> None:
    roles = {_role(m) for m in _MODULES if m != "lmm_fusion"}
    assert roles <= set(LAYER), sorted(roles - set(LAYER))


@pytest.mark.parametrize("module", sorted(m for m in _MODULES if m != "lmm_fusion"))
def test_imports_point_down_and_sit_at_module_top(module: str) -> None:
    role = _role(module)
    problems = []
    for name, at_top, line in _imports(_MODULES[module], module):
        target = _project_target(name)
        if target is None:
            if not at_top and name.split(".")[0] not in LAZY_OK:
                problems.append(f"line {line}: `{name}` imported inside a function (only {sorted(LAZY_OK)} may be)")
            continue
        if not at_top and role != "cli":  # the CLI loads one subcommand module on demand
            problems.append(f"line {line}: project module `{name}` imported inside a function")
        other = _role(target)
        if other == role or target == "lmm_fusion":
            continue
        if LAYER[other] > LAYER[role] or (LAYER[other] == LAYER[role] and (role, other) not in SAME_LAYER):
            problems.append(f"line {line}: {role} (layer {LAYER[role]}) imports {target} "
                            f"({other}, layer {LAYER[other]})")
    assert not problems, "\n".join(problems)


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in _MODULES}
    for module, path in _MODULES.items():
        for name, _, _ in _imports(path, module):
            target = _project_target(name)
            if target in graph and target != module:
                graph[module].add(target)
    # Tarjan's strongly connected components: any component with more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    # A package's __init__ re-exporting its own modules is not a circle of behaviour.
    circles = [c for c in circles if not all(m.startswith(c[0].rsplit(".", 1)[0]) and
                                             any(x.endswith(("__init__",)) for x in c) for m in c)]
    assert not circles, circles
