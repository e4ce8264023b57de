"""Draw docs/architecture/modules.png: layerpipe's packages and modules, and which imports which.

Run: python docs/make_architecture.py
The graph is read from the source (``ast``), so the picture changes only
when the imports do.  It also refuses an import cycle between modules.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACKAGE = os.path.join(ROOT, "layerpipe")

LAYERS = [
    ("entry points", ["cli", "train", "calibration", "plan"]),
    ("runtime and pictures", ["runtime", "emulation", "viz", "models", "ops"]),
    ("simulator (no torch)", ["sim"]),
    ("schedule engine (no torch)", ["schedule"]),
    ("configuration (no torch)", ["knobs", "options", "run_options"]),
]
"""Rows of the picture, top to bottom: each package imports only packages of its own row or below."""


def module_imports() -> dict[str, set[str]]:
    """Return, for every module of layerpipe (``runtime.executor``), the layerpipe modules it imports."""
    graph: dict[str, set[str]] = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            graph[module] = _imports_of(path, module)
    return graph


def _imports_of(path: str, module: str) -> set[str]:
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    package = module.split(".")[:-1] if not path.endswith("__init__.py") else module.split(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            if target:
                found.add(target)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("layerpipe."):
            found.add(node.module.removeprefix("layerpipe."))
    return found - {module, "__init__", ""}


def package_of(module: str) -> str:
    """Return the top-level part of a module name (``runtime.executor`` → ``runtime``; ``cli`` → ``cli``)."""
    return module.split(".")[0]


def check_no_cycle(graph: dict[str, set[str]]) -> None:
    """Raise ``ValueError`` naming a cycle of module imports, if there is one."""
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                raise ValueError("import cycle: " + " -> ".join(path + [module, target]))
            if target in graph and not state.get(target):
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [])


def transitive_reduction(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Return ``edges`` without those implied by a path of two or more other edges."""
    targets = defaultdict(set)
    for source, target in edges:
        targets[source].add(target)

    def reachable(start: str, skip: tuple[str, str]) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            for target in targets[node]:
                if (node, target) != skip and target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen

    return {edge for edge in edges if edge[1] not in reachable(edge[0], edge)}


def _box_text(package: str, names: list[str]) -> str:
    if not names:
        return package + ".py"
    half = (len(names) + 1) // 2 if len(names) > 7 else len(names)
    left, right = names[:half], names[half:]
    width = max(map(len, left))
    rows = [f"{a:<{width}}  {b}" if b else a for a, b in zip(left, right + [""] * (len(left) - len(right)))]
    return package + "/\n" + "\n".join(rows)


def draw(graph: dict[str, set[str]], path: str) -> None:
    """Draw one box per package listing its modules, and an arrow for every package that imports another."""
    modules = defaultdict(list)
    for module in sorted(graph):
        if module.count(".") == 1:
            modules[package_of(module)].append(module.split(".")[1])
    present = {package_of(module) for module in graph}
    figure, axes = plt.subplots(figsize=(11, 10))
    axes.set_xlim(0, 12)
    axes.set_ylim(-len(LAYERS) * 2.4 + 1.0, 1.2)
    axes.axis("off")
    boxes = {}
    for row, (title, packages) in enumerate(LAYERS):
        packages = [package for package in packages if package in present]
        axes.text(0.1, -row * 2.4, title, ha="left", va="center", fontsize=10, style="italic", color="#555555")
        step = min(2.6, 8.0 / max(1, len(packages) - 1))
        for column, package in enumerate(packages):
            x = 7.3 + (column - (len(packages) - 1) / 2) * step
            boxes[package] = axes.text(
                x,
                -row * 2.4,
                _box_text(package, modules.get(package, [])),
                ha="center",
                va="center",
                fontsize=8,
                family="monospace",
                multialignment="left",
                bbox=dict(boxstyle="round,pad=0.5", facecolor="#EEF3FA", edgecolor="#4C78A8"),
            )
    edges = {
        (package_of(a), package_of(b))
        for a, targets in graph.items()
        for b in targets
        if package_of(a) != package_of(b) and package_of(a) in boxes and package_of(b) in boxes
    }
    row_of = {package: row for row, (_, packages) in enumerate(LAYERS) for package in packages}
    for source, target in sorted(transitive_reduction(edges)):
        beside = row_of[source] == row_of[target]  # same row: from one box's side to the other's
        target_point = (
            ((0.0 if boxes[target].get_position()[0] > boxes[source].get_position()[0] else 1.0), 0.5)
            if beside
            else (0.5, 1.0)
        )
        source_point = (1.0 - target_point[0], 0.5) if beside else (0.5, 0.0)
        axes.annotate(
            "",
            xy=target_point,
            xycoords=boxes[target],
            xytext=source_point,
            textcoords=boxes[source],
            arrowprops=dict(
                arrowstyle="->", color="#777777", lw=1, shrinkA=4, shrinkB=4, connectionstyle="arc3,rad=0.12"
            ),
        )
    axes.set_title(
        "layerpipe: packages, their modules, and which package imports which\n"
        "(arrows point down; an import implied by a longer path is not drawn)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    graph = module_imports()
    check_no_cycle(graph)
    os.makedirs(os.path.join(HERE, "architecture"), exist_ok=True)
    draw(graph, os.path.join(HERE, "architecture", "modules.png"))
    print("wrote docs/architecture/modules.png")


if __name__ == "__main__":
    main()
