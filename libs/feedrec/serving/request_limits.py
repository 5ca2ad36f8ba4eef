"""Request limits of the HTTP ingress: an ASGI middleware that turns hostile input into a 4xx
whose ``detail`` names the problem, before FastAPI or the models see it.

For POST/PUT/PATCH requests it enforces, in this order:

- the body size (``max_body_bytes``): from ``Content-Length`` when sent, and while streaming the
  body (chunked uploads): else 413, without reading the rest;
- a non-empty body must be JSON (``Content-Type`` ``application/json`` or
  ``application/*+json``): else 415. An empty body passes through (e.g. an admin action without
  one): the route decides whether it needs one;
- the body must be one JSON document that Python's ``json`` would accept *and* that renders
  back to JSON: UTF-8, no ``NaN``/``Infinity`` literals or numbers that overflow a float,
  integers of at most ``max_int_digits`` digits, no lone UTF-16 surrogates, no duplicate keys,
  nesting at most ``max_json_depth`` deep: else 422 in FastAPI's validation-error shape
  (``{"detail": [{"type", "loc", "msg"}]}``, ``loc`` naming the field).

Without these checks ``{"user_id": NaN}``, ``1e400`` or ``"\\ud800"`` reached FastAPI's own
validation-error response, which cannot render them (``allow_nan=False`` / UTF-8 encoding), and
the client got a 500; ``[[[[...`` 100k deep was a 400 "There was an error parsing the body".

:func:`install_request_limits` adds the middleware to a FastAPI app and documents the 413/415
responses (and the string ``detail`` of a 422 raised with ``HTTPException``) in its OpenAPI
schema. Limits come from :class:`RequestLimits` (defaults here, ``FEEDREC_*`` environment
variables override, e.g. through Serve's ``runtime_env.env_vars``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Methods whose body the middleware checks (the service's body-carrying routes are JSON).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_MEDIA_TYPE = "application/json"


class RequestLimits(BaseModel):
    """Limits on one HTTP request to the ingress."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(
        default=64 * 1024, ge=1, description="request body size limit (413 above it)"
    )
    max_json_depth: int = Field(
        default=16, ge=1, description="nesting of JSON arrays/objects (a FeedRequest needs 2)"
    )
    max_int_digits: int = Field(
        default=64, ge=1, le=4000, description="digits of one JSON integer literal"
    )

    #: Environment variable -> field, read by :meth:`from_env`.
    ENV: ClassVar[dict[str, str]] = {
        "FEEDREC_MAX_BODY_BYTES": "max_body_bytes",
        "FEEDREC_MAX_JSON_DEPTH": "max_json_depth",
        "FEEDREC_MAX_INT_DIGITS": "max_int_digits",
    }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RequestLimits:
        """Defaults, overridden by the ``FEEDREC_MAX_*`` variables that are set."""
        env = os.environ if environ is None else environ
        return cls.model_validate(
            {field: env[var] for var, field in cls.ENV.items() if env.get(var)}
        )


class _Invalid:
    """Parse-time marker for a JSON value the service refuses; :func:`_find_invalid` reports
    where it sits."""

    __slots__ = ("msg", "type")

    def __init__(self, type_: str, msg: str) -> None:
        self.type = type_
        self.msg = msg


class BodyError(ValueError):
    """A JSON body the service refuses: ``type``, ``loc`` (inside the body) and ``msg``, as in
    one of FastAPI's validation errors."""

    def __init__(self, type_: str, loc: list[str | int], msg: str) -> None:
        super().__init__(msg)
        self.type = type_
        self.loc = loc
        self.msg = msg

    def detail(self) -> list[dict[str, Any]]:
        return [{"type": self.type, "loc": ["body", *self.loc], "msg": self.msg}]


