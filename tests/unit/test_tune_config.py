"""Tuning configuration: a bad search space is refused, naming the key."""

from __future__ import annotations

import pytest

from feedrec.training.tuning import TuneConfig, split_params


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


def test_overrides_split_into_train_and_model_fields() -> None:
    params = {"train.dense_lr": 1e-3, "epochs": 2, "model.num_experts": 6}
    assert split_params(params) == ({"dense_lr": 1e-3, "epochs": 2}, {"num_experts": 6})
