import pytest
from pydantic import ValidationError

from feedrec.serving.api import FeedRequest, FeedResponse


def test_valid_request_defaults() -> None:
    req = FeedRequest.model_validate_json('{"user_id": 3}')
    assert (req.user_id, req.count, req.debug) == (3, 20, False)


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
    ],
)
def test_invalid_requests_name_the_field(body: str, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        FeedRequest.model_validate_json(body)
    assert field in str(err.value)


def test_response_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        FeedResponse(user_id=1, items=[], model_version="v", fallback=False, oops=1)
