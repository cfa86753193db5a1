"""The package's shape: imports point down the layer order and never reach another module's private name."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "topk_lib"

# Lower layers never import higher ones; packages on one layer do not import each other,
# except infra, which may use the validation helpers.
LAYER = {
    "_validate": 0, "infra": 0,
    "kernels": 1,
    "nn": 2, "hf": 2, "data": 2, "selectors": 2,
    "analysis": 3, "tasks": 3,
    "experiments": 4, "bench": 4,
    "plots": 5,
    "app": 6,
}
SAME_LAYER_ALLOWED = {("infra", "_validate")}
MAX_LINES = 500


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(name: str) -> str | None:
    """The top-level subpackage (or ``_validate``) a ``topk_lib.*`` module name belongs to."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "topk_lib" else None


def imports(tree: ast.Module, module: str):
    """(line, imported module, imported names) for every import of a ``topk_lib`` module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("topk_lib"):
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            if base.startswith("topk_lib"):
                yield node.lineno, base, [a.name for a in node.names]


def test_every_subpackage_has_all():
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent == PACKAGE or "__pycache__" in init.parts:
            continue
        tree = ast.parse(init.read_text())
        names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert "__all__" in names, f"{init.relative_to(PACKAGE.parent)} has no __all__"


def test_every_name_in_all_exists():
    import importlib

    for init in sorted(PACKAGE.rglob("__init__.py")):
        package = importlib.import_module(dotted(init))
        for name in package.__all__:
            present = hasattr(package, name) or (init.parent / f"{name}.py").exists() or (init.parent / name).is_dir()
            assert present, f"{package.__name__}.__all__ names {name!r}, which is neither a module nor an attribute"


def test_imports_point_down_the_layers_and_never_reach_private_names():
    problems = []
    for path in modules():
        module = dotted(path)
        own = part_of(module) or "__init__"
        tree = ast.parse(path.read_text())
        imported_modules = {}
        for line, target, names in imports(tree, module):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if own == "__init__":
                continue  # the public API re-exports from every layer
            theirs = part_of(target)
            if theirs is None:
                problems.append(f"{where}: imports the top-level package {target!r}; import the subpackage instead")
                continue
            if theirs != own:
                if LAYER[theirs] > LAYER[own]:
                    problems.append(f"{where}: {own} (layer {LAYER[own]}) imports {target} (layer {LAYER[theirs]})")
                elif LAYER[theirs] == LAYER[own] and (own, theirs) not in SAME_LAYER_ALLOWED:
                    problems.append(f"{where}: {own} imports {target} of the same layer")
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    problems.append(f"{where}: imports the private name {name} from {target}")
                imported_modules[name] = target
        # module._name on an imported topk_lib module reaches a private name too
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                                f"uses the private name {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)


def test_no_module_is_over_the_size_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("source, problem", [
    ("from topk_lib.app.explorer import x\n", "layer"),
    ("from topk_lib.kernels.attention import _chunk_scores\n", "private"),
    ("from topk_lib.kernels import attention\nattention._Kept\n", "private"),
    ("from topk_lib import topk_attention\n", "top-level"),
])
def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch, source, problem):
    pkg = tmp_path / "topk_lib"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "kernels" / "bad.py").write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match=problem):
        test_imports_point_down_the_layers_and_never_reach_private_names()
