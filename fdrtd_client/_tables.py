"""Tables as users have them (pandas DataFrames, pyarrow Tables), made ready to upload.

Neither pandas nor pyarrow is needed to use the client: a DataFrame and a
Table are recognised by their type's module and attributes, and pyarrow is
imported only when one is uploaded. With pyarrow installed (the ``parquet``
extra), a table travels as a Parquet file, streamed from a spooled temporary
file, and the server converts it in bounded memory whatever its size;
without it, a DataFrame travels as a msgpack table, which the server parses
in memory (up to its ``max_parse_bytes``).

A DataFrame keeps its column names and types: boolean, integer and float
columns stay typed (pandas' nullable ``Int64``/``boolean`` columns with
missing values become float64 with NaN, as on the server), text and category
columns stay text (missing text is empty). The index is not uploaded. A
column the server could not compute on (dates, durations, complex numbers,
an object column mixing numbers and text) is refused here, before anything
is sent, with a message naming it.
"""

from __future__ import annotations

import tempfile
from typing import IO, Any

import numpy as np

from fdrtd_client.errors import FdrtdClientError

__all__ = ["dataframe_columns", "is_arrow_table", "is_dataframe", "parquet_file"]

SPOOL_BYTES = 32 * 1024 * 1024
"""Parquet files up to this size are built in memory, larger ones in a temporary file."""
ROW_GROUP = 256 * 1024
"""Rows per Parquet row group written (the server reads the file back in such batches)."""


def is_dataframe(data: Any) -> bool:
    """Whether ``data`` is a pandas DataFrame (told without importing pandas)."""
    return type(data).__module__.startswith("pandas") and hasattr(data, "dtypes")


def is_arrow_table(data: Any) -> bool:
    """Whether ``data`` is a pyarrow Table (told without importing pyarrow)."""
    return type(data).__module__.startswith("pyarrow") and type(data).__name__ == "Table"


def _name(name: Any, position: int) -> str:
    if not isinstance(name, str) or not name:
        raise FdrtdClientError(
            f"column {position} of the DataFrame is named by a {type(name).__name__}, and "
            "column names must be non-empty strings: rename the columns first, e.g. "
            "df.columns = df.columns.astype(str)"
        )
    return name


def _text(name: str, values: Any, missing: Any) -> list[str]:
    """The values of an object column as text (missing values empty), or a clear refusal."""
    texts: list[str] = []
    kinds: set[str] = set()
    for value, absent in zip(values, missing, strict=True):
        if isinstance(value, str):
            texts.append(value)
        elif absent:
            texts.append("")  # None, NaN or pandas.NA
        else:
            texts.append("")
            kinds.add(type(value).__name__)
    if kinds:
        found = ", ".join(sorted(kinds))
        raise FdrtdClientError(
            f"column '{name[:40]}' mixes text with values of other types ({found}); the "
            f"server computes on columns of numbers or of text: convert it first, e.g. "
            f"df['{name[:40]}'].astype(str) or pandas.to_numeric(df['{name[:40]}'])"
        )
    return texts


def _numbers(values: Any) -> np.ndarray[Any, Any] | None:
    """An object column that holds only numbers, as float64; None if it does not."""
    if not all(
        isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        for value in values
    ):
        return None
    return np.asarray(values, dtype=np.float64)


def dataframe_columns(frame: Any) -> dict[str, np.ndarray[Any, Any] | list[str]]:
    """The columns of a pandas DataFrame: numbers as typed numpy arrays, text as lists.

    Raises:
        FdrtdClientError: If a column name is not a string or not unique, or a
            column holds something other than booleans, numbers or text.
    """
    names = [_name(name, j) for j, name in enumerate(frame.columns)]
    if len(set(names)) != len(names):
        raise FdrtdClientError("the DataFrame's column names must be unique")
    columns: dict[str, np.ndarray[Any, Any] | list[str]] = {}
    for j, name in enumerate(names):
        series = frame.iloc[:, j]
        dtype = series.dtype
        kind = getattr(dtype, "kind", "O")
        if kind in "biuf":
            if bool(series.isna().any()):
                columns[name] = series.to_numpy(dtype=np.float64, na_value=np.nan)
            else:
                numpy_dtype = getattr(dtype, "numpy_dtype", dtype)
                columns[name] = series.to_numpy(dtype=numpy_dtype)
        elif kind in "OSU":  # object, text, and categories (of text or of numbers)
            values = series.to_numpy(dtype=object)
            numbers = _numbers(values) if len(values) else None
            missing = series.isna().to_numpy()
            columns[name] = numbers if numbers is not None else _text(name, values, missing)
        else:
            raise FdrtdClientError(
                f"column '{name[:40]}' has type {str(dtype)[:40]}, which the server cannot "
                "compute on: only booleans, numbers and text can be uploaded; convert it "
                "first (e.g. dates to numbers of days)"
            )
    return columns


def _arrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        return None
    return pyarrow


def parquet_file(data: Any) -> IO[bytes] | None:
    """``data`` (a DataFrame's columns or a pyarrow Table) as a Parquet file, at its start.

    Returns:
        The file, or None if pyarrow is not installed (a Table cannot then be given).
    """
    pa = _arrow()
    if pa is None:
        return None
    if isinstance(data, dict):
        table = pa.table(
            {
                name: pa.array(values, type=pa.string() if isinstance(values, list) else None)
                for name, values in data.items()
            }
        )
    else:
        table = data
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (the caller closes it)
    pa.parquet.write_table(table, spool, row_group_size=ROW_GROUP, compression="snappy")
    spool.seek(0)
    return spool
