"""Training configuration validation and checkpoint state round trip."""

from __future__ import annotations

import pytest

from feedrec.training.checkpoint import TrainState
from feedrec.training.config import PRESETS, TrainConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("checkpoint_every_steps", -1),
        ("max_failures", -1),
        ("steps_per_epoch", -1),
        ("fault_drill_step", 0),
        ("dense_lr", 0.0),
        ("mixed_negatives", True),  # two-tower only
    ],
)
def test_bad_field_is_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig("ranker", **{field: value})  # type: ignore[arg-type]


def test_unknown_override_is_named() -> None:
    with pytest.raises(ValueError, match="epoch_count"):
        PRESETS["debug"]["ranker"].with_overrides(epoch_count=3)


def test_train_state_round_trip() -> None:
    state = TrainState(epoch=1, batches_done=7, global_step=38, history=[{"valid_loss": 0.5}])
    state.plan = [{"table": "ranker_user", "sharding": "table_wise", "ranks": [0]}]
    assert TrainState.from_json(state.to_json()) == state


def test_world_and_training_presets_share_their_names() -> None:
    from feedrec.cli import PRESET_NAMES
    from feedrec.world.config import PRESETS as WORLD_PRESETS

    assert set(PRESET_NAMES) == set(WORLD_PRESETS) == set(PRESETS)
