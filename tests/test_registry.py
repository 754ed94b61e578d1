"""Every method in pyproject.toml is registered, loads, and shadows no built-in nerfstudio method."""

from __future__ import annotations

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
