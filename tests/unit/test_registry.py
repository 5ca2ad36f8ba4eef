import numpy as np

from feedrec.features.transform import FeatureTransform
from feedrec.features.vocabulary import Vocabularies, Vocabulary
from feedrec.models.embeddings import embedding_bag_configs
from feedrec.schema import (
    RAW_COLUMNS,
    SPARSE_FEATURES,
    TABLES,
    dense_dim,
    example_arrow_schema,
    sparse_features,
)


def _vocabs() -> Vocabularies:
    return Vocabularies({t.vocab: Vocabulary(np.arange(10)) for t in TABLES})


def _raw(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = {}
    for c in RAW_COLUMNS:
        shape = (n, c.length) if c.length else (n,)
        raw[c.name] = rng.integers(0, 12, size=shape) if c.dtype == "int64" else rng.random(shape)
    return raw


def test_arrow_schema_has_every_raw_column_and_label() -> None:
    names = example_arrow_schema().names
    assert [c.name for c in RAW_COLUMNS] == names[: len(RAW_COLUMNS)]
    assert {"like", "hide", "dwell", "day", "impression_id", "propensity"} <= set(names)


def test_embedding_configs_follow_the_registry() -> None:
    rows = {t.name: 7 for t in TABLES}
    configs = embedding_bag_configs("ranker", rows)
    features = [f for c in configs for f in c.feature_names]
    assert sorted(features) == sorted(f.name for f in sparse_features("ranker"))
    topic = next(c for c in configs if c.name == "ranker_topic")
    assert set(topic.feature_names) == {"topic", "u_recent_topics"}  # one shared table
    assert all(c.num_embeddings == 7 for c in configs)


def test_transform_widths_match_registry_for_every_part() -> None:
    raw = _raw(5)
    for part in ("ranker", "user_tower", "item_tower"):
        inputs = FeatureTransform(_vocabs())(raw, part)
        feats = sparse_features(part)
        assert inputs.dense.shape == (5, dense_dim(part))
        assert inputs.single_ids.shape == (5, sum(f.max_len == 1 for f in feats))
        assert inputs.multi_ids.shape == (5, sum(f.max_len for f in feats if f.max_len > 1))


def test_transform_maps_unknown_ids_to_oov_and_keeps_padding() -> None:
    raw = _raw(3)
    raw["user_id"] = np.array([0, 9, 11])
    raw["u_recent_topics"][:] = -1
    raw["u_recent_topics"][0, 0] = 3
    inputs = FeatureTransform(_vocabs())(raw, "ranker")
    user_col = [f.name for f in sparse_features("ranker") if f.max_len == 1].index("user_id")
    assert inputs.single_ids[:, user_col].tolist() == [1, 10, 0]
    assert inputs.multi_ids[0].tolist() == [4, -1, -1, -1, -1]
    assert (inputs.multi_ids[1:] == -1).all()


def test_sparse_feature_names_unique() -> None:
    names = [f.name for f in SPARSE_FEATURES]
    assert len(names) == len(set(names))
