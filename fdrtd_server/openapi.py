"""The OpenAPI 3.1 document served at ``/v1/openapi.json``, and the API reference made from it.

The routes are written by hand, next to them in :mod:`fdrtd_server.routes`, so
that clients in other languages (R, JavaScript, curl) can be generated from
it. The functions that ``POST /v1/compute`` starts are not: each one is
described from the :class:`~fdrtd_server.inputs.Signature` its microservice
declared, one request schema per ``microservice.function`` whose ``inputs``
are a JSON Schema object with ``additionalProperties: false``, and one
result schema. The controller reads the signatures from the ``nats.micro``
endpoint metadata of the microservices on its bus (they may run in workers
elsewhere); ``python -m fdrtd_server.openapi --markdown`` reads those of the
installed built-in microservices and prints the functions section of
``docs/api.md`` (``--write docs/api.md`` replaces it there).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fdrtd_client.wire import DTYPE_NAMES, DTYPE_RULE
from fdrtd_server.config import NAME_RULE as SERVER_NAME
from fdrtd_server.config import Settings
from fdrtd_server.inputs import Signature

__all__ = ["Functions", "builtin_functions", "document", "markdown", "update_markdown"]

Functions = Mapping[str, Mapping[str, Signature]]
"""The computations to describe: signature by function by microservice (jobs only)."""

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_ERRORS = {
    str(code): {"description": text, "content": {"application/problem+json": {"schema": _PROBLEM}}}
    for code, text in (
        (400, "malformed body or bad parameter"),
        (401, "missing or unknown token"),
        (403, "refused by the server owner's policy"),
        (404, "unknown handle, route or microservice"),
        (409, "clashes with the server's state (a handle or session id in use)"),
        (413, "body too large"),
        (415, "unsupported content type"),
        (429, "more computations at once than the owner's policy allows; wait for one to end"),
        (503, "NATS or a microservice is not available; try again"),
        (507, "this server's storage is full"),
    )
}
_JSON_OBJECT = {"schema": {"type": "object"}}
_OK_CONTENT = {"application/json": _JSON_OBJECT, "application/msgpack": _JSON_OBJECT}


def _content(schema: str) -> dict[str, Any]:
    """JSON and msgpack answers with the component schema ``schema``."""
    ref = {"schema": {"$ref": f"#/components/schemas/{schema}"}}
    return {"application/json": ref, "application/msgpack": ref}


_STATUS = {"enum": ["queued", "running", "done", "failed"]}
_RESULT_HANDLE = {"type": "string", "pattern": "^r-[0-9a-f]{40}$"}
_RESPONSE_SCHEMAS: dict[str, Any] = {
    "Started": {
        "type": "object",
        "description": "a computation that has not ended yet",
        "required": ["result", "status"],
        "properties": {"result": _RESULT_HANDLE, "status": _STATUS},
    },
    "JobView": {
        "type": "object",
        "description": (
            "a computation's state; when done its value (a Result.<microservice>.<function>, "
            "unless value=false), when failed the error with the HTTP status of the failure"
        ),
        "required": ["result", "status", "progress", "microservice", "function"],
        "properties": {
            "result": _RESULT_HANDLE,
            "status": _STATUS,
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "microservice": {"type": "string"},
            "function": {"type": "string"},
            "created": {"type": "string"},
            "updated": {"type": "string"},
            "policy_version": {"type": "string", "description": "the owner's policy it ran under"},
            "value": {"type": "object"},
            "receipt": {"$ref": "#/components/schemas/SignedStatement"},
            "error": {
                "type": "object",
                "required": ["status", "detail"],
                "properties": {
                    "status": {"type": "integer", "minimum": 400, "maximum": 599},
                    "detail": {"type": "string"},
                },
            },
        },
    },
    "SignedStatement": {
        "type": "object",
        "description": (
            "what this server states its finished job ran, and its Ed25519 signature "
            "(docs/api.md, Receipts)"
        ),
        "required": ["statement", "signature"],
        "properties": {"statement": {"type": "object"}, "signature": {"type": "string"}},
    },
    "Cosignature": {
        "type": "object",
        "required": ["server", "cosignature"],
        "properties": {"server": {"type": "string"}, "cosignature": {"type": "string"}},
    },
    "Dataset": {
        "type": "object",
        "description": "a dataset's schema: never its content",
        "required": ["handle", "format", "columns", "rows"],
        "properties": {
            "handle": {"type": "string", "pattern": "^d-[0-9a-f]{40}$"},
            "format": {"type": "string"},
            "columns": {"type": "object"},
            "rows": {"type": "integer", "minimum": 0},
            "bytes": {"type": "integer", "minimum": 0},
            "created": {"type": "string"},
        },
    },
}
"""The answers of the data and result routes, described more closely than as any map."""
_HANDLE_PATTERN = "^{}-[0-9a-f]{{40}}$"
_SESSION_ID = "^[A-Za-z0-9_-]{22,64}$"
_SHAPE = "^[0-9]{1,18}(,[0-9]{1,18}){0,7}$"


def _handle(kind: str) -> dict[str, Any]:
    return {
        "name": "handle",
        "in": "path",
        "required": True,
        "description": f"a {kind} handle as the server returned it",
        "schema": {"type": "string", "pattern": _HANDLE_PATTERN.format(kind[0])},
    }


_WAIT_VALUE = [
    {
        "name": "wait",
        "in": "query",
        "description": "seconds (0 to 60, results.MAX_WAIT) to hold the request until the job ends",
        "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
    },
    {
        "name": "value",
        "in": "query",
        "description": "include a finished job's value ('false' for only its state)",
        "schema": {"type": "boolean", "default": True},
    },
]
_DTYPE = f"^({DTYPE_RULE.pattern}|{'|'.join(sorted(DTYPE_NAMES))})$"
_SESSION = {
    "type": "object",
    "description": "the multi-party session: the same on every party's server",
    "required": ["id", "parties"],
    "properties": {
        "id": {
            "type": "string",
            "pattern": _SESSION_ID,
            "description": "drawn at random, at least 128 bits (secrets.token_urlsafe(16))",
        },
        "parties": {
            "type": "array",
            "items": {"type": "string", "pattern": SERVER_NAME.pattern},
            "minItems": 2,
            "maxItems": 64,
            "uniqueItems": True,
        },
    },
    "additionalProperties": False,
}


_COSIGN = {
    "type": "object",
    "properties": {
        "receipt": {
            "type": "object",
            "description": "every party's signed statement, gathered by the client",
            "required": [
                "receipt_version",
                "protocol",
                "session",
                "joint_sha256",
                "statements",
                "cosignatures",
            ],
        }
    },
    "required": ["receipt"],
    "additionalProperties": False,
}
_DATASET_NAME = "^[a-z][a-z0-9_-]{0,62}$"
_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": _DATASET_NAME},
}
_GRANTEE_PARAM = {
    "name": "grantee",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": SERVER_NAME.pattern},
}
_PUBLISH = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": _DATASET_NAME},
        "handle": {"type": "string"},
        "description": {"type": "string", "maxLength": 2000},
    },
    "required": ["name", "handle"],
    "additionalProperties": False,
}
_GRANT = {
    "type": "object",
    "properties": {
        "dataset": {"type": "string", "pattern": _DATASET_NAME},
        "grantee": {"type": "string", "pattern": SERVER_NAME.pattern},
        "functions": {"type": "array", "items": {"type": "string"}},
        "not_before": {"type": "string", "description": "ISO 8601"},
        "not_after": {"type": "string", "description": "ISO 8601"},
    },
    "required": ["dataset", "grantee"],
    "additionalProperties": False,
}
_SOURCE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": _DATASET_NAME},
        "owner": {"type": "string", "pattern": SERVER_NAME.pattern},
        "description": {"type": "string", "maxLength": 2000},
        "source": {
            "type": "object",
            "description": "kind (csv, parquet, sqlite, postgresql), path, table, query, "
            "dsn_env, order_by, hold_back, columns: see docs/data.md",
        },
    },
    "required": ["name", "owner", "source"],
    "additionalProperties": False,
}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    ok: str = "200",
    *,
    secured: bool = True,
    content: bool = True,
    answer: str | None = None,
    **more: Any,
) -> dict[str, Any]:
    success: dict[str, Any] = {"description": "success"}
    if content:
        success["content"] = _OK_CONTENT if answer is None else _content(answer)
    operation: dict[str, Any] = {"summary": summary, "responses": {ok: success, **_ERRORS}, **more}
    if not secured:
        operation["security"] = []
    return operation


def _schema_name(microservice: str, function: str, part: str) -> str:
    return f"{part}.{microservice}.{function}"


def _function_schemas(functions: Functions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Component schemas of each function's request and result, and the request refs."""
    schemas: dict[str, Any] = {}
    refs: list[dict[str, Any]] = []
    undeclared = False
    for microservice in sorted(functions):
        for function, signature in sorted(functions[microservice].items()):
            inputs = signature.inputs_schema()
            request: dict[str, Any] = {
                "type": "object",
                "description": signature.description,
                "properties": {
                    "microservice": {"const": microservice},
                    "function": {"const": function},
                    "inputs": inputs,
                    "session": _SESSION,
                },
                "required": ["microservice", "function"],
                "additionalProperties": False,
            }
            if inputs.get("required"):
                request["required"].append("inputs")
            if signature.multiparty:
                request["required"].append("session")
                request["x-fdrtd-multiparty"] = True
            if signature.policy:
                request["x-fdrtd-policy"] = list(signature.policy)
            name = _schema_name(microservice, function, "Compute")
            schemas[name] = request
            schemas[_schema_name(microservice, function, "Result")] = signature.outputs_schema()
            refs.append({"$ref": f"#/components/schemas/{name}"})
            undeclared = undeclared or not signature.declared
    if undeclared or not refs:
        # a function that declares nothing takes any map (see fdrtd_server.inputs)
        refs.append({"$ref": "#/components/schemas/Computation"})
    return schemas, refs


