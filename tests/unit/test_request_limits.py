"""The ingress request limits (ASGI middleware) on a tiny FastAPI app, without Ray."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from feedrec.serving.api import MAX_BLOCKED, MAX_ID, MAX_INTERESTS, FeedRequest
from feedrec.serving.request_limits import (
    RequestLimits,
    RequestLimitsMiddleware,
    install_request_limits,
    parse_json_body,
)

LIMITS = RequestLimits(max_body_bytes=4096, max_json_depth=8)
JSON = {"content-type": "application/json"}


def _app(limits: RequestLimits = LIMITS) -> FastAPI:
    app = FastAPI()
    install_request_limits(app, limits)

    @app.post("/v1/feed")
    async def feed(request: FeedRequest) -> dict[str, int]:  # type: ignore[valid-type]
        return {"user_id": request.user_id}  # type: ignore[attr-defined]

    @app.post("/rollback")
    def rollback() -> dict[str, str]:  # an action without a body
        return {"status": "rolled back"}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _call(method: str, path: str, app: FastAPI | None = None, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app or _app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _post(content: bytes | str, headers: dict[str, str] | None = JSON) -> httpx.Response:
    return _call("POST", "/v1/feed", content=content, headers=headers)


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The one validation error of a 422 (FastAPI's shape), after checking the status."""
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and len(detail) == 1, detail
    return dict(detail[0])


def test_valid_requests_pass_through() -> None:
    assert _post('{"user_id": 7, "count": 3}').json() == {"user_id": 7}
    with_charset = {"content-type": "application/json; charset=utf-8"}
    assert _post('{"user_id": 8}', with_charset).json() == {"user_id": 8}
    # The default limit admits the largest valid request (every list full of the largest ids).
    largest = {
        "user_id": MAX_ID,
        "user_segment": MAX_ID,
        "interests": [MAX_ID] * MAX_INTERESTS,
        "count": 100,
        "blocked_creator_ids": [MAX_ID] * MAX_BLOCKED,
        "debug": False,
    }
    resp = _call("POST", "/v1/feed", _app(RequestLimits()), json=largest)
    assert resp.json() == {"user_id": MAX_ID}
    assert _call("GET", "/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        (None, "missing Content-Type"),
        ({"content-type": "text/plain"}, "'text/plain'"),
        ({"content-type": "application/x-www-form-urlencoded"}, "x-www-form-urlencoded"),
        ({"content-type": "multipart/form-data; boundary=x"}, "multipart/form-data"),
        ({"content-type": "application/jsonx"}, "application/jsonx"),
    ],
)
def test_non_json_content_types_are_415(headers: dict[str, str] | None, named: str) -> None:
    resp = _post('{"user_id": 1}', headers)
    assert resp.status_code == 415, resp.text
    assert named in resp.json()["detail"] and "application/json" in resp.json()["detail"]


def test_body_size_limit_from_content_length_and_at_the_boundary() -> None:
    limit = LIMITS.max_body_bytes
    at_limit = '{"user_id": 1}'.ljust(limit)  # JSON allows trailing whitespace
    assert _post(at_limit).status_code == 200
    resp = _post(at_limit + " ")
    assert resp.status_code == 413
    assert resp.json()["detail"] == (
        f"request body is {limit + 1} bytes; the limit is {limit} bytes (max_body_bytes)"
    )
    assert _post(b"x" * 10_000_000).status_code == 413


