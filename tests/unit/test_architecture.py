"""The package's modules stand in layers (README, "Architecture"): no import cycle, no import upward.

Imports inside functions count too: a lazy import is still a dependency. A module of a package
(gpt2.checkpoint.store, gpt2.checkpoint.__main__) stands in its package's layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS: list[set[str]] = [
    {"errors", "logs", "config", "storage", "tokenizer", "distributed", "runtime", "watchdog",
     "fetch"},
    {"model", "shards", "optim", "metrics", "hellaswag"},
    {"data", "checkpoint", "prepare", "recipe", "goodput", "compile_cache"},
    {"loading", "sample", "evaluator", "microbatch"},
    {"train", "evaluate"},
    {"bench", "plot", "status", "launch", "chaos"},
]
LAUNCHER_ONLY = {"submitit": "launch.slurm", "kubernetes": "launch.k8s"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO / "gpt2").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every gpt2 module and launcher-only package `path` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("gpt2."):
                found.add(name.removeprefix("gpt2."))
            elif name.split(".")[0] in LAUNCHER_ONLY:
                found.add(name.split(".")[0])
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (REPO / "gpt2").rglob("*.py")}
    modules.pop("", None)
    edges = {}
    for name, path in modules.items():
        # `from gpt2.checkpoint import CheckpointError` names a symbol: keep only real modules
        edges[name] = {m for m in imports_of(path) if m in modules or m in LAUNCHER_ONLY} - {name}
    return edges


def layer_of(module: str) -> int:
    """The layer of a module, or of the nearest package above it that has one."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        for i, layer in enumerate(LAYERS):
            if ".".join(parts[:n]) in layer:
                return i
    raise AssertionError(f"gpt2.{module} is in no layer: add it to LAYERS here and to the README")


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    edges = graph()
    upward = [f"gpt2.{m} (layer {layer_of(m)}) imports gpt2.{d} (layer {layer_of(d)})"
              for m, deps in edges.items() for d in deps if d not in LAUNCHER_ONLY and layer_of(d) > layer_of(m)]
    assert upward == []


def test_no_import_cycle():
    edges = graph()
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        for dep in edges.get(node, ()):
            visit(dep, stack + [node])

    for module in edges:
        visit(module, [])
    assert cycles == []


def test_launcher_dependencies_stay_in_their_launchers():
    edges = graph()
    users = {dep: sorted(m for m, deps in edges.items() if dep in deps) for dep in LAUNCHER_ONLY}
    assert users == {dep: [module] for dep, module in LAUNCHER_ONLY.items()}


def test_an_import_inside_a_function_counts_and_a_package_module_keeps_its_packages_layer(tmp_path):
    """What the checks above would catch: gpt2.checkpoint.__main__ (layer of gpt2.checkpoint) importing
    gpt2.loading (a layer above) inside a function, as it once did."""
    module = tmp_path / "cli.py"
    module.write_text("def export():\n    from gpt2.loading import load_model\n    return load_model\n")
    assert imports_of(module) == {"loading", "loading.load_model"}
    assert layer_of("checkpoint.__main__") == layer_of("checkpoint") < layer_of("loading")
