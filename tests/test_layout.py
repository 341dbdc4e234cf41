"""The package's shape: every import points down the layer order, no cycles, small files and functions.

The layer order is written once, here (``LAYERS``) and in ``latentdiff/__init__.py``'s docstring.  A
module may import from its own layer and the layers before it; ``latentdiff/<name>.py`` entry shims
and ``latentdiff/__init__.py`` sit above everything.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "latentdiff"
LAYERS = ["utils", "diffusion", "solvers", "models", "vae", "contracts", "data", "metrics", "training",
          "sampling", "cli"]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every latentdiff module ``name`` imports, at module level or inside functions."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module == "latentdiff" and [a.name for a in node.names] == ["__version__"]:
                continue  # the version constant of the package face
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in LAYERS:  # the package face and the `python -m` shims
        return len(LAYERS)
    return LAYERS.index(parts[1])


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS), f"package folders {sorted(folders)} != the layers {LAYERS}"


def test_imports_point_down_the_layer_order():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for target in _imports(name, path, modules):
            if target == "latentdiff" and _layer(name) < len(LAYERS):
                upward.append(f"{name} imports the package face 'latentdiff' (import the module it names)")
            elif _layer(target) > _layer(name):
                upward.append(f"{name} (layer {LAYERS[_layer(name)]}) imports {target}")
    assert not upward, "imports that point up the layer order:\n  " + "\n  ".join(sorted(upward))


def test_no_import_cycles():
    modules = _modules()
    graph = defaultdict(set)
    for name, path in modules.items():
        for target in _imports(name, path, modules):
            if not name.startswith(target + "."):  # a module importing its own package face
                graph[name].add(target)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_files_and_functions_stay_small():
    too_long = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(PKG.parent)}: {n} lines > {MAX_FILE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                length = body[-1].end_lineno - body[0].lineno + 1 if body else 0
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: "
                                    f"{length} lines > {MAX_FUNCTION_LINES}")
    assert not too_long, "\n".join(too_long)


def test_layer_order_is_documented_once_in_the_package_docstring():
    doc = ast.get_docstring(ast.parse((PKG / "__init__.py").read_text()))
    positions = [doc.index(f"``{layer}``") for layer in LAYERS]
    assert positions == sorted(positions), "latentdiff/__init__.py lists the layers in another order than LAYERS"