def _asgi(
    chunks: list[bytes], headers: list[tuple[bytes, bytes]], disconnect: bool = False
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Drive the middleware directly with a streamed body (no Content-Length): the messages
    it sent, and the bodies the app behind it received."""
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    if disconnect:
        messages[-1] = {"type": "http.disconnect"}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/feed", "headers": headers}
    asyncio.run(RequestLimitsMiddleware(app, LIMITS)(scope, receive, send))
    return sent, seen


def test_body_size_limit_while_streaming() -> None:
    headers = [(b"content-type", b"application/json")]
    body = b'{"user_id": 1, "blocked_creator_ids": [' + b"1," * 3000 + b"1]}"
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    sent, seen = _asgi(chunks, headers)
    assert sent[0]["status"] == 413 and not seen
    assert b"exceeds the limit of 4096 bytes" in sent[1]["body"]
    small = b'{"user_id": 1, "count": 5}'
    sent, seen = _asgi([small[:5], small[5:12], small[12:]], headers)
    assert sent[0]["status"] == 200 and seen == [small]  # replayed whole to the app
    sent, seen = _asgi([small[:5], small[5:]], headers, disconnect=True)
    assert sent == [] and seen == []  # the client went away: no answer, app not called


@pytest.mark.parametrize(
    ("body", "type_", "loc", "msg"),
    [
        (b'{"user_id": NaN}', "finite_number", ["user_id"], "NaN is not valid JSON"),
        (b'{"user_id": -Infinity}', "finite_number", ["user_id"], "-Infinity is not valid"),
        (b'{"user_id": 1, "count": Infinity}', "finite_number", ["count"], "Infinity"),
        (b'{"user_id": 1e400}', "finite_number", ["user_id"], "1e400 overflows"),
        (
            b'{"user_id": 1, "blocked_creator_ids": [2, -1e999]}',
            "finite_number",
            ["blocked_creator_ids", 1],
            "overflows",
        ),
        (b'{"user_id": ' + b"9" * 3000 + b"}", "int_too_long", ["user_id"], "3000 digits"),
        (b'{"user_id": "\\ud800"}', "string_unicode", ["user_id"], "lone UTF-16 surrogate"),
        (b'{"user_id": 1, "\\udfff": 1}', "string_unicode", ["\\udfff"], "lone UTF-16"),
        (b'{"user_id": 1, "user_id": 2}', "duplicate_key", [], "duplicate key 'user_id'"),
        (b"[" * 20 + b"]" * 20, "json_too_deep", [0] * 8, "deeper than 8 levels"),
        (b"[" * 2000 + b"]" * 2000, "json_too_deep", [], "deeper than 8 levels"),
        (b"   \n", "missing", [], "request body is empty"),
        (b"\xff\xfe{}", "json_invalid", [], "not valid UTF-8 (byte 0)"),
        (b'{"user_id": 1', "json_invalid", [13], "invalid JSON: Expecting ',' delimiter"),
        (b"{'user_id': 1}", "json_invalid", [1], "Expecting property name"),
        (b'{"user_id": 1} {}', "json_invalid", [15], "Extra data"),
    ],
)
def test_hostile_json_is_422_naming_field_and_problem(
    body: bytes, type_: str, loc: list[object], msg: str
) -> None:
    error = _error(_post(body), 422)
    assert error["type"] == type_ and error["loc"] == ["body", *loc]
    assert msg in error["msg"], error


@pytest.mark.parametrize(
    ("body", "field", "msg"),
    [
        ({"user_id": -1}, "user_id", "greater than or equal to 0"),
        ({"user_id": MAX_ID + 1}, "user_id", "less than or equal to"),
        ({"user_id": 1, "count": 0}, "count", "greater than or equal to 1"),
        ({"user_id": 1, "count": 10**6}, "count", "less than or equal to 100"),
        ({"user_id": 1.5}, "user_id", "valid integer"),
        ({"user_id": "1"}, "user_id", "valid integer"),
        ({"user_id": True}, "user_id", "valid integer"),
        ({"user_id": 1, "user_segment": 2**70}, "user_segment", "less than or equal"),
        ({"user_id": 1, "blocked_creator_ids": [2**70]}, "blocked_creator_ids", "less than"),
        ({"user_id": 1, "blocked_creator_ids": [-3]}, "blocked_creator_ids", "greater than"),
        ({"user_id": 1, "interests": list(range(21))}, "interests", "at most 20 items"),
        (
            {"user_id": 1, "blocked_creator_ids": [1] * (MAX_BLOCKED + 1)},
            "blocked_creator_ids",
            f"at most {MAX_BLOCKED} items",
        ),
        ({"user_id": 1, "név\u0000": "\U0001f600"}, "név\u0000", "Extra inputs"),
    ],
)
def test_model_errors_still_name_the_field(body: dict[str, Any], field: str, msg: str) -> None:
    resp = _post(json.dumps(body))
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert any(field in e["loc"] and msg in e["msg"] for e in detail), detail


def test_bodyless_posts_reach_the_route() -> None:
    assert _call("POST", "/rollback").json() == {"status": "rolled back"}
    assert _call("POST", "/rollback", headers={"content-length": "0"}).status_code == 200
    # The feed route itself then names the missing body.
    for headers in (None, JSON):
        error = _error(_post(b"", headers), 422)
        assert error["loc"] == ["body"] and error["msg"] == "Field required"


def test_integral_floats_count_as_integers() -> None:
    """JSON Schema's ``integer`` admits ``3.0`` (the fuzzer sends it as a valid value)."""
    body = {"user_id": 3.0, "count": 5.0, "user_segment": 1.0, "blocked_creator_ids": [2.0]}
    assert _post(json.dumps(body)).json() == {"user_id": 3}
    assert FeedRequest.model_validate(body).blocked_creator_ids == [2]  # type: ignore[attr-defined]


def test_get_requests_are_not_checked_and_post_routes_refuse_get() -> None:
    assert _call("GET", "/healthz", content=b"NaN").status_code == 200
    resp = _call("GET", "/v1/feed")
    assert resp.status_code == 405 and resp.json()["detail"] == "Method Not Allowed"


def test_limits_from_env_and_validated() -> None:
    assert RequestLimits.from_env({}) == RequestLimits()
    env = {"FEEDREC_MAX_BODY_BYTES": "1024", "FEEDREC_MAX_JSON_DEPTH": ""}
    assert RequestLimits.from_env(env) == RequestLimits(max_body_bytes=1024)
    with pytest.raises(ValueError, match="max_body_bytes"):
        RequestLimits.from_env({"FEEDREC_MAX_BODY_BYTES": "0"})
    with pytest.raises(ValueError, match="max_json_depth"):
        RequestLimits(max_json_depth=-1)


def test_parse_json_body_returns_the_document() -> None:
    assert parse_json_body(b'{"a": [1, 2.5, "\xc3\xa9"]}', LIMITS) == {"a": [1, 2.5, "é"]}


def test_openapi_documents_the_limit_responses() -> None:
    app = _app()
    responses = app.openapi()["paths"]["/v1/feed"]["post"]["responses"]
    assert {"200", "413", "415", "422"} <= set(responses)
    ref = {"$ref": "#/components/schemas/ErrorMessage"}
    assert responses["413"]["content"]["application/json"]["schema"] == ref
    assert ref in responses["422"]["content"]["application/json"]["schema"]["anyOf"]
    assert app.openapi() == app.openapi()  # idempotent
    assert "413" not in app.openapi()["paths"]["/healthz"]["get"]["responses"]
