import pytest
from pydantic import ValidationError

from feedrec.serving.api import FeedRequest, FeedResponse


def test_valid_request_defaults() -> None:
    req = FeedRequest.model_validate_json('{"user_id": 3}')
    assert (req.user_id, req.count, req.debug) == (3, 20, False)
    assert req.blocked_creator_ids == []
    blocked = FeedRequest.model_validate_json('{"user_id": 3, "blocked_creator_ids": [4, 9]}')
    assert blocked.blocked_creator_ids == [4, 9]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"user_id": -1}', "user_id"),
        ('{"user_id": 1, "count": 0}', "count"),
        ('{"user_id": 1, "count": 101}', "count"),
        ('{"user_id": "7"}', "user_id"),
        ('{"user_id": 1.5}', "user_id"),
        ('{"user_id": 1, "extra": true}', "extra"),
        ("{}", "user_id"),
        ('{"user_id": 1, "blocked_creator_ids": [1, "x"]}', "blocked_creator_ids"),
        ('{"user_id": 1, "blocked_creator_ids": 3}', "blocked_creator_ids"),
    ],
)
def test_invalid_requests_name_the_field(body: str, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        FeedRequest.model_validate_json(body)
    assert field in str(err.value)


def test_response_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        FeedResponse(user_id=1, items=[], model_version="v", fallback=False, oops=1)


def test_service_config_names_inconsistent_rerank_rules(tmp_path) -> None:
    from feedrec.serving.config import ServiceConfig

    paths = {k: tmp_path for k in ("world_dir", "data_dir", "ranker_dir", "retrieval_dir")}
    with pytest.raises(ValidationError, match="max_per_topic"):
        ServiceConfig(**paths, topic_window=2, max_per_topic=3)
    assert ServiceConfig(**paths).rerank_config().fair_share == 0.2