def document(settings: Settings, functions: Functions | None = None) -> dict[str, Any]:
    """Build the OpenAPI document for a server.

    Args:
        settings: The server's settings (its URL).
        functions: The computations its microservices offer, to describe one
            by one; without them ``POST /v1/compute`` takes any computation.
    """
    schemas, computations = _function_schemas(functions or {})
    body_schema = computations[0] if len(computations) == 1 else {"oneOf": computations}
    body = {
        "required": True,
        "content": {
            "application/json": {"schema": body_schema},
            "application/msgpack": {"schema": body_schema},
        },
    }
    data, result = _handle("data"), _handle("result")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fdrtd",
            "version": "1",
            "description": (
                "Federated secure computing. Upload data to get a data handle (never "
                "downloadable); start computations to get result handles; fetch results."
            ),
        },
        "servers": [{"url": settings.url}],
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": _op("Liveness", secured=False)},
            "/readyz": {"get": _op("Readiness: NATS and the data microservice", secured=False)},
            "/v1/openapi.json": {"get": _op("This OpenAPI document", secured=False)},
            "/v1/identity": {"get": _op("This server's public peer entry", secured=False)},
            "/v1/microservices": {"get": _op("Running microservices and their functions")},
            "/v1/data": {
                "post": _op(
                    "Upload a dataset (streamed); returns a data handle",
                    "201",
                    answer="Dataset",
                    parameters=[
                        {
                            "name": "format",
                            "in": "query",
                            "schema": {
                                "enum": ["raw", "csv", "parquet", "json", "msgpack"],
                                "default": "raw",
                            },
                        },
                        {
                            "name": "dtype",
                            "in": "query",
                            "description": "a raw array's numpy type, e.g. <f8",
                            "schema": {"type": "string", "pattern": _DTYPE},
                        },
                        {
                            "name": "shape",
                            "in": "query",
                            "description": "a raw array's shape, comma-separated",
                            "schema": {
                                "type": "string",
                                "pattern": "^[0-9]{1,18}(,[0-9]{1,18}){0,7}$",
                            },
                        },
                    ],
                    requestBody={"content": {"application/octet-stream": {}}},
                ),
                "get": _op("List your datasets (schemas only)"),
            },
            "/v1/data/{handle}": {
                "parameters": [data],
                "get": _op("A dataset's schema; its content can never be read", answer="Dataset"),
                "delete": _op("Release a dataset"),
            },
            "/v1/compute": {
                "post": _op(
                    "Start a computation; returns a result handle (202), or with ?wait=seconds "
                    "the finished job's status and value (200) if it ends within that time",
                    "202",
                    requestBody=body,
                    parameters=_WAIT_VALUE,
                    responses={
                        "200": {
                            "description": "finished within 'wait': the result's view",
                            "content": _content("JobView"),
                        },
                        "202": {
                            "description": "started: {result, status}",
                            "content": _content("Started"),
                        },
                        **_ERRORS,
                    },
                )
            },
            "/v1/results/{handle}": {
                "parameters": [result],
                "get": _op(
                    "Status, progress and (when done) the value; long-poll with ?wait=seconds",
                    answer="JobView",
                    parameters=_WAIT_VALUE,
                ),
                "delete": _op("Release a result"),
            },
            "/v1/results/{handle}/events": {
                "parameters": [result],
                "get": _op(
                    "Server-sent events with status and progress until finished", content=False
                ),
            },
            "/v1/receipts/cosign": {
                "post": _op(
                    "Sign a whole receipt: this server's statement of the caller's job, "
                    "unaltered, and every other party's verified against its federation file",
                    answer="Cosignature",
                    requestBody={
                        "required": True,
                        "content": {
                            "application/json": {"schema": _COSIGN},
                            "application/msgpack": {"schema": _COSIGN},
                        },
                    },
                )
            },
            "/v1/catalogue": {
                "get": _op(
                    "The named datasets you may use here: schema, coarse row count, "
                    "allowed functions, version, the owner's policy; never values"
                )
            },
            "/v1/budget": {
                "get": _op(
                    "Your differential privacy budget of each named dataset you may see: "
                    "its terms, spent and remaining per analyst and in total"
                )
            },
            "/v1/directory": {
                "get": _op(
                    "The live members of the federation (on a server that keeps the directory)"
                )
            },
            "/v1/datasets": {
                "post": _op(
                    "Publish one of your uploads under a name (owners)",
                    "201",
                    requestBody=_json_body(_PUBLISH),
                )
            },
            "/v1/datasets/{name}": {
                "parameters": [_NAME_PARAM],
                "delete": _op("Withdraw a dataset and its grants (its owner, admins)"),
            },
            "/v1/grants": {
                "get": _op("The grants of your datasets (owners; all for admins)"),
                "post": _op(
                    "Grant a token name the use of a dataset, optionally limited to functions "
                    "and a time window (owners, admins)",
                    "201",
                    requestBody=_json_body(_GRANT),
                ),
            },
            "/v1/grants/{name}/{grantee}": {
                "parameters": [_NAME_PARAM, _GRANTEE_PARAM],
                "delete": _op("Revoke a grant; applies to the grantee's next request"),
            },
            "/v1/sources": {
                "get": _op("Registered sources, without connection strings (admins)"),
                "post": _op(
                    "Register a file, a directory of files or a database read in place (admins)",
                    "201",
                    requestBody=_json_body(_SOURCE),
                ),
            },
            "/v1/sources/{name}": {
                "parameters": [_NAME_PARAM],
                "delete": _op("Remove a source and its grants (admins)"),
            },
            "/v1/peer": {
                "post": _op(
                    "Peer gateway: signed and encrypted messages from member servers",
                    secured=False,
                    content=False,
                )
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                },
                "Computation": {
                    "type": "object",
                    "description": "any computation (for functions that declare no inputs)",
                    "required": ["microservice", "function"],
                    "properties": {
                        "microservice": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,31}$"},
                        "function": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,31}$"},
                        "inputs": {"type": "object"},
                        "session": _SESSION,
                    },
                    "additionalProperties": False,
                },
                **_RESPONSE_SCHEMAS,
                **schemas,
            },
        },
    }


