"""The name -> function registry."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError
from posttrain.losses.registry import Registry


def test_register_get_names_and_aliases():
    registry = Registry("widget", field="widget_type")

    @registry.register("plain")
    def plain():
        return "plain"

    @registry.register("fancy", "old_fancy")
    def fancy():
        return "fancy"

    assert registry.names() == ["plain", "fancy"]
    assert registry.get("plain")() == "plain"
    assert registry.get("old_fancy") is fancy
    assert registry.canonical("old_fancy") == "fancy"
    assert "old_fancy" in registry and "missing" not in registry


def test_unknown_name_lists_known_names_and_field():
    registry = Registry("widget", field="widget_type")
    registry.register("a")(lambda: None)
    registry.register("b")(lambda: None)
    with pytest.raises(ConfigError) as info:
        registry.get("c")
    message = str(info.value)
    assert message.startswith("--widget_type:")
    assert "unknown widget 'c'" in message and "'a', 'b'" in message


def test_duplicate_names_are_refused():
    registry = Registry("widget")
    registry.register("a", "x")(lambda: None)
    with pytest.raises(ConfigError, match="twice"):
        registry.register("a")(lambda: None)
    with pytest.raises(ConfigError, match="twice"):
        registry.register("b", "x")(lambda: None)
