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
