"""Declared inputs and outputs of a microservice's functions, and their one validation.

A function declares what it takes and what it gives when it is registered::

    @service.job(
        "median",
        "The median of a column over all parties' records.",
        inputs=[
            Input("data", "data", "your dataset", required=True),
            Input("column", "string", "the column; may be left out if there is only one"),
            Input("convention", "string", "for an even count", choices=("average", "lower")),
        ],
        outputs=[Output("median", "number", "the joint median")],
    )

The runner (:class:`fdrtd_server.microservice._Runner`) checks every request
against the declaration *before* the function runs: an input that is not
declared, a required one that is missing, one of the wrong type, out of its
range or not among its choices is a 400 whose message names the input and
lists the accepted ones. The function then needs no checks of presence or
type of its own, only of rules that span inputs or the data.

A function registered without ``inputs`` (a plugin written before
declarations existed) is not checked: it gets whatever the client sent.

The same declaration, as JSON (:meth:`Signature.to_dict`), travels in the
``nats.micro`` endpoint metadata, so that the controller can describe the
functions of microservices that run in other processes: it becomes the JSON
Schema of ``/v1/openapi.json`` (:meth:`Signature.inputs_schema`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fdrtd_server.errors import BadRequest

__all__ = [
    "COLUMN",
    "DATA",
    "TYPES",
    "Input",
    "InputType",
    "Output",
    "Signature",
    "sent_name",
]

InputType = Literal["data", "string", "integer", "number", "boolean", "array", "object", "any"]
"""The kinds of value an input or output can be; ``data`` is a data handle."""

TYPES: dict[str, str] = {
    "data": "a dataset name from the catalogue, or a data handle (as POST /v1/data returns it)",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a map",
    "any": "any value",
}
"""Each type and how a message names it."""

DATA_HANDLE = re.compile(r"d-[0-9a-f]{40}")
"""What a data handle looks like (``fdrtd_server.bus.new_handle("data")``)."""
DATA_REF = re.compile(r"d-[0-9a-f]{40}|[a-z][a-z0-9_-]{0,62}")
"""A data handle, or a dataset's name (:data:`fdrtd_server.custody.DATASET_NAME`)."""

_SCHEMA_TYPES: dict[str, dict[str, Any]] = {
    "data": {"type": "string", "pattern": f"^({DATA_REF.pattern})$"},
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "array": {"type": "array"},
    "object": {"type": "object"},
    "any": {},
}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
"""A sent input name that a refusal may repeat (one that looks like a name)."""


def _is(kind: str, value: Any) -> bool:
    """Whether ``value`` (decoded JSON or msgpack) is of ``kind``."""
    if kind in ("data", "string"):
        return isinstance(value, str) and (kind == "string" or bool(DATA_REF.fullmatch(value)))
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        # an int is always finite (and may be too large for a float)
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value))
        )
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        # a typed binary array (msgpack extension, JSON __ndarray__) is a list too
        return isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim > 0)
    if kind == "object":
        return isinstance(value, dict)
    return True


