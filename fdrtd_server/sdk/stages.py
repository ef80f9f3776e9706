"""Named protocol stages, each with the form of its message, checked in one place.

A multi-party protocol is a sequence of stages, and every message between
the parties belongs to one. Each :class:`Stage` names its stage, the tag
prefix its messages travel under (the wire format), and a :class:`Message`
form: what a well-formed message of that stage is (a uint64 vector of a
length, a map with exactly these keys, bytes of a size, a count...). A
protocol sends and receives through :class:`StagedPeers`, which checks every
received message against its stage's form before the protocol sees it and
refuses a malformed one with one clear error naming the stage and the
sender. This is the shape of Flower's SecAgg+ workflow, whose stages are a
table of names and each stage's message keys, rather than checks written
again in every protocol.

Sizes a form cannot know when it is declared (the length of this sum's
vector) are named by a string in the declaration and given as keywords when
receiving::

    PIECE = Stage("sum piece", Message.uint64_vector(length="length"), tag="sum")
    piece = await staged.recv("b", PIECE, 7, 0, length=1024)  # tag "sum.7.0"

The forms check shape and types only. What a message *means* (curve points
that decode, parties listed in the same order) is still the protocol's to
check, after the form has passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from fdrtd_server.errors import ComputationFailed
from fdrtd_server.peers import PeerSession, both

__all__ = ["Malformed", "Message", "Stage", "StagedPeers"]

Size = int | str | None
"""A size in a declaration: fixed (int), given when receiving (its keyword), or any (None)."""


class Malformed(ValueError):
    """A message does not have its stage's form; the text says how, never echoing the value."""


def _size(size: Size, expected: Mapping[str, Any]) -> int | None:
    if isinstance(size, str):
        try:
            value = expected[size]
        except KeyError:
            raise TypeError(f"this stage's message needs '{size}=' when received") from None
        return None if value is None else int(value)
    return size


def _kind(value: Any) -> str:
    return type(value).__name__


