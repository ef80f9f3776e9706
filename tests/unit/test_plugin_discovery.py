"""Plugins are found by entry point, and the entry point's name is the microservice's.

``discover`` used to filter by entry-point name but store by the
microservice's name, so a plugin named otherwise than its entry point
escaped the policy's ``microservices`` list, and a second plugin of one
name silently replaced the first. Both now stop the start with a message
that names both entry points. The entry points below are real
``importlib.metadata.EntryPoint`` objects loading real modules.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from fdrtd_server.microservice import ENTRY_POINT_GROUP, Microservice, discover


def entry(name: str, value: str) -> EntryPoint:
    return EntryPoint(name, value, ENTRY_POINT_GROUP)


def test_matching_names_load() -> None:
    found = discover(entry_points=[entry("map", "microservices.compute:service")])
    assert list(found) == ["map"]
    assert isinstance(found["map"], Microservice) and found["map"].name == "map"


def test_an_entry_point_named_otherwise_than_its_microservice_is_refused() -> None:
    with pytest.raises(ValueError) as caught:
        discover(entry_points=[entry("mapreduce", "microservices.compute:service")])
    message = str(caught.value)
    assert "'mapreduce = microservices.compute:service'" in message
    assert "microservice 'map'" in message and "must be named 'map'" in message


def test_two_entry_points_of_one_name_are_refused_naming_both() -> None:
    entries = [
        entry("map", "microservices.compute:service"),
        entry("map", "microservices.catalogue:service"),
    ]
    with pytest.raises(ValueError) as caught:
        discover(entry_points=entries)
    message = str(caught.value)
    assert "two microservice plugins are named 'map'" in message
    assert "microservices.compute:service" in message
    assert "microservices.catalogue:service" in message


def test_a_duplicate_the_policy_does_not_load_is_let_be() -> None:
    entries = [
        entry("map", "microservices.compute:service"),
        entry("catalogue", "microservices.catalogue:service"),
        entry("catalogue", "microservices.compute:service"),
    ]
    assert list(discover(allowed=["map"], entry_points=entries)) == ["map"]


def test_the_installed_plugins_pass(example_plugin: None) -> None:
    found = discover()
    assert {"data", "catalogue", "map", "smpc", "psi", "example"} <= set(found)
    assert all(spec.name == name for name, spec in found.items())
