"""Every method in pyproject.toml is registered, loads, and shadows no built-in nerfstudio method; no module
imports from a layer above its own."""

from __future__ import annotations

import ast
import importlib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import tomllib
from nerfstudio.plugins.types import MethodSpecification

GROUP = "nerfstudio.method_configs"
DECLARED = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
    "entry-points"
][GROUP]


def builtin_method_names() -> set[str]:
    """nerfstudio's own methods and the external methods it advertises (before plugins merge in)."""
    from nerfstudio.configs import method_configs as ns
    from nerfstudio.configs.external_methods import get_external_methods

    external, _ = get_external_methods()
    return set(ns.method_configs) | set(external)


def test_installed_entry_points_match_pyproject():
    installed = {
        ep.name: ep.value for ep in entry_points(group=GROUP) if ep.value.startswith("method_configs.")
    }
    assert installed == DECLARED, "re-run `pip install -e .` after editing the entry points"


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_entry_point_is_a_method_specification_named_like_its_key(name):
    module, attribute = DECLARED[name].split(":")
    spec = getattr(importlib.import_module(module), attribute)
    assert isinstance(spec, MethodSpecification)
    assert spec.config.method_name == name
    assert spec.description


def test_no_plugin_method_shadows_a_builtin():
    builtins = builtin_method_names()
    assert {"nerfacto", "splatfacto", "generfacto"} <= builtins  # the check itself sees the built-ins
    assert not set(DECLARED) & builtins


def test_nerfstudio_discovers_the_methods():
    from nerfstudio.plugins.registry import discover_methods

    methods, _ = discover_methods()
    assert set(DECLARED) <= set(methods)


LAYERS = {
    "errors": 0,
    "compat": 1,
    "data": 2,
    "models": 2,
    "priors": 2,
    "guidance": 2,
    "pipelines": 3,
    "scripts": 4,
}
"""Layer of each subpackage of nerfstudio_distill: a module may import its own layer and the ones below."""
PACKAGE = Path(__file__).parents[1] / "nerfstudio_distill"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, at any depth (function bodies too)."""
    package = ["nerfstudio_distill", *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name == "nerfstudio_distill":  # from nerfstudio_distill import pipelines
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return found


def test_no_import_runs_up_the_layers():
    assert set(LAYERS) == {
        p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir() if not p.name.startswith("_")
    }, "give every subpackage of nerfstudio_distill a layer in LAYERS"
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own not in LAYERS:  # the package's own __init__
            continue
        for line, name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "nerfstudio_distill" and len(parts) > 1 and LAYERS.get(parts[1], -1) > LAYERS[own]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not upward, "imports from a higher layer: " + "; ".join(upward)