@dataclasses.dataclass(frozen=True)
class Message:
    """The declared form of a stage's message; build one with the class methods.

    ``check(value, expected)`` raises :class:`Malformed` if ``value`` does not
    have the form, with the sizes named in the declaration looked up in
    ``expected``.
    """

    describe: str
    check: Callable[[Any, Mapping[str, Any]], None] = dataclasses.field(repr=False)

    @classmethod
    def array(cls, dtype: type[np.generic], *, length: Size = None) -> Message:
        """A one-dimensional NumPy array of ``dtype`` (of ``length`` elements, if given)."""
        name = np.dtype(dtype).name

        def check(value: Any, expected: Mapping[str, Any]) -> None:
            if not isinstance(value, np.ndarray) or value.dtype != np.dtype(dtype):
                got = value.dtype.name if isinstance(value, np.ndarray) else _kind(value)
                raise Malformed(f"expected a {name} array, got {got}")
            if value.ndim != 1:
                raise Malformed(f"expected a vector of {name}, got {value.ndim} dimensions")
            want = _size(length, expected)
            if want is not None and value.size != want:
                raise Malformed(f"expected {want} {name}, got {value.size}")

        return cls(f"{name} vector", check)

    @classmethod
    def uint64_vector(cls, *, length: Size = None) -> Message:
        """A vector of uint64 ring elements (a masked share)."""
        return cls.array(np.uint64, length=length)

    @classmethod
    def bytes(cls, *, size: Size = None, multiple: int | None = None, most: Size = None) -> Message:
        """A byte string of ``size`` bytes (or at ``most``), maybe a ``multiple`` of that many."""

        def check(value: Any, expected: Mapping[str, Any]) -> None:
            if not isinstance(value, bytes):
                raise Malformed(f"expected bytes, got {_kind(value)}")
            want = _size(size, expected)
            if want is not None and len(value) != want:
                raise Malformed(f"expected {want} bytes, got {len(value)}")
            top = _size(most, expected)
            if top is not None and len(value) > top:
                raise Malformed(f"expected at most {top} bytes, got {len(value)}")
            if multiple is not None and len(value) % multiple:
                raise Malformed(f"expected a multiple of {multiple} bytes, got {len(value)}")

        return cls("bytes", check)

    @classmethod
    def count(cls, *, minimum: int = 0, maximum: Size = None) -> Message:
        """An integer (not a bool) of at least ``minimum``, at most ``maximum`` if given."""

        def check(value: Any, expected: Mapping[str, Any]) -> None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise Malformed(f"expected an integer, got {_kind(value)}")
            if value < minimum:
                raise Malformed(f"expected a count of at least {minimum}")
            top = _size(maximum, expected)
            if top is not None and value > top:
                raise Malformed(f"expected a count of at most {top}")

        return cls("count", check)

    @classmethod
    def of_type(cls, kind: type, describe: str) -> Message:
        """A value of exactly the type ``kind`` (a str, a bool); errors call it ``describe``."""

        def check(value: Any, expected: Mapping[str, Any]) -> None:
            if type(value) is not kind:
                raise Malformed(f"expected {describe}, got {_kind(value)}")

        return cls(describe, check)

    @classmethod
    def text(cls) -> Message:
        """A string."""
        return cls.of_type(str, "a string")

    @classmethod
    def flag(cls) -> Message:
        """A bool."""
        return cls.of_type(bool, "a bool")

    @classmethod
    def constant(cls, value: bool | int | str) -> Message:
        """Exactly ``value`` (a marker such as ``True``), of its type."""

        def check(received: Any, expected: Mapping[str, Any]) -> None:
            if type(received) is not type(value) or received != value:
                raise Malformed(f"expected the constant {value!r}")

        return cls(f"constant {value!r}", check)

    @classmethod
    def list_of(cls, item: Message, *, length: Size = None) -> Message:
        """A list of ``length`` (if given) items of the form ``item``."""

        def check(value: Any, expected: Mapping[str, Any]) -> None:
            if not isinstance(value, list):
                raise Malformed(f"expected a list, got {_kind(value)}")
            want = _size(length, expected)
            if want is not None and len(value) != want:
                raise Malformed(f"expected a list of {want} items, got {len(value)}")
            for k, entry in enumerate(value):
                try:
                    item.check(entry, expected)
                except Malformed as error:
                    raise Malformed(f"item {k}: {error}") from None

        return cls(f"list of {item.describe}", check)

    @classmethod
    def map(
        cls,
        keys: Mapping[str, Message],
        *,
        optional: Mapping[str, Message] | None = None,
        open: bool = False,
    ) -> Message:
        """A map with exactly ``keys`` (each of its form), maybe ``optional`` ones.

        Args:
            keys: The keys every message has, with their forms.
            optional: Keys a message may leave out, with their forms.
            open: Allow keys beyond these (for a map of declared metadata).
        """
        maybe = dict(optional or {})

        def check(value: Any, expected: Mapping[str, Any]) -> None:
            if not isinstance(value, dict):
                raise Malformed(f"expected a map, got {_kind(value)}")
            missing = sorted(set(keys) - set(value))
            if missing:
                raise Malformed(f"missing key '{missing[0]}'")
            extra = sorted(str(k) for k in set(value) - set(keys) - set(maybe))
            if extra and not open:
                raise Malformed(f"unexpected key '{extra[0]}'")
            for key, form in [*keys.items(), *maybe.items()]:
                if key in value:
                    try:
                        form.check(value[key], expected)
                    except Malformed as error:
                        raise Malformed(f"key '{key}': {error}") from None

        return cls("map", check)

    @classmethod
    def one_of(cls, *forms: Message) -> Message:
        """A value of one of ``forms`` (tried in order; a refusal gives the first's reason)."""

        def check(value: Any, expected: Mapping[str, Any]) -> None:
            reasons = []
            for form in forms:
                try:
                    form.check(value, expected)
                except Malformed as error:
                    reasons.append(str(error))
                else:
                    return
            raise Malformed(f"of none of its {len(forms)} forms ({reasons[0]})")

        return cls(" or ".join(form.describe for form in forms), check)

    @classmethod
    def optional(cls, form: Message, *, required: str | None = None) -> Message:
        """``form``, or None (unless the keyword named ``required`` is true when receiving)."""

        def check(value: Any, expected: Mapping[str, Any]) -> None:
            if value is not None:
                form.check(value, expected)
            elif required is not None and _size(required, expected):
                raise Malformed(f"expected a {form.describe}, got none")

        return cls(f"{form.describe} or none", check)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a protocol: its name, its message's form and its wire tag.

    Attributes:
        name: The stage's name, as errors give it.
        message: The form of the stage's message.
        tag: The tag prefix of its messages on the wire (the name, if not given);
            stages whose messages share a prefix differ by the suffix.
        title: What the message is, for errors ("masked vector").
    """

    name: str
    message: Message
    tag: str = ""
    title: str = "message"

    def tag_for(self, *suffix: object) -> str:
        """The wire tag of this stage's message with ``suffix`` (a counter, a piece)."""
        return ".".join([self.tag or self.name, *(str(part) for part in suffix)])

    def check(self, sender: str, value: Any, expected: Mapping[str, Any]) -> Any:
        """``value`` if it has this stage's form, else refuse it naming the stage and sender.

        Raises:
            ComputationFailed: Naming ``sender`` and the stage, with what is wrong.
        """
        try:
            self.message.check(value, expected)
        except Malformed as error:
            raise ComputationFailed(
                f"party '{sender}' sent a malformed {self.title} (stage '{self.name}'): {error}"
            ) from None
        return value