def _safe_key(key: str) -> str:
    """A key as it can appear in a JSON error (lone surrogates escaped)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find_invalid(doc: object, max_depth: int) -> BodyError | None:
    """The first problem in a parsed document (iterative: depth is bounded only by the parser)."""
    stack: list[tuple[object, list[str | int], int]] = [(doc, [], 0)]
    while stack:
        value, loc, depth = stack.pop()
        if isinstance(value, _Invalid):
            return BodyError(value.type, loc, value.msg)
        if isinstance(value, str):
            if _has_lone_surrogate(value):
                return BodyError(
                    "string_unicode",
                    loc,
                    "string contains a lone UTF-16 surrogate (\\ud800-\\udfff)",
                )
            continue
        children: list[tuple[str | int, object]]
        if isinstance(value, dict):
            children = list(value.items())
        elif isinstance(value, list):
            children = list(enumerate(value))
        else:
            continue
        if depth + 1 > max_depth:
            return BodyError(
                "json_too_deep", loc, f"JSON nested deeper than {max_depth} levels (max_json_depth)"
            )
        for key, child in reversed(children):
            if isinstance(key, str) and _has_lone_surrogate(key):
                return BodyError(
                    "string_unicode",
                    [*loc, _safe_key(key)],
                    "key contains a lone UTF-16 surrogate (\\ud800-\\udfff)",
                )
            stack.append((child, [*loc, key], depth + 1))
    return None


def parse_json_body(body: bytes, limits: RequestLimits) -> object:
    """The JSON document in ``body``, or :class:`BodyError` naming what is wrong and where."""
    if not body.strip():
        raise BodyError("missing", [], "request body is empty: expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(
            "json_invalid", [], f"request body is not valid UTF-8 (byte {e.start})"
        ) from None

    def parse_int(s: str) -> object:
        digits = len(s.lstrip("-"))
        if digits > limits.max_int_digits:
            return _Invalid(
                "int_too_long",
                f"integer literal has {digits} digits; at most {limits.max_int_digits}",
            )
        return int(s)

    def parse_float(s: str) -> object:
        x = float(s)
        if not math.isfinite(x):
            return _Invalid("finite_number", f"number {s[:32]} overflows a 64-bit float")
        return x

    def parse_constant(s: str) -> object:
        return _Invalid("finite_number", f"{s} is not valid JSON: numbers must be finite")

    def pairs(items: list[tuple[str, Any]]) -> object:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                return _Invalid("duplicate_key", f"duplicate key {_safe_key(key)!r}")
            out[key] = value
        return out

    try:
        doc = json.loads(
            text,
            parse_int=parse_int,
            parse_float=parse_float,
            parse_constant=parse_constant,
            object_pairs_hook=pairs,
        )
    except json.JSONDecodeError as e:
        raise BodyError(
            "json_invalid",
            [e.pos],
            f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
        ) from None
    except RecursionError:
        raise BodyError(
            "json_too_deep",
            [],
            f"JSON nested deeper than {limits.max_json_depth} levels (max_json_depth)",
        ) from None
    problem = _find_invalid(doc, limits.max_json_depth)
    if problem is not None:
        raise problem
    return doc


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == JSON_MEDIA_TYPE or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class RequestLimitsMiddleware:
    """Pure ASGI middleware enforcing :class:`RequestLimits` (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: RequestLimits | None = None) -> None:
        self.app = app
        self.limits = limits or RequestLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes

        async def reject(status: int, detail: object, close: bool = False) -> None:
            headers = {"connection": "close"} if close else None
            await JSONResponse({"detail": detail}, status, headers=headers)(scope, receive, send)

        length = _header(scope, b"content-length")
        declared = int(length) if length is not None and length.strip().isdigit() else None
        if declared is not None and declared > limit:  # refused unread
            await reject(
                413,
                f"request body is {declared} bytes; the limit is {limit} bytes (max_body_bytes)",
                close=True,
            )
            return
        chunks: list[bytes] = []
        size = 0
        while True:  # read it all, up to the limit (a chunked upload declares no length)
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await reject(
                    413,
                    f"request body exceeds the limit of {limit} bytes (max_body_bytes)",
                    close=True,
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            content_type = _header(scope, b"content-type")
            if content_type is None:
                await reject(415, f"missing Content-Type: send {JSON_MEDIA_TYPE}")
                return
            if not _is_json(content_type):
                shown = content_type[:100].encode("ascii", "backslashreplace").decode("ascii")
                await reject(415, f"unsupported Content-Type {shown!r}: send {JSON_MEDIA_TYPE}")
                return
            try:
                parse_json_body(body, self.limits)
            except BodyError as e:
                await reject(422, e.detail())
                return
        # else no body (e.g. an admin action): the route decides whether it needs one
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the buffered body once, then defers to the client's."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


#: OpenAPI schema of the ``{"detail": "..."}`` errors (413, 415, and 422 from ``HTTPException``).
ERROR_MESSAGE_SCHEMA = {
    "title": "ErrorMessage",
    "type": "object",
    "properties": {"detail": {"title": "Detail", "type": "string"}},
    "required": ["detail"],
}


def _document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the middleware's responses to every operation with a request body (idempotent)."""
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorMessage"] = (
        ERROR_MESSAGE_SCHEMA
    )
    ref = {"$ref": "#/components/schemas/ErrorMessage"}
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            responses = operation.setdefault("responses", {})
            for status, what in (
                ("413", "Request body over the size limit"),
                ("415", f"Content-Type is not {JSON_MEDIA_TYPE}"),
            ):
                responses.setdefault(
                    status, {"description": what, "content": {JSON_MEDIA_TYPE: {"schema": ref}}}
                )
            unprocessable = responses.get("422", {}).get("content", {}).get(JSON_MEDIA_TYPE)
            if unprocessable and "anyOf" not in unprocessable["schema"]:
                # Validation errors (a list naming fields) or a request the models cannot serve
                # as asked (``HTTPException(422, "<field>: ...")``, a string).
                unprocessable["schema"] = {"anyOf": [unprocessable["schema"], ref]}
    return schema


def install_request_limits(app: Any, limits: RequestLimits | None = None) -> RequestLimits:
    """Add :class:`RequestLimitsMiddleware` to a FastAPI ``app`` and document its responses in
    ``app.openapi()``. Returns the limits in force (``RequestLimits.from_env()`` by default)."""
    limits = limits or RequestLimits.from_env()
    app.add_middleware(RequestLimitsMiddleware, limits=limits)
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        return _document_errors(generate())

    app.openapi = openapi
    return limits
