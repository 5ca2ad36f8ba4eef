"""Tuning configuration: a bad search space is refused, naming the key."""

from __future__ import annotations

import pytest

from feedrec.training.tuning import TuneConfig


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.no_such": {"type": "choice", "values": [1]}}, "no such train config field"),
        ({"lr": {"type": "choice", "values": [1]}}, "train.X or model.X"),
        ({"train.dense_lr": {"type": "loguniform", "low": 0, "high": 1}}, "low < high"),
        ({"train.dense_lr": {"type": "normal"}}, "loguniform, uniform or choice"),
    ],
)
def test_bad_search_space_is_named(space: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TuneConfig(model="ranker", space=space)