class StagedPeers:
    """A :class:`PeerSession` whose messages are sent and received by stage.

    Every received message is checked against its stage's form
    (:meth:`Stage.check`) before it is returned. ``suffix`` parts extend the
    stage's tag (``stage.tag_for(*suffix)``); ``expected`` gives the sizes the
    stage's form names.
    """

    def __init__(self, peers: PeerSession) -> None:
        self.peers = peers

    async def send(self, to: str, stage: Stage, value: Any, *suffix: object) -> None:
        """Send ``value`` to party ``to`` as ``stage``'s message."""
        await self.peers.send(to, stage.tag_for(*suffix), value)

    async def broadcast(
        self, stage: Stage, value: Any, *suffix: object, to: Iterable[str] | None = None
    ) -> None:
        """Send ``value`` to every other party (or to ``to``) as ``stage``'s message."""
        await self.peers.broadcast(stage.tag_for(*suffix), value, to)

    async def recv(
        self, sender: str, stage: Stage, *suffix: object, patience: float = 1.0, **expected: Any
    ) -> Any:
        """Receive ``stage``'s message from ``sender``, checked against the stage's form.

        Raises:
            ComputationFailed: Naming ``sender`` and the stage, if it is malformed.
            PartyTimeout: As :meth:`PeerSession.recv`.
        """
        value = await self.peers.recv(sender, stage.tag_for(*suffix), patience=patience)
        return stage.check(sender, value, expected)

    async def gather(
        self,
        stage: Stage,
        *suffix: object,
        senders: Iterable[str] | None = None,
        **expected: Any,
    ) -> dict[str, Any]:
        """Receive ``stage``'s message from every other party (or ``senders``), checked."""
        received = await self.peers.gather(stage.tag_for(*suffix), senders)
        return {party: stage.check(party, value, expected) for party, value in received.items()}

    async def exchange(
        self, stage: Stage, value: Any, *suffix: object, **expected: Any
    ) -> dict[str, Any]:
        """Broadcast ``value`` and gather everyone's, checked; ours is included under our name."""
        _, received = await both(
            self.broadcast(stage, value, *suffix), self.gather(stage, *suffix, **expected)
        )
        received[self.peers.me] = value
        return {party: received[party] for party in self.peers.parties}