# -- the API reference in Markdown ----------------------------------------------------------

BEGIN = "<!-- functions: generated by python -m fdrtd_server.openapi --markdown; do not edit -->"
END = "<!-- functions: end -->"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_text(schema: Mapping[str, Any]) -> str:
    """A JSON Schema of an input or output in a few words."""
    if "enum" in schema:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    words = []
    for option in options:
        kind = option.get("type", "any")
        if "enum" in option:
            words.append(_type_text(option))
            continue
        word = "data handle" if option.get("pattern", "").startswith("^d-") else str(kind)
        if kind == "array" and "items" in option:
            items = option["items"].get("anyOf", [option["items"]])
            word += " of " + " or ".join(str(i.get("type", "any")) for i in items)
        low = option.get("minimum", option.get("minItems", option.get("exclusiveMinimum")))
        high = option.get("maximum", option.get("maxItems", option.get("exclusiveMaximum")))
        if low is not None or high is not None:
            unit = " items" if kind == "array" else ""
            if "exclusiveMinimum" in option or "exclusiveMaximum" in option:
                unit = " (bounds excluded)"
            word += f", {'' if low is None else low}..{'' if high is None else high}{unit}"
        words.append(word)
    return " or ".join(words) or "any"


def markdown(spec: Mapping[str, Any]) -> str:
    """The functions section of ``docs/api.md``, from an OpenAPI document of :func:`document`."""
    schemas = spec["components"]["schemas"]
    lines = [BEGIN, ""]
    for name, request in schemas.items():
        if not name.startswith("Compute."):
            continue
        _, microservice, function = name.split(".")
        lines += [f"### `{microservice}.{function}`", "", _cell(request.get("description", ""))]
        if request.get("x-fdrtd-multiparty"):
            lines += ["", "Multi-party: every party starts it with the same `session`."]
        policy = request.get("x-fdrtd-policy")
        if policy:
            switches = ", ".join(f"`{switch}`" for switch in policy)
            lines += ["", f"Runs only where the server's policy sets {switches}."]
        inputs = request["properties"]["inputs"]
        required = set(inputs.get("required", []))
        lines += ["", "| input | type | required | description |", "|---|---|---|---|"]
        for key, schema in inputs.get("properties", {}).items():
            default = schema.get("default")
            about = schema.get("description", "")
            if default is not None:
                about += f" (default `{json.dumps(default)}`)"
            mark = "yes" if key in required else "no"
            lines.append(f"| `{key}` | {_type_text(schema)} | {mark} | {_cell(about)} |")
        outputs = schemas.get(f"Result.{microservice}.{function}", {}).get("properties", {})
        if outputs:
            lines += ["", "| result key | type | description |", "|---|---|---|"]
            for key, schema in outputs.items():
                about = _cell(schema.get("description", ""))
                lines.append(f"| `{key}` | {_type_text(schema)} | {about} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def update_markdown(text: str, section: str) -> str:
    """``text`` (``docs/api.md``) with its generated functions section replaced by ``section``.

    Raises:
        ValueError: If ``text`` lacks the begin or end marker.
    """
    if BEGIN not in text or END not in text:
        raise ValueError(f"the document has no generated section: add the lines {BEGIN} and {END}")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return before + section.rstrip("\n") + after


BUILTIN_DISTRIBUTION = "fdrtd"


def builtin_functions() -> dict[str, dict[str, Signature]]:
    """The jobs of the microservices this distribution ships (not of other plugins)."""
    import importlib.metadata

    from fdrtd_server.microservice import ENTRY_POINT_GROUP, Microservice

    functions: dict[str, dict[str, Signature]] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.dist is None or entry.dist.name != BUILTIN_DISTRIBUTION:
            continue
        spec = entry.load()
        assert isinstance(spec, Microservice)
        if spec.jobs:
            functions[spec.name] = {name: spec.signatures[name] for name in spec.jobs}
    return functions


def main(argv: list[str] | None = None) -> int:
    """``python -m fdrtd_server.openapi``: print the document, or the functions in Markdown."""
    parser = argparse.ArgumentParser(
        prog="python -m fdrtd_server.openapi", description=main.__doc__
    )
    parser.add_argument(
        "--markdown", action="store_true", help="the functions section of docs/api.md"
    )
    parser.add_argument("--write", type=Path, help="replace that section in this file")
    args = parser.parse_args(argv)
    settings = Settings(home=Path("."), name="fdrtd")
    spec = document(settings, builtin_functions())
    if args.write is not None:
        args.write.write_text(update_markdown(args.write.read_text(), markdown(spec)))
    elif args.markdown:
        sys.stdout.write(markdown(spec))
    else:
        sys.stdout.write(json.dumps(spec, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
