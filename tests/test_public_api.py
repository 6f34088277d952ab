"""Every name the package exports imports, and the README's import lines run."""

import importlib

import rvclora


def test_every_name_in_all_imports():
    missing = [name for name in rvclora.__all__ if not hasattr(rvclora, name)]
    assert missing == [], f"names in rvclora.__all__ that `from rvclora import …` cannot import: {missing}"


def test_star_import_gives_all():
    namespace: dict = {}
    exec("from rvclora import *", namespace)
    assert set(rvclora.__all__) <= set(namespace)


def test_subpackage_all_names_import():
    for module_name in ("rvclora.ops", "rvclora.models"):
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), f"{module_name}.__all__ names {name!r}, which does not import"


def _imported_modules(path: str) -> set[str]:
    """Every ``rvclora`` module ``path`` imports, at any depth of its code (function-local imports too)."""
    import ast

    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or "")
            out.update(a.name for a in node.names if node.module is None)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rvclora."):
            out.add(node.module.split(".")[1])
    return out


def test_blend_and_checkpoint_have_no_import_cycle():
    # blend reads files through checkpoint; checkpoint writes layer records from rvclora.records, never from blend
    import os

    root = os.path.dirname(rvclora.__file__)
    assert "blend" not in _imported_modules(os.path.join(root, "checkpoint.py"))
    assert not {"blend", "checkpoint"} & _imported_modules(os.path.join(root, "records.py"))
    assert "checkpoint" in _imported_modules(os.path.join(root, "blend.py"))
