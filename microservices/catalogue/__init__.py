"""The catalogue microservice: describes named datasets without ever reading their values.

The controller's ``GET /v1/catalogue`` sends it the datasets the caller may
see (as :meth:`fdrtd_server.custody.CustodyStore.visible` found them); it
answers each one's columns and types, its number of records and its version.
For a source read in place, that is the version released last (by the last
computation; the hold-back rule may keep newer rows back), else the content as
it is. Nothing is released here: only a computation releases a version, and
only a computation reads a source's whole content to fingerprint it.
A source that cannot be read is described by its error, and the others still are.
"""

from __future__ import annotations

from typing import Any

from fdrtd_server.sdk import CallContext, FdrtdError, Microservice, Output, distribution_version
from fdrtd_server.sdk.host import (
    SourceSpec,
    Version,
    choose_version,
    open_source,
    registration_tag,
    shown_version,
)

__all__ = ["service"]

service = Microservice(
    "catalogue",
    distribution_version("fdrtd", "0.1.0"),
    "Describes the named datasets a caller may see: schema, row count, version; never values.",
)


async def _describe_upload(ctx: CallContext, entry: dict[str, Any]) -> dict[str, Any]:
    handle = str(entry.get("handle", ""))
    description = await ctx.bus.get_set(handle) if handle.startswith("d-") else None
    if description is None:
        return {"error": "withdrawn: its upload was released"}
    columns = {
        name: str(column.get("dtype", "")) for name, column in description["columns"].items()
    }
    digest = description.get("sha256")
    # hashed by the first computation that read it (an upload never changes)
    version = (
        await shown_version(ctx.bus, digest, description["created"])
        if isinstance(digest, str)
        else {"id": None, "time": description.get("created", "")}
    )
    return {"columns": columns, "rows": description.get("rows"), "version": version}


async def _describe_source(ctx: CallContext, name: str, entry: dict[str, Any]) -> dict[str, Any]:

    spec = SourceSpec.from_dict(entry.get("source") or {}, f"dataset '{name}'")
    source = open_source(spec)
    columns = await source.schema()
    found = await ctx.bus.get_version(name)
    same = found is not None and found[0].get("tag") == registration_tag(entry)
    if found and same:
        # the version released last: observing the content would read it whole (a
        # fingerprint of a large table takes seconds), and the next computation does
        version = Version.from_dict(found[0])
    else:
        version, _ = choose_version(await source.observe(), None, spec.hold_back)
    return {
        "columns": columns,
        "rows": version.rows,
        "version": await shown_version(ctx.bus, version.id, version.time),
    }


@service.call(
    "describe",
    inputs=[],
    outputs=[Output("datasets", "object", "each dataset's columns, rows and version, by name")],
)
async def describe(ctx: CallContext, inputs: dict[str, Any]) -> dict[str, Any]:
    """Columns, row count and version of each dataset the controller sent along."""
    described: dict[str, Any] = {}
    for name, entry in ctx.datasets.items():
        try:
            if entry.get("kind") == "upload":
                described[name] = await _describe_upload(ctx, entry)
            else:
                described[name] = await _describe_source(ctx, name, entry)
        except FdrtdError as error:
            described[name] = {"error": error.message}
    return {"datasets": described}
