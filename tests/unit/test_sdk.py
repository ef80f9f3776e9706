"""The protocol SDK's facade: every name of ``__all__`` imports, and it is all a plugin needs.

``fdrtd_server.sdk`` is the one package a plugin (and every built-in
microservice and protocol) imports from fdrtd; ``lint-imports`` keeps the
repository to it. A name added to or removed from the facade changes the
plugin interface, so the list below must be changed with it, on purpose.
"""

from __future__ import annotations

import importlib
import inspect
import types

import fdrtd_server.sdk as sdk

EXPECTED = {
    # the plugin interface
    "Microservice",
    "JobContext",
    "CallContext",
    "Dataset",
    "Input",
    "Output",
    "DATA",
    "COLUMN",
    "distribution_version",
    # errors
    "FdrtdError",
    "BadRequest",
    "NotFound",
    "Forbidden",
    "Conflict",
    "CohortTooSmall",
    "ComputationFailed",
    "OutOfRange",
    "PartyTimeout",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "PluginError",
    # peers
    "PeerSession",
    "both",
    "session_for",
    "declare",
    "agree",
    "check_joint_cohort",
    "vet_declared",
    "vet_inputs",
    "joint_count",
    # secure computation
    "SmpcSession",
    "points_from",
    "Stage",
    "Message",
    "StagedPeers",
    "send_bytes",
    "receive_bytes",
    "canonical_ids",
    "id_bytes",
    "join_ids",
    "join_domain",
    "ring",
    "curve",
    # disclosure
    "numeric",
    "finite_rows",
    "finite_result",
    "suppress",
    # differential privacy
    "privacy",
    "private_release",
    "EPSILON",
    "PRIVACY",
    # misc
    "exit_with",
    "wire",
    "Namespace",
}


def test_the_facade_is_the_expected_list() -> None:
    assert set(sdk.__all__) == EXPECTED
    assert len(sdk.__all__) == len(set(sdk.__all__))


def test_every_name_imports() -> None:
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None, name
        exec(f"from fdrtd_server.sdk import {name}", {})


def test_the_modules_are_the_sdk_modules() -> None:
    assert isinstance(sdk.ring, types.ModuleType) and sdk.ring.__name__ == "fdrtd_server.sdk.ring"
    assert sdk.curve.__name__ == "fdrtd_server.sdk.curve"
    assert sdk.privacy.__name__ == "fdrtd_server.sdk.privacy"
    assert sdk.wire.__name__ == "fdrtd_client.wire"  # the one codec (docs/architecture.md)


def test_the_built_in_protocols_import_only_the_facade_names() -> None:
    # what protocols/ and microservices/ take from the facade is in __all__
    # (lint-imports checks they take nothing else of fdrtd_server)
    for module in (
        "protocols.smpc.service",
        "protocols.smpc.order",
        "protocols.smpc.product",
        "protocols.smpc.regression",
        "protocols.smpc.tables",
        "protocols.psi.service",
        "microservices.compute",
    ):
        loaded = importlib.import_module(module)
        source = inspect.getsource(loaded)
        assert "fdrtd_server.sdk.host" not in source, module


def test_session_for_asks_a_context_that_offers_its_own_session() -> None:
    sentinel = object()

    class Context:
        session = None

        def peer_session(self) -> object:
            return sentinel

    assert sdk.session_for(Context()) is sentinel  # type: ignore[arg-type]
