"""The wire format shared by the client, the controller, the bus and the peers.

Every message is msgpack. Numeric arrays never travel as lists of numbers
(100k floats as a JSON list cost ~90 ms a round trip; as typed bytes
~0.16 ms): a numpy array becomes the msgpack extension type
:data:`NDARRAY_EXT` whose body is ``[dtype, shape, raw bytes]``.

Only plain numeric dtypes are accepted on decoding: booleans, signed and
unsigned integers of 1, 2, 4 or 8 bytes, and floats of 2, 4 or 8 bytes
(:data:`DTYPE_RULE`, or one of :data:`DTYPE_NAMES`). A dtype text is matched
against that rule *before* numpy sees it, since numpy evaluates some dtype
texts (``"(2,3"`` raises ``SyntaxError``); object arrays are refused, so that
a hostile peer or client can never make us unpickle anything. The only
msgpack extension accepted is :data:`NDARRAY_EXT`: msgpack decodes its own
Timestamp extension (type -1) by itself, so a message holding one is refused
after decoding.

JSON is supported for clients that cannot speak msgpack (``curl``): an array
is then ``{"__ndarray__": {"dtype": "<f8", "shape": [3], "base64": "..."}}``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "DTYPE_NAMES",
    "DTYPE_RULE",
    "MSGPACK",
    "NDARRAY_EXT",
    "WireError",
    "check_dtype",
    "from_jsonable",
    "packb",
    "to_jsonable",
    "unpackb",
]

MSGPACK = "application/msgpack"
NDARRAY_EXT = 1
_ALLOWED_KINDS = frozenset("biuf")
_MAX_DIMS = 8
DTYPE_RULE = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248])")
"""The dtype codes accepted (``numpy.dtype.str`` form): a byte order, then the kind and size."""
DTYPE_NAMES = frozenset(
    ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
) | frozenset(("float16", "float32", "float64"))
"""The numpy dtype names accepted besides :data:`DTYPE_RULE`."""
_DTYPE_HELP = (
    "array dtype must be a boolean, integer or float type written as a numpy code such as "
    "'<f8', '<i4' or '|b1', or a name such as 'float64', 'int32' or 'bool'"
)
_TIMESTAMP_MARKS = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")
"""How msgpack writes a Timestamp (fixext 4, fixext 8, ext 8 of 12 bytes, all of type -1)."""
_SURROGATE_MARK = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
"""A JSON escape of a UTF-16 surrogate, or one written as (invalid) UTF-8 bytes."""


class WireError(ValueError):
    """A message could not be decoded; the message says why, never what it held."""


def check_dtype(text: Any) -> np.dtype[Any]:
    """The numpy dtype for ``text``, if it is one of the plain numeric types accepted.

    Only texts that match :data:`DTYPE_RULE` or are in :data:`DTYPE_NAMES`
    ever reach numpy, which evaluates some others (``"(2,3"``) or accepts
    platform-dependent types (``"g"``, float128).

    Raises:
        WireError: If ``text`` is not one of them (the text is not repeated).
    """
    if not isinstance(text, str) or not (DTYPE_RULE.fullmatch(text) or text in DTYPE_NAMES):
        raise WireError(_DTYPE_HELP)
    dtype = np.dtype(text)
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:  # never true, by the rule
        raise WireError(_DTYPE_HELP)
    return dtype


def _little_endian(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``array`` as a C-contiguous little-endian array (a copy only if needed); any shape."""
    if array.dtype.kind not in _ALLOWED_KINDS:
        raise WireError("only boolean, integer and float arrays can be sent")
    # np.require, not np.ascontiguousarray: the latter turns a 0-d array into 1-d
    return np.require(array.astype(array.dtype.newbyteorder("<"), copy=False), requirements="C")


def _array_to_parts(array: np.ndarray[Any, Any]) -> tuple[str, list[int], bytes]:
    little = _little_endian(array)
    return little.dtype.str, list(little.shape), little.tobytes()


def _array_from_parts(dtype_text: Any, shape: Any, raw: Any) -> np.ndarray[Any, Any]:
    if not isinstance(dtype_text, str) or not isinstance(raw, bytes | bytearray | memoryview):
        raise WireError("array must be [dtype, shape, bytes]")
    if not isinstance(shape, list | tuple) or len(shape) > _MAX_DIMS:
        raise WireError(f"array shape must be a list of at most {_MAX_DIMS} sizes")
    if not all(isinstance(size, int) and 0 <= size < 2**62 for size in shape):
        raise WireError("array shape must hold non-negative integers below 2^62")
    dtype = check_dtype(dtype_text)
    if math.prod(shape) * dtype.itemsize != len(raw):  # exact Python integers: no overflow
        raise WireError("array byte length does not match its dtype and shape")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("<"))
        array.flags.writeable = False
    return array


