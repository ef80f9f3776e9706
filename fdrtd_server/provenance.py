"""Where a multi-party computation's inputs come from, and the owner's ``analyst_inputs`` rule.

An analyst who brings records of her own to a multi-party computation knows
their part in every exact joint result, and subtracts it: the rest is the
other parties' part, exactly. Her padding lifts every cell of a joint table
above the small-cell threshold, every count above the minimum cohort, and
the result minus her padding is the owner's small or empty cells. The
owner's policy key ``analyst_inputs`` (:class:`~fdrtd_server.policy.DatasetPolicy`,
false by default) says whether exact results of a named dataset may be
computed beside inputs the caller supplied herself.

The rule is kept in the SDK, for every multi-party function alike:

1. :meth:`~fdrtd_server.microservice.CallContext.load_dataset` notes, in the
   job's :class:`Provenance`, each data handle it loads (an input the caller
   supplied) and each named dataset it reads exactly (no differentially
   private release) whose owner keeps ``analyst_inputs = false``;
2. every party declares that (:meth:`Provenance.declared`, key :data:`KEY`)
   with the public values of its setup (``fdrtd_server.sdk.declare``);
3. once every party's declaration is known, and before anything but the
   setup is opened, every party calls :func:`vet`, which refuses (403, on
   every party alike, from the same public values) a computation in which a
   party reads such a dataset and any party brings an input of the caller's.

A differentially private release (``load_dataset(..., private=True)`` of a
dataset under DP) is not refused: its noise hides any single record, whatever
the analyst knows of the others.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fdrtd_server.errors import ComputationFailed, Forbidden, PluginError

__all__ = ["KEY", "Provenance", "bind", "bound", "vet"]

KEY = "provenance"
"""The key of a party's declaration in the public values of a multi-party setup."""


@dataclass
class Provenance:
    """What one party's job has loaded: inputs of the caller's, datasets the rule guards.

    Attributes:
        supplied: Whether the job loaded a data handle (an upload of the caller's).
        guarded: The named datasets it read exactly whose owner's policy has
            ``analyst_inputs = false``.
    """

    supplied: bool = False
    guarded: set[str] = field(default_factory=set)
    _declared: bool = False

    def upload(self) -> None:
        """The job loaded an input the caller supplied (a data handle)."""
        self._note(supplied=True)

    def named(self, name: str, *, exact: bool, analyst_inputs: bool) -> None:
        """The job read the named dataset ``name`` (``exact``: without differential privacy)."""
        if exact and not analyst_inputs:
            self._note(guarded=name)

    def _note(self, *, supplied: bool = False, guarded: str | None = None) -> None:
        changes = (supplied and not self.supplied) or (
            guarded is not None and guarded not in self.guarded
        )
        if changes and self._declared:
            raise PluginError(
                "a multi-party function loaded a dataset after it declared its inputs to the "
                "other parties; load every dataset before the session's setup"
            )
        self.supplied = self.supplied or supplied
        if guarded is not None:
            self.guarded.add(guarded)

    def declared(self) -> dict[str, Any]:
        """This party's declaration (value of :data:`KEY`); nothing may be loaded after it."""
        self._declared = True
        return {"supplied": self.supplied, "guarded": sorted(self.guarded)}


_BOUND: weakref.WeakKeyDictionary[Any, Provenance] = weakref.WeakKeyDictionary()
"""The provenance of the job each open peer session belongs to (see :func:`bind`)."""


def bind(session: Any, provenance: Provenance) -> None:
    """Remember that ``session`` (a peer session) runs the job whose inputs ``provenance`` notes.

    ``fdrtd_server.sdk.session_for`` binds every session it opens, so that an
    ``SmpcSession`` set up without ``declare`` still declares (:func:`bound`).
    """
    with contextlib.suppress(TypeError):  # a stand-in session without weak references
        _BOUND[session] = provenance


def bound(session: Any) -> Provenance | None:
    """The provenance bound to ``session`` by :func:`bind`, if any."""
    return _BOUND.get(session)


def vet(public: Mapping[str, Any]) -> None:
    """Refuse, on every party alike, guarded datasets computed beside inputs of the caller's.

    Args:
        public: Every party's public setup values, by party; a party that
            declared no :data:`KEY` brings neither (a protocol step run on its
            own, without a job's datasets).

    Raises:
        Forbidden: If any party declared a guarded dataset and any party an
            input the caller supplied (marked ``collective``: every party
            reaches it from the same declarations).
        ComputationFailed: If a party's declaration is malformed.
    """
    guarded: list[tuple[str, str]] = []
    supplying: list[str] = []
    for party, values in public.items():
        found = values.get(KEY) if isinstance(values, Mapping) else None
        if found is None:
            continue
        names = found.get("guarded") if isinstance(found, Mapping) else None
        flag = found.get("supplied") if isinstance(found, Mapping) else None
        if (
            not isinstance(flag, bool)
            or not isinstance(names, list)
            or len(names) > 64
            or not all(isinstance(n, str) and 0 < len(n) <= 64 for n in names)
        ):
            raise ComputationFailed(f"party '{party}' sent a malformed '{KEY}' declaration")
        guarded += [(party, name) for name in names]
        if flag:
            supplying.append(str(party))
    if not guarded or not supplying:
        return
    party, name = guarded[0]
    error = Forbidden(
        f"the owner of dataset '{name}' (on party '{party}') does not allow exact results "
        "of it beside data the caller supplied herself (an upload, on party "
        f"{', '.join(repr(p) for p in supplying)}): its policy has analyst_inputs = false, "
        "since knowing her own records she could subtract them from the joint result. "
        "Use named datasets on every party, a function with a differentially private "
        f"release, or ask the owner to set analyst_inputs = true in [datasets.{name}]"
    )
    error.collective = True  # every party sees the same declarations: no abort needed
    raise error
