"""A plugin's own policy switches: declared with defaults, set by the owner, read by functions.

A microservice declares ``service.switch(name, default, doc)``; the owner
sets it in ``fdrtd.toml`` under ``[policy.<microservice>]``; a function reads
``ctx.policy(name)`` or refuses with ``ctx.require(name, what, why)``. A
switch set in the config that the microservice does not declare, a table of
a microservice that is not installed, and a function that lists an unknown
switch in its ``policy=`` all stop the start with a clear message. The
server's own switches (``allow_set_union`` ...) work as before.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from fdrtd_server.config import Settings, load_settings
from fdrtd_server.errors import Forbidden, PluginError
from fdrtd_server.microservice import (
    ENTRY_POINT_GROUP,
    CallContext,
    Environment,
    Microservice,
    _Runner,
    discover,
)
from fdrtd_server.server import environment

service = Microservice("vecmean", "1.0.0", "A plugin with a switch of its own.")
ALLOW_TWO = service.switch(
    "allow_vector_mean_of_two", False, "a mean of two parties tells each the other's sum"
)
SHOW_COUNT = service.switch("show_count", True, "whether results carry the joint count")


@service.job("mean", policy=[ALLOW_TWO, "allow_set_union"])
async def mean(ctx: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """A function that lists the switches it reads."""
    return {}


ENTRIES = [
    EntryPoint("vecmean", f"{__name__}:service", ENTRY_POINT_GROUP),
    EntryPoint("map", "microservices.compute:service", ENTRY_POINT_GROUP),
]


def home_with(tmp_path: Path, policy: str) -> Path:
    (tmp_path / "fdrtd.toml").write_text(f'[server]\nname = "unit"\n{policy}', "utf-8")
    return tmp_path


def context(env: Environment) -> CallContext:
    runner = _Runner(None, env, service)  # type: ignore[arg-type]  (no bus needed here)
    return CallContext(
        None,  # type: ignore[arg-type]
        env,
        "analyst",
        "analyst",
        microservice=service.name,
        switches=runner.switches,
    )


def test_the_owner_sets_a_switch_in_the_table_of_the_microservice(tmp_path: Path) -> None:
    home = home_with(
        tmp_path,
        "[policy]\nallow_set_union = true\n[policy.vecmean]\nallow_vector_mean_of_two = true\n",
    )
    settings = load_settings(home, environ={})
    assert settings.plugin_policy == {"vecmean": {"allow_vector_mean_of_two": True}}
    assert discover(settings.microservices, settings.plugin_policy, entry_points=ENTRIES)
    ctx = context(environment(settings))
    assert ctx.policy(ALLOW_TWO) is True
    assert ctx.policy(SHOW_COUNT) is True  # its default
    assert ctx.policy("allow_set_union") is True  # the server's own switches as before
    ctx.require(ALLOW_TWO, "vector means of two parties", "each learns the other's sum")


def test_a_switch_left_unset_has_its_default_and_refuses_with_where_to_set_it() -> None:
    ctx = context(Environment(server="unit"))
    assert ctx.policy(ALLOW_TWO) is False and ctx.policy(SHOW_COUNT) is True
    with pytest.raises(Forbidden) as caught:
        ctx.require(ALLOW_TWO, "vector means of two parties", "each learns the other's sum")
    assert "allow_vector_mean_of_two = true in [policy.vecmean]" in caught.value.message
    with pytest.raises(Forbidden, match="allow_set_union = true"):
        ctx.require("allow_set_union", "set unions", "they disclose")


def test_an_unknown_switch_in_the_config_stops_the_start(tmp_path: Path) -> None:
    home = home_with(tmp_path, "[policy.vecmean]\nallow_vector_mean_of_too = true\n")
    settings = load_settings(home, environ={})  # which switches exist is known at start
    with pytest.raises(ValueError) as caught:
        discover(settings.microservices, settings.plugin_policy, entry_points=ENTRIES)
    message = str(caught.value)
    assert "[policy.vecmean] sets 'allow_vector_mean_of_too'" in message
    assert "allow_vector_mean_of_two" in message and "show_count" in message


def test_a_built_in_switch_in_a_plugin_table_is_unknown_there() -> None:
    with pytest.raises(ValueError, match=r"\[policy.map\] sets 'allow_set_union'"):
        discover(policy={"map": {"allow_set_union": True}}, entry_points=ENTRIES)


def test_the_table_of_a_microservice_not_installed_stops_the_start() -> None:
    with pytest.raises(ValueError, match=r"\[policy.vecmaen\].*not installed.*vecmean"):
        discover(policy={"vecmaen": {"allow_vector_mean_of_two": True}}, entry_points=ENTRIES)
    # one installed but left out by the policy's microservices list is not loaded nor checked
    assert list(discover(["map"], {"vecmean": {"x": True}}, entry_points=ENTRIES)) == ["map"]


def test_a_switch_value_must_be_a_boolean(tmp_path: Path) -> None:
    home = home_with(tmp_path, '[policy.vecmean]\nallow_vector_mean_of_two = "yes"\n')
    with pytest.raises(ValueError, match=r"\[policy.vecmean\] 'allow_vector_mean_of_two' must be"):
        load_settings(home, environ={})


def test_start_microservices_checks_too() -> None:
    env = Environment(server="unit", plugin_policy={"vecmean": {"nope": True}})
    with pytest.raises(ValueError, match="'nope'"):
        _Runner(None, env, service)  # type: ignore[arg-type]


def test_a_function_listing_an_unknown_switch_is_refused_at_import() -> None:
    other = Microservice("other", "1.0.0", "A plugin with a typo.")
    other.switch("allow_this", False, "")
    with pytest.raises(ValueError, match=r"'allow_that'.*allow_this"):

        @other.job("leak", policy=["allow_that"])
        async def leak(ctx: Any, inputs: dict[str, Any]) -> dict[str, Any]:
            """Never registered."""
            return {}


def test_reading_an_undeclared_switch_is_a_plugin_error_naming_the_known_ones() -> None:
    ctx = context(Environment(server="unit"))
    with pytest.raises(PluginError) as caught:
        ctx.policy("allow_everything")
    assert "'allow_everything'" in caught.value.message
    assert "allow_vector_mean_of_two" in caught.value.message
    assert "allow_set_union" in caught.value.message


@pytest.mark.parametrize(
    ("name", "default", "text"),
    [
        ("Allow", False, "switch name"),
        ("allow_set_union", False, "setting of the server"),
        ("min_cohort", False, "setting of the server"),
        ("allow_vector_mean_of_two", False, "declared twice"),
        ("allow_x", 1, "True or False"),
    ],
)
def test_a_bad_declaration_is_refused(name: str, default: Any, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        service.switch(name, default, "")


def test_settings_without_tables_have_no_plugin_policy(tmp_path: Path) -> None:
    assert Settings(home=tmp_path, name="unit").plugin_policy == {}
    assert environment(Settings(home=tmp_path, name="unit")).plugin_policy == {}
