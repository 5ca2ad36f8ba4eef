"""HTTP request/response models of the feed service (pydantic, ``extra="forbid"``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, create_model

from feedrec.schema.registry import RAW_COLUMNS, TASKS
from feedrec.serving.exploration import SlateLog

MAX_COUNT = 100
MAX_BLOCKED = 1000
#: Request fields that identify the viewer: user-side id columns of the registry that a client
#: knows (the rest of the user's features come from the online store).
REQUEST_FEATURES = ("user_id",)
#: Optional context a client may know about a viewer the models have never seen (cold start):
#: user-side id columns of the registry.
CONTEXT_FEATURES = ("user_segment",)
MAX_INTERESTS = 20
#: Largest id a request may carry (user, segment, topic, creator): 2**53 - 1, the largest integer
#: every JSON client represents exactly (JavaScript's ``Number.MAX_SAFE_INTEGER``); a bound
#: above 2**53 also cannot be checked exactly by JSON Schema validators that compare as floats.
MAX_ID = 2**53 - 1


def _integral(value: object) -> object:
    """``3.0`` -> ``3``: JSON Schema's ``integer`` admits numbers with a zero fraction, and some
    JSON encoders write them; anything else is left to strict ``int`` validation (``1.5``,
    ``"3"`` and ``true`` stay errors)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An ``integer`` of the request schema (strict, but ``3.0`` counts as 3).
Integer = Annotated[int, BeforeValidator(_integral)]
#: An id in a request. ``Field`` before the validator, flat: otherwise pydantic writes its bounds
#: into the JSON Schema as ``ge``/``le`` instead of ``minimum``/``maximum``.
Id = Annotated[int, Field(ge=0, le=MAX_ID), BeforeValidator(_integral)]


def _id_list(max_length: int, description: str) -> tuple[object, object]:
    """An optional list of ids in 0..MAX_ID (default empty) as a ``create_model`` field."""
    return (list[Id], Field(default_factory=list, max_length=max_length, description=description))


def _request_model() -> type[BaseModel]:
    known = {c.name for c in RAW_COLUMNS if c.entity == "user" and c.dtype == "int64"}
    missing = set(REQUEST_FEATURES + CONTEXT_FEATURES) - known
    if missing:
        raise ValueError(f"request features {sorted(missing)} are not user features")
    fields: dict[str, object] = {
        name: (Integer, Field(ge=0, le=MAX_ID, description=f"registry feature {name}"))
        for name in REQUEST_FEATURES
    }
    for name in CONTEXT_FEATURES:
        fields[name] = (
            Id | None,
            Field(default=None, description=f"cold-start context: registry feature {name}"),
        )
    fields["interests"] = _id_list(
        MAX_INTERESTS, "cold-start context: topic ids the viewer picked (e.g. at sign-up)"
    )
    fields["count"] = (
        Integer,
        Field(default=20, ge=1, le=MAX_COUNT, description="number of posts to return"),
    )
    fields["blocked_creator_ids"] = _id_list(
        MAX_BLOCKED, "creators the viewer blocked: none of their posts is returned"
    )
    fields["debug"] = (
        bool,
        Field(default=False, description="include per-stage details and per-item reasons"),
    )
    return create_model(  # type: ignore[call-overload]
        "FeedRequest", __config__=ConfigDict(extra="forbid", strict=True), **fields
    )


#: ``POST /v1/feed`` body: ``{"user_id": int, "count": 1..100, "blocked_creator_ids": [int],
#: "debug": bool}``.
FeedRequest = _request_model()


class FeedItem(BaseModel):
    """One post of the feed with its value score and per-task predictions."""

    model_config = ConfigDict(extra="forbid")

    post_id: int
    score: float
    scores: dict[str, float] = Field(description=f"per task: {', '.join(TASKS)}")
    reasons: list[str] | None = Field(
        default=None, description="debug only: what moved this post (fairness, freshness, ...)"
    )


class FeedResponse(BaseModel):
    """``POST /v1/feed`` response."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(
        description="32 hex digits naming this response: events about its posts carry it"
    )
    variant: str = Field(description="the experiment variant that served it ('control' if none)")
    user_id: int
    items: list[FeedItem]
    model_version: str
    fallback: bool = Field(description="true when a stage failed and a popularity feed was served")
    cold_start: bool = Field(default=False, description="true for users unknown to the models")
    debug: dict[str, object] | None = None
    #: How the items were drawn (exploring variants): logged with the feed, never sent.
    _slate: SlateLog | None = PrivateAttr(default=None)

    @property
    def slate(self) -> SlateLog | None:
        return self._slate

    def with_slate(self, slate: SlateLog) -> FeedResponse:
        self._slate = slate
        return self


class PromoteRequest(BaseModel):
    """``POST /admin/models/{name}/promote`` body (admin token required)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: int = Field(ge=1, le=1_000_000)
    force: bool = Field(default=False, description="promote even if the metric gate fails")


class ShadowRequest(BaseModel):
    """``POST /admin/models/{ranker|retrieval}/shadow`` body (admin token required): the
    version to run shadow traffic through, or null to stop."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: int | None = Field(ge=1, le=1_000_000)