@dataclass(frozen=True)
class Input:
    """One input of a function.

    Args:
        name: The key in ``inputs`` (lowercase letters, digits, ``_``).
        type: One of :data:`InputType`, or a tuple of them if several are
            allowed (``("string", "array")``: one column name or a list).
        description: What it means, for the API documentation.
        required: Whether a request without it is refused. An optional input
            may also be sent as ``null``, which means "not given".
        default: What the function uses when it is not given (documentation only).
        minimum: Smallest allowed value (numbers), or fewest items (arrays).
            An ``integer`` input without one is at least ``-2**63``.
        maximum: Largest allowed value (numbers), or most items (arrays).
            An ``integer`` input without one is at most ``2**63 - 1``.
        choices: The allowed values, if only a few are; numbers are compared
            as numbers (``1.0`` is the choice ``1``).
        items: The type of each item of an ``array``; a tuple allows several.
        exclusive: Whether ``minimum`` and ``maximum`` themselves are refused
            (numbers only): ``minimum=0, maximum=1, exclusive=True`` is ``0 < x < 1``.

    An ``array`` input may also be sent as a typed binary array (msgpack
    extension or JSON ``__ndarray__``) of one dimension: the function gets it
    as a list, as if it had been sent as one.
    """

    name: str
    type: InputType | tuple[InputType, ...]
    description: str
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    items: InputType | tuple[InputType, ...] | None = None
    exclusive: bool = False

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"input name '{self.name[:40]}' must be lowercase letters, digits and '_'"
            )
        for kind in (*self.types, *self.item_types):
            if kind not in TYPES:
                raise ValueError(
                    f"input '{self.name}' has the unknown type '{kind}'; "
                    f"use one of {', '.join(TYPES)}"
                )
        if self.items is not None and "array" not in self.types:
            raise ValueError(f"input '{self.name}': only an array has 'items'")
        bounded = {"integer", "number", "array"} & set(self.types)
        if (self.minimum is not None or self.maximum is not None) and not bounded:
            raise ValueError(
                f"input '{self.name}': 'minimum' and 'maximum' apply to numbers and arrays "
                "only (they would not be checked); leave them out or use 'choices'"
            )
        if self.exclusive and not {"integer", "number"} & set(self.types):
            raise ValueError(f"input '{self.name}': only a number has exclusive bounds")

    @property
    def types(self) -> tuple[str, ...]:
        """The allowed types."""
        return (self.type,) if isinstance(self.type, str) else tuple(self.type)

    @property
    def item_types(self) -> tuple[str, ...]:
        """The allowed types of an array's items (none: any)."""
        if self.items is None:
            return ()
        return (self.items,) if isinstance(self.items, str) else tuple(self.items)

    @property
    def rule(self) -> str:
        """The input's rule in words: type, range or choices (never a sent value)."""
        if self.choices is not None:
            return "one of " + ", ".join(_show(choice) for choice in self.choices)
        texts = []
        for kind in self.types:
            text = TYPES[kind]
            if kind == "array":
                if self.item_types:
                    text += " of " + " or ".join(_plural(k) for k in self.item_types)
                if self.minimum is not None or self.maximum is not None:
                    text += f" ({_range(self.minimum, self.maximum)} items)"
            elif kind in ("integer", "number") and (
                self.minimum is not None or self.maximum is not None
            ):
                text += f" {_range(self.minimum, self.maximum, self.exclusive)}"
            elif kind == "integer":
                text += " of at most 64 bits"
            texts.append(text)
        return " or ".join(texts)

    def check(self, value: Any, where: str) -> Any:
        """Refuse ``value`` unless it keeps this input's rule; return it as the function gets it.

        A whole number sent as a float (JSON's ``2048.0``) is an integer, as
        JSON Schema counts it: an ``integer`` input (or item) gets it as an int.

        Raises:
            BadRequest: Naming the input, its rule and ``where`` (never the value).
        """
        if isinstance(value, np.ndarray) and "array" in self.types and value.ndim == 1:
            value = value.tolist()  # a typed array is a list: the function gets one
        if "integer" in self.types and "number" not in self.types:
            value = _whole(value)
        elif isinstance(value, list) and self.item_types == ("integer",):
            value = [_whole(item) for item in value]
        if not self._keeps(value):
            raise BadRequest(f"'{self.name}' of {where} must be {self.rule}")
        return value

    def _keeps(self, value: Any) -> bool:
        if self.choices is not None:
            return any(_same(value, choice) for choice in self.choices)
        if not any(_is(kind, value) for kind in self.types):
            return False
        if isinstance(value, np.ndarray):
            return False  # only a 1-D typed array is a list (see check)
        if isinstance(value, list | tuple):
            low = -math.inf if self.minimum is None else self.minimum
            high = math.inf if self.maximum is None else self.maximum
            kinds = self.item_types
            return low <= len(value) <= high and (
                not kinds or all(any(_is(k, item) for k in kinds) for item in value)
            )
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, high = self._bounds(isinstance(value, int) and "integer" in self.types)
            if self.exclusive:
                return bool(low < value < high)
            return bool(low <= value <= high)
        return True

    def _bounds(self, integer: bool) -> tuple[float, float]:
        """The bounds of a number; an integer without declared ones has 64 bits."""
        low = (-(2**63) if integer else -math.inf) if self.minimum is None else self.minimum
        high = (2**63 - 1 if integer else math.inf) if self.maximum is None else self.maximum
        return low, high

    def schema(self) -> dict[str, Any]:
        """This input as a JSON Schema (draft 2020-12, as OpenAPI 3.1 uses)."""
        out: dict[str, Any]
        if self.choices is not None:
            out = {"enum": list(self.choices)}
        else:
            alternatives = [self._schema_of(kind) for kind in self.types]
            out = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        if not self.required:
            # "not given" may also be said with null
            out = {"anyOf": [*out.pop("anyOf", [out]), {"type": "null"}]}
        out["description"] = self.description
        if self.default is not None:
            out["default"] = self.default
        return out

    def _schema_of(self, kind: str) -> dict[str, Any]:
        out = dict(_SCHEMA_TYPES[kind])
        limits: tuple[float | None, float | None] = (self.minimum, self.maximum)
        if kind == "array":
            bounds = ("minItems", "maxItems")
        elif kind in ("integer", "number"):
            exclusive = ("exclusiveMinimum", "exclusiveMaximum")
            bounds = exclusive if self.exclusive else ("minimum", "maximum")
            if kind == "integer":
                limits = self._bounds(True)
        else:
            return out
        for key, bound in zip(bounds, limits, strict=True):
            if bound is not None:
                whole = kind != "number" or float(bound).is_integer()
                out[key] = int(bound) if whole else bound
        if kind == "array" and self.item_types:
            items = [dict(_SCHEMA_TYPES[k]) for k in self.item_types]
            out["items"] = items[0] if len(items) == 1 else {"anyOf": items}
        return out

    def to_dict(self) -> dict[str, Any]:
        """The declaration as plain data (for the bus)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        out["description"] = self.description
        if self.required:
            out["required"] = True
        for key in ("default", "minimum", "maximum", "choices", "items"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        if self.exclusive:
            out["exclusive"] = True
        if isinstance(self.type, tuple):
            out["type"] = list(self.type)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Input:
        """Rebuild an input from :meth:`to_dict`."""

        def kinds(value: Any) -> Any:
            return tuple(value) if isinstance(value, list) else value

        choices = data.get("choices")
        return cls(
            name=str(data["name"]),
            type=kinds(data["type"]),
            description=str(data.get("description", "")),
            required=bool(data.get("required", False)),
            default=data.get("default"),
            minimum=data.get("minimum"),
            maximum=data.get("maximum"),
            choices=None if choices is None else tuple(choices),
            items=kinds(data.get("items")),
            exclusive=bool(data.get("exclusive", False)),
        )


@dataclass(frozen=True)
class Output:
    """One key of a function's result (a map).

    Args:
        name: The key.
        type: One of :data:`InputType` (``data`` is not a result type).
        description: What it means, for the API documentation.
    """

    name: str
    type: InputType
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"output name '{str(self.name)[:40]}' must be lowercase letters, digits and '_'"
            )
        if self.type not in TYPES or self.type == "data":
            kinds = ", ".join(kind for kind in TYPES if kind != "data")
            raise ValueError(
                f"output '{self.name}' has the unknown type '{str(self.type)[:40]}'; "
                f"use one of {kinds}"
            )
        if not isinstance(self.description, str):
            raise ValueError(f"output '{self.name}' must have a description that is a string")

    def to_dict(self) -> dict[str, Any]:
        """The declaration as plain data (for the bus)."""
        return {"name": self.name, "type": self.type, "description": self.description}

    def schema(self) -> dict[str, Any]:
        """This output as a JSON Schema; arrays may be typed binary arrays (ndarray)."""
        return {**_SCHEMA_TYPES[self.type], "description": self.description}


@dataclass(frozen=True)
class Signature:
    """What a function takes and gives: its declared inputs and outputs.

    Args:
        description: One sentence on what the function computes.
        inputs: The inputs; None leaves the function's inputs unchecked.
        outputs: The keys of its result.
        policy: The policy switches (``allow_*``) the function may require.
        multiparty: Whether it runs in a peer session (a request must give
            ``session``).
    """

    description: str = ""
    inputs: tuple[Input, ...] | None = None
    outputs: tuple[Output, ...] = ()
    policy: tuple[str, ...] = ()
    multiparty: bool = False

    def __post_init__(self) -> None:
        if not all(isinstance(item, Input) for item in self.inputs or ()):
            raise ValueError("every one of a function's inputs must be an Input")
        if not all(isinstance(item, Output) for item in self.outputs):
            raise ValueError("every one of a function's outputs must be an Output")
        for kind, items in (("input", self.inputs or ()), ("output", self.outputs)):
            names = [item.name for item in items]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"{kind} '{twice[0]}' is declared twice")

    @property
    def declared(self) -> bool:
        """Whether the inputs are declared (and so checked)."""
        return self.inputs is not None

    def accepted(self) -> str:
        """The accepted inputs in words, for a message."""
        if not self.inputs:
            return "it takes no inputs"
        parts = [
            f"{item.name} ({'required' if item.required else 'optional'})" for item in self.inputs
        ]
        return "its inputs are " + ", ".join(parts)

    def validate(self, inputs: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Refuse ``inputs`` unless they keep the declaration; return what the function gets.

        Without a declaration nothing is checked and ``inputs`` come back as
        they are; with one, whole floats of integer inputs become ints (see
        :meth:`Input.check`).

        Args:
            inputs: What the client sent.
            where: The function, for the message (``"'smpc.median'"``).

        Raises:
            BadRequest: Naming the first input that is unknown, missing,
                of the wrong type or out of range, and listing the accepted ones.
        """
        checked = dict(inputs)
        if self.inputs is None:
            return checked
        known = {item.name: item for item in self.inputs}
        unknown = sorted(str(name) for name in inputs if name not in known)
        if unknown:
            named = sent_name(unknown[0], "an input name")
            raise BadRequest(
                f"{named} is not an input of {where}; {self.accepted()}; check the spelling"
            )
        for item in self.inputs:
            value = inputs.get(item.name)
            if value is None:
                if item.required:
                    raise BadRequest(
                        f"{where} needs the input '{item.name}' ({item.rule}); {self.accepted()}"
                    )
                # null means "not given": the function sees no key, and so its default
                checked.pop(item.name, None)
                continue
            checked[item.name] = item.check(value, where)
        return checked

    def inputs_schema(self) -> dict[str, Any]:
        """The inputs as one JSON Schema object (``additionalProperties: false``)."""
        if self.inputs is None:
            return {"type": "object", "description": "not declared: any map"}
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {item.name: item.schema() for item in self.inputs},
            "additionalProperties": False,
        }
        required = [item.name for item in self.inputs if item.required]
        if required:
            schema["required"] = required
        return schema

    def outputs_schema(self) -> dict[str, Any]:
        """The result as one JSON Schema object."""
        if not self.outputs:
            return {"type": "object"}
        return {
            "type": "object",
            "properties": {item.name: item.schema() for item in self.outputs},
        }

    def to_dict(self) -> dict[str, Any]:
        """The signature as plain data (for the endpoint metadata)."""
        out: dict[str, Any] = {"description": self.description}
        if self.inputs is not None:
            out["inputs"] = [item.to_dict() for item in self.inputs]
        out["outputs"] = [item.to_dict() for item in self.outputs]
        if self.policy:
            out["policy"] = list(self.policy)
        if self.multiparty:
            out["multiparty"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        """Rebuild a signature from :meth:`to_dict`."""
        inputs = data.get("inputs")
        return cls(
            description=str(data.get("description", "")),
            inputs=None if inputs is None else tuple(Input.from_dict(i) for i in inputs),
            outputs=tuple(
                Output(str(o["name"]), o["type"], str(o.get("description", "")))
                for o in data.get("outputs", [])
            ),
            policy=tuple(str(p) for p in data.get("policy", [])),
            multiparty=bool(data.get("multiparty", False)),
        )


def sent_name(name: Any, instead: str) -> str:
    """A name the client sent, quoted for a message if it looks like one, else ``instead``.

    A name is repeated so that a misspelling can be seen (``'probabilty'``);
    anything that does not look like a name (it might be data) is not.
    """
    if isinstance(name, str) and _SENT_NAME.fullmatch(name):
        return f"'{name}'"
    return instead


def _whole(value: Any) -> Any:
    """A float that is a whole number as an int (``2048.0`` is ``2048``); else ``value``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _same(value: Any, choice: Any) -> bool:
    """Whether a sent ``value`` is ``choice``: numbers as numbers (``1.0`` is ``1``)."""

    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if number(value) and number(choice):
        return bool(value == choice)
    # bool is an int in Python: True must not pass for 1
    return type(value) is type(choice) and bool(value == choice)


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value).lower()


def _plural(kind: str) -> str:
    return {
        "data": "dataset names or data handles",
        "string": "strings",
        "integer": "integers",
        "number": "numbers",
        "boolean": "booleans",
        "array": "lists",
        "object": "maps",
        "any": "values",
    }[kind]


def _range(low: float | None, high: float | None, exclusive: bool = False) -> str:
    def number(value: float) -> str:
        return f"{value:g}" if not float(value).is_integer() else str(int(value))

    if exclusive:
        words = (("above", low), ("below", high))
        return " and ".join(f"{word} {number(bound)}" for word, bound in words if bound is not None)
    if low is not None and high is not None:
        return f"from {number(low)} to {number(high)}"
    if low is not None:
        return f"of at least {number(low)}"
    assert high is not None
    return f"of at most {number(high)}"


DATA = Input(
    "data",
    "data",
    "a dataset's name from GET /v1/catalogue, or the handle of your upload (POST /v1/data)",
    required=True,
)
"""The ``data`` input most functions take: a data handle, required."""

COLUMN = Input("column", "string", "the column to use; may be left out if the dataset has only one")
"""The ``column`` input most functions take: a column name, optional."""