def _bin_header(size: int) -> bytes:
    if size < 1 << 8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def _array_ext(array: np.ndarray[Any, Any]) -> msgpack.ExtType:
    """The extension for ``array``: msgpack ``[dtype, shape, bin]``, with one copy of the data.

    Built by hand rather than with ``msgpack.packb(_array_to_parts(...))``,
    which copies the array's bytes three times (``tobytes``, the packer's
    buffer, its result): an 8 MB array then took 16 ms to pack instead of 5.
    """
    little = _little_endian(array)
    raw = little.data.cast("B") if little.size else memoryview(b"")
    head = b"\x93" + msgpack.packb(little.dtype.str) + msgpack.packb(list(little.shape))
    return msgpack.ExtType(NDARRAY_EXT, b"".join((head, _bin_header(raw.nbytes), raw)))


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _array_ext(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"cannot encode an object of type {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != NDARRAY_EXT:
        raise WireError("unknown msgpack extension type")
    try:
        parts = msgpack.unpackb(data)
    except (ValueError, msgpack.UnpackException) as error:
        raise WireError("array extension is not valid msgpack") from error
    if not isinstance(parts, list) or len(parts) != 3:
        raise WireError("array must be [dtype, shape, bytes]")
    return _array_from_parts(*parts)


def packb(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack, numpy arrays as typed binary.

    Args:
        obj: Plain data: dicts, lists, str, bytes, numbers, None, numpy arrays.

    Returns:
        The msgpack bytes.

    Raises:
        TypeError: If ``obj`` holds something that is not plain data.
    """
    data: bytes = msgpack.packb(obj, default=_default, use_bin_type=True)
    return data


def _holds_timestamp(obj: Any) -> bool:
    """Whether a decoded message holds a msgpack Timestamp anywhere (in a key or a value)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, msgpack.Timestamp):
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def unpackb(
    data: bytes,
    *,
    max_size: int | None = None,
    max_array_len: int = -1,
    max_map_len: int = -1,
    max_str_len: int = -1,
    max_bin_len: int = -1,
    max_ext_len: int = -1,
) -> Any:
    """Decode msgpack bytes produced by :func:`packb`.

    Args:
        data: The message.
        max_size: Refuse messages larger than this many bytes.
        max_array_len: Refuse a list longer than this (-1: as long as the message allows).
        max_map_len: Refuse a map with more entries than this.
        max_str_len: Refuse a string of more bytes than this.
        max_bin_len: Refuse binary data of more bytes than this.
        max_ext_len: Refuse an extension (an array) of more bytes than this.

    Returns:
        The decoded object, with arrays as read-only numpy arrays.

    Raises:
        WireError: If the bytes are not a valid message, break a limit, or hold
            an extension other than an array (a msgpack Timestamp included).
    """
    if max_size is not None and len(data) > max_size:
        raise WireError(f"message is larger than the limit of {max_size} bytes")
    try:
        decoded = msgpack.unpackb(
            data,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=True,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_str_len=max_str_len,
            max_bin_len=max_bin_len,
            max_ext_len=max_ext_len,
        )
    except WireError:
        raise
    except UnicodeDecodeError as error:
        # a msgpack string must be UTF-8; a lone surrogate (ED A0 80) is not
        raise WireError("a string in the message is not valid UTF-8 text") from error
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        if "exceeds max_" in str(error):
            raise WireError(
                "message holds a list, map, string or array longer than this server accepts"
            ) from error
        if "for map key" in str(error):
            # valid msgpack, but a key that is no name: a number, null, a list or a map
            raise WireError(
                "a map in the message has a key that is not a string (a number, null, a list "
                "or a map); every key (a column or input name) must be a string"
            ) from error
        raise WireError("body is not valid msgpack") from error
    # msgpack decodes its Timestamp extension (-1) without asking _ext_hook; the
    # byte search is fast, and only a message that may hold one is walked
    if any(mark in data for mark in _TIMESTAMP_MARKS) and _holds_timestamp(decoded):
        raise WireError("unknown msgpack extension type (a msgpack Timestamp is not accepted)")
    return decoded


def to_jsonable(obj: Any) -> Any:
    """Turn a decoded message into something ``json.dumps(..., allow_nan=False)`` accepts.

    JSON has no NaN and no infinity: a non-finite float (a Python or numpy
    scalar) becomes ``null``, so that a JSON answer never fails to encode.
    Only msgpack keeps the float itself, as do typed arrays (``__ndarray__``),
    whose raw bytes travel unchanged.
    """
    if isinstance(obj, np.ndarray):
        dtype, shape, raw = _array_to_parts(obj)
        text = base64.b64encode(raw).decode("ascii")
        return {"__ndarray__": {"dtype": dtype, "shape": shape, "base64": text}}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, dict):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN or infinity
    return obj


def from_jsonable(obj: Any) -> Any:
    """Undo :func:`to_jsonable`: rebuild arrays from their JSON form."""
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"} and isinstance(obj["__ndarray__"], dict):
            spec = obj["__ndarray__"]
            try:
                raw = base64.b64decode(spec.get("base64", ""), validate=True)
            except ValueError as error:
                raise WireError("array 'base64' field is not valid base64") from error
            return _array_from_parts(spec.get("dtype"), spec.get("shape"), raw)
        return {key: from_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(value) for value in obj]
    return obj


def json_loads(data: bytes) -> Any:
    """Decode a JSON body, rebuilding arrays.

    Raises:
        WireError: If the body is not valid JSON, or holds text that is not valid Unicode.
    """
    try:
        decoded = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise WireError("body is not valid JSON") from error
    # JSON lets a lone surrogate ("\\ud800", or its bytes ED A0 80) through as a
    # string no UTF-8 encoder takes; only a body that may hold one is re-encoded
    if _SURROGATE_MARK.search(data):
        try:
            json.dumps(decoded, ensure_ascii=False).encode("utf-8")
        except RecursionError:
            raise WireError("body is nested too deeply") from None
        except UnicodeEncodeError:
            raise WireError(
                "body holds text that is not valid Unicode (a lone UTF-16 surrogate, such "
                "as an unpaired \\u escape); send it as valid UTF-8 text"
            ) from None
    try:
        return from_jsonable(decoded)
    except RecursionError as error:
        raise WireError("body is not valid JSON") from error
