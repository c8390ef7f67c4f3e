"""The package's layout rules: no import cycles, pure modeling, one registry of trainers.

``python tests/test_layout.py`` prints the import graph's cycles (none) and each module's samnnu imports.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each sub-package of samnnu lives in the source tree (setup.py's package_dir)
PACKAGE_DIRS = {"samnnu": ROOT / "samnnu", "samnnu.plans": ROOT / "plans", "samnnu.trainers": ROOT / "trainers",
                "samnnu.dataset_conversion": ROOT / "dataset_conversion"}


def modules() -> dict[str, Path]:
    """Every samnnu module by dotted name -> its file."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p in ("demo_data",) for p in parts) and path.name != "__init__.py":
                continue
            name = ".".join([package, *parts])
            if package == "samnnu" and parts and parts[0] in ("plans", "trainers", "dataset_conversion"):
                continue
            found[name] = path
    return found


def imports_of(path: Path, name: str, known: set[str], *, top_level_only: bool = False) -> set[str]:
    """The samnnu modules ``path`` imports (every import statement, also inside functions, unless
    ``top_level_only``); ``from package import module`` counts as importing that module."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    is_package = path.name == "__init__.py"
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        for t in targets:
            if t in known and t != name:
                out.add(t)
    # TYPE_CHECKING-only imports never run
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.module in out:
                    out.discard(sub.module)
    return out


def import_graph(**kwargs) -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = imports_of(path, name, known, **kwargs)
        # importing a.b.c also imports the packages a.b and a: those edges are not design choices
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                result.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_no_import_cycles_even_through_function_local_imports():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modeling_is_pure_pytorch():
    """samnnu.modeling imports nothing of nnU-Net's training code and nothing of samnnu's pipeline."""
    graph = import_graph()
    for name, path in modules().items():
        if not name.startswith("samnnu.modeling"):
            continue
        text = path.read_text()
        assert "nnunetv2.training" not in text, name
        for dep in graph[name]:
            assert dep.startswith(("samnnu.modeling", "samnnu.errors")), (name, dep)


def test_every_trainer_module_is_found_by_the_registry():
    from samnnu.trainers import samnnu_trainers

    trainers = samnnu_trainers()
    expected = {"SAMedLoRATrainer", "SAMMed2DAdapterTrainer", "SAMUNetTrainer", "nnSAMTrainer",
                "SAM3DAdapterTrainer", "SelfPromptTrainer", "ImplicitDecoderTrainer", "SAMUNetContextTrainer",
                "SAMUNetDeepSupervisionTrainer", "SAMUNetLoRATrainer", "SAMUNetInput2xTrainer",
                "SAMUNetHalfEncoderTrainer"}
    assert set(trainers) == expected
    from samnnu.trainers.base import SAMTrainerBase

    assert "SAMTrainerBase" not in trainers and SAMTrainerBase.__abstractmethods__ == {"build_network_architecture"}


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    for name in sorted(graph):
        print(f"{name}: {', '.join(sorted(graph[name])) or '-'}")
    print(f"\n{len(graph)} modules; import cycles: {found or 'none'}")
    sys.exit(1 if found else 0)
