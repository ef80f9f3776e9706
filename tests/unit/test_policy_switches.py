"""A plugin that asks for a policy switch the server does not know gets a clear error.

``Environment.require`` used to fall over with an AttributeError, which a
client saw only as "internal error (incident ...)". Now an unknown switch is
a :class:`~fdrtd_server.errors.PluginError` (500, a bug of the plugin) whose
message names the switch and the known ones and reaches the client as the
problem's detail; a switch declared with ``policy=`` when a function is
registered is checked at import time.
"""

from __future__ import annotations

from typing import Any

import pytest

from fdrtd_server.errors import Forbidden, PluginError
from fdrtd_server.microservice import Environment, Microservice, _sanitise, policy_switches

KNOWN = (
    "allow_map_reduce",
    "allow_set_union",
    "allow_set_intersection",
    "allow_matrix_product",
    "allow_vertical_regression",
)


def test_the_known_switches_are_the_policy_flags() -> None:
    assert set(policy_switches()) == set(KNOWN)


def test_an_unknown_switch_names_itself_and_the_known_ones() -> None:
    with pytest.raises(PluginError) as caught:
        Environment(server="alpha").require("allow_sets_union", "set unions", "they disclose")
    message = caught.value.message
    assert "'allow_sets_union'" in message
    for switch in KNOWN:
        assert switch in message
    assert caught.value.status == 500


def test_the_client_gets_the_message_not_an_incident_id() -> None:
    with pytest.raises(PluginError) as caught:
        Environment(server="alpha").require("server", "anything", "a field, not a switch")
    status, detail = _sanitise(caught.value)
    assert status == "500"
    assert "incident" not in detail
    assert "'server'" in detail and "allow_set_union" in detail


def test_a_known_switch_still_refuses_or_allows() -> None:
    with pytest.raises(Forbidden, match="allow_set_union = true"):
        Environment(server="alpha").require("allow_set_union", "set unions", "they disclose")
    Environment(server="alpha", allow_set_union=True).require("allow_set_union", "x", "y")


def test_a_declared_unknown_switch_is_refused_at_registration() -> None:
    spec = Microservice("plugin", "1.0.0", "A plugin with a typo.")
    with pytest.raises(ValueError, match="'allow_everything'"):

        @spec.job("leak", policy=["allow_everything"])
        async def leak(ctx: Any, inputs: dict[str, Any]) -> dict[str, Any]:
            """Never registered."""
            return {}

    assert "leak" not in spec.functions
