"""Warm start: an earlier model's rows follow their ids into the new vocabularies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from feedrec.artifacts import load_artifact
from feedrec.features.vocabulary import Vocabularies, Vocabulary
from feedrec.models.ranker import Ranker, RankerConfig
from feedrec.schema import TABLES, tables_for
from feedrec.training.warm_start import NEW_ROW, WarmStart, table_of


def test_embedding_keys_name_their_table() -> None:
    assert table_of("ebc.embedding_bags.ranker_post.weight") == "post"
    assert table_of("user_ebc.embedding_bags.user_tower_user.weight") == "user"
    assert table_of("over.0.weight") is None


def test_rows_follow_their_ids_and_new_ids_keep_their_initialisation(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    """Earlier vocabularies hold ids 0..3 everywhere (rows 1..4); the new ones hold 2, 3, 7:
    ids 2 and 3 move to rows 1 and 2, id 7 (new) keeps the new model's row, ids 0 and 1 go."""
    earlier = load_artifact(ranker_artifact(tmp_path / "v1", seed=1))
    vocabs = Vocabularies({t.vocab: Vocabulary(np.asarray([2, 3, 7])) for t in TABLES})
    config = RankerConfig(num_rows=vocabs.num_rows())
    warm = WarmStart.from_artifact(earlier.root, config, vocabs)
    assert warm.source == earlier.version
    assert set(warm.carried.values()) == {3}  # OOV row + ids 2 and 3
    torch.manual_seed(5)
    model = Ranker(config)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    copied = warm.apply(model)
    after = model.state_dict()
    assert copied > 0
    tables = [k for k in after if table_of(k)]
    assert len(tables) == len(tables_for("ranker"))
    for key in tables:
        assert warm.rows[key].tolist() == [0, 3, 4, NEW_ROW]
        old = earlier.state_dict[key]
        assert torch.equal(after[key][0], old[0])  # OOV row
        assert torch.equal(after[key][1:3], old[3:5])  # ids 2 and 3
        assert torch.equal(after[key][3], fresh[key][3])  # id 7: fresh
    dense = [k for k in after if not table_of(k) and k != "calibration"]
    assert dense and all(torch.equal(after[k], earlier.state_dict[k]) for k in dense)
    if "calibration" in after:
        assert torch.equal(after["calibration"], fresh["calibration"])  # fitted again


def test_a_different_architecture_is_refused_naming_the_field(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    root = ranker_artifact(tmp_path / "v1")
    vocabs = load_artifact(root).vocabs
    wider = RankerConfig(num_rows=vocabs.num_rows(), over_arch=(64,))
    with pytest.raises(ValueError, match=r"architecture differs .* \['over_arch'\]"):
        WarmStart.from_artifact(root, wider, vocabs)
