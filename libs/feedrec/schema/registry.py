"""Feature registry.

Everything downstream is derived from the declarations here:

* the Arrow schema of the preprocessed examples (:func:`example_arrow_schema`),
* the TorchRec ``EmbeddingBagConfig`` list of each model part (``feedrec.models.embeddings``),
* the ``KeyedJaggedTensor`` keys (the sparse feature names, in registry order),
* the dense input layout (:func:`dense_features`, :func:`dense_dim`),
* the HTTP request model of the feed service (``feedrec.serving.api``).

No torch import here: Ray Data workers and the CLI import this module cheaply.

Vocabulary *sizes* are fitted on the training days (``feedrec.features.vocabulary``); a table's row
count is ``len(vocabulary) + 1`` (row 0 is the out-of-vocabulary row, which is how a new post or a
new user reaches a model: through that row plus its content/context features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

ModelPart = Literal["ranker", "user_tower", "item_tower"]
Pooling = Literal["sum", "mean"]
DenseKind = Literal["log1p", "rate", "mean", "vector_mean", "age_log", "age_decay", "identity"]
Entity = Literal["user", "post", "creator", "user_topic", "context"]

#: Length of the jagged "recent topics" history (topics the user engaged with most, last 7 days).
HISTORY_LEN = 5
#: Slots of the "shown topics" list: the topics of the posts the user was shown in the window,
#: each repeated in proportion to its impressions (``feedrec.features.tables.topic_slots``).
SHOWN_TOPICS_LEN = 16
#: Trailing window (days) of the user and creator aggregates. Post aggregates use all prior days.
WINDOW_DAYS = 7
#: Dimension of the post content embedding (stands in for a pretrained text/image encoder).
CONTENT_DIM = 32
#: Shrinkage of the smoothed rates: rate = events / (impressions + RATE_PRIOR).
RATE_PRIOR = 10.0
#: Freshness decay constant (days) of the ``age_decay`` transform.
AGE_DECAY_DAYS = 2.0

#: Binary tasks of the ranker, then the dwell-time regression task (in this order everywhere).
TASKS: tuple[str, ...] = ("like", "comment", "share", "hide", "dwell")
#: Label columns logged per impression.
LABELS: tuple[str, ...] = ("view", "like", "comment", "share", "hide", "dwell")


@dataclass(frozen=True)
class TableSpec:
    """An embedding table. ``vocab`` names the fitted vocabulary that sizes it."""

    name: str
    dim: int
    vocab: str

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.dim % 4:
            raise ValueError(f"table {self.name}: dim must be a positive multiple of 4")


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature looked up in ``table``.

    Args:
        name: column name and KeyedJaggedTensor key.
        table: embedding table (features may share one within a model part).
        parts: model parts that consume it.
        pooling: how a multi-valued feature is pooled.
        max_len: 1 for a single id; > 1 for a jagged list padded with -1 to ``max_len``.
    """

    name: str
    table: str
    parts: frozenset[ModelPart]
    pooling: Pooling = "sum"
    max_len: int = 1

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"sparse feature {self.name}: max_len must be >= 1")


@dataclass(frozen=True)
class DenseFeature:
    """A float feature computed from raw point-in-time columns by a named transform.

    ``kind`` selects the transform in ``feedrec.features.transform``; ``inputs`` are raw columns.
    """

    name: str
    kind: DenseKind
    inputs: tuple[str, ...]
    parts: frozenset[ModelPart]
    dim: int = 1

    def __post_init__(self) -> None:
        arity = {"rate": 2, "mean": 2, "vector_mean": 2}.get(self.kind, 1)
        if len(self.inputs) != arity:
            raise ValueError(f"dense feature {self.name}: {self.kind} takes {arity} inputs")


@dataclass(frozen=True)
class RawColumn:
    """A column of the point-in-time joined examples (before transforms)."""

    name: str
    entity: Entity
    dtype: Literal["int64", "float32"]
    length: int = 0  # 0: scalar; > 0: fixed-size list

    def arrow_type(self) -> pa.DataType:
        scalar = pa.int64() if self.dtype == "int64" else pa.float32()
        return pa.list_(scalar, self.length) if self.length else scalar


_R: frozenset[ModelPart] = frozenset({"ranker"})
_RU: frozenset[ModelPart] = frozenset({"ranker", "user_tower"})
_RI: frozenset[ModelPart] = frozenset({"ranker", "item_tower"})
_U: frozenset[ModelPart] = frozenset({"user_tower"})

TABLES: tuple[TableSpec, ...] = (
    TableSpec("user", 32, vocab="user_id"),
    TableSpec("segment", 8, vocab="user_segment"),
    TableSpec("post", 32, vocab="post_id"),
    TableSpec("creator", 16, vocab="creator_id"),
    TableSpec("topic", 16, vocab="topic"),
    TableSpec("shown_topic", 16, vocab="topic"),
    TableSpec("media", 4, vocab="media_type"),
)

# The user tower reads the user id, the item tower no post id. With in-batch negatives only, the
# ids memorised the ~3.5 positives a user has (small world, Recall@100 0.019 with ids vs 0.034
# without). With mixed random negatives the user id learns the taste no other feature carries:
# 0.074 / 0.076 (seeds 0 / 1) vs 0.058 / 0.063 without it, and 0.056 without random negatives.
SPARSE_FEATURES: tuple[SparseFeature, ...] = (
    SparseFeature("user_id", "user", _RU),
    SparseFeature("user_segment", "segment", _RU),
    SparseFeature("u_recent_topics", "topic", _RU, pooling="mean", max_len=HISTORY_LEN),
    # Mean-pooled, the slots weigh each topic's embedding by its share of the user's impressions.
    # The logging policy shows a user their topics of interest more often, so the ~46 impressions
    # a week reveal interests the ~3 likes cannot: Recall@100 0.0815 vs 0.0731 without (small,
    # mean of three seeds). A table of its own: sharing `topic`'s gave 0.0787. The ranker reads
    # the counts of the candidate's own topic (ut_imps, ut_likes), the slice of them it needs.
    SparseFeature("u_shown_topics", "shown_topic", _U, pooling="mean", max_len=SHOWN_TOPICS_LEN),
    SparseFeature("post_id", "post", _R),
    SparseFeature("creator_id", "creator", _RI),
    SparseFeature("topic", "topic", _RI),
    SparseFeature("media_type", "media", _RI),
)

RAW_COLUMNS: tuple[RawColumn, ...] = (
    # ids
    RawColumn("user_id", "user", "int64"),
    RawColumn("user_segment", "user", "int64"),
    RawColumn("post_id", "post", "int64"),
    RawColumn("creator_id", "post", "int64"),
    RawColumn("topic", "post", "int64"),
    RawColumn("media_type", "post", "int64"),
    # user aggregates over the trailing WINDOW_DAYS days before the impression's day
    RawColumn("u_imps", "user", "float32"),
    RawColumn("u_likes", "user", "float32"),
    RawColumn("u_comments", "user", "float32"),
    RawColumn("u_shares", "user", "float32"),
    RawColumn("u_hides", "user", "float32"),
    RawColumn("u_dwell", "user", "float32"),
    RawColumn("u_recent_topics", "user", "int64", HISTORY_LEN),
    RawColumn("u_shown_topics", "user", "int64", SHOWN_TOPICS_LEN),
    # sum of the content embeddings of the posts the user liked (trailing window)
    RawColumn("u_liked_content", "user", "float32", CONTENT_DIM),
    # the user's history with this post's topic (trailing window)
    RawColumn("ut_imps", "user_topic", "float32"),
    RawColumn("ut_likes", "user_topic", "float32"),
    # post aggregates over all days before the impression's day
    RawColumn("p_imps", "post", "float32"),
    RawColumn("p_likes", "post", "float32"),
    RawColumn("p_comments", "post", "float32"),
    RawColumn("p_shares", "post", "float32"),
    RawColumn("p_hides", "post", "float32"),
    RawColumn("p_dwell", "post", "float32"),
    RawColumn("p_age_days", "post", "float32"),
    RawColumn("content_emb", "post", "float32", CONTENT_DIM),
    # creator aggregates (trailing window) and follower count
    RawColumn("c_imps", "creator", "float32"),
    RawColumn("c_likes", "creator", "float32"),
    RawColumn("c_hides", "creator", "float32"),
    RawColumn("c_followers", "creator", "float32"),
    # context: feed position (0 = top). Serving scores every candidate as if at the top.
    RawColumn("position", "context", "float32"),
)

DENSE_FEATURES: tuple[DenseFeature, ...] = (
    DenseFeature("u_imps_log", "log1p", ("u_imps",), _RU),
    DenseFeature("u_like_rate", "rate", ("u_likes", "u_imps"), _RU),
    DenseFeature("u_comment_rate", "rate", ("u_comments", "u_imps"), _RU),
    DenseFeature("u_share_rate", "rate", ("u_shares", "u_imps"), _RU),
    DenseFeature("u_hide_rate", "rate", ("u_hides", "u_imps"), _RU),
    DenseFeature("u_dwell_mean", "mean", ("u_dwell", "u_imps"), _RU),
    # The user's taste in content space: the mean content of their liked posts, shrunk to 0 by
    # one pseudo-like. The world's posts carry their latent taste in the content embedding.
    DenseFeature(
        "u_liked_content", "vector_mean", ("u_liked_content", "u_likes"), _RU, dim=CONTENT_DIM
    ),
    DenseFeature("ut_imps_log", "log1p", ("ut_imps",), _R),
    DenseFeature("ut_like_rate", "rate", ("ut_likes", "ut_imps"), _R),
    DenseFeature("p_imps_log", "log1p", ("p_imps",), _R),
    DenseFeature("p_like_rate", "rate", ("p_likes", "p_imps"), _R),
    DenseFeature("p_comment_rate", "rate", ("p_comments", "p_imps"), _R),
    DenseFeature("p_share_rate", "rate", ("p_shares", "p_imps"), _R),
    DenseFeature("p_hide_rate", "rate", ("p_hides", "p_imps"), _R),
    DenseFeature("p_dwell_mean", "mean", ("p_dwell", "p_imps"), _R),
    # Age is the one time-varying input of the item tower: without it retrieval cannot prefer
    # fresh posts (the index is rebuilt per serving day, at INDEX_TIME_OF_DAY).
    DenseFeature("p_age_log", "age_log", ("p_age_days",), _RI),
    DenseFeature("p_freshness", "age_decay", ("p_age_days",), _RI),
    DenseFeature("c_imps_log", "log1p", ("c_imps",), _R),
    DenseFeature("c_like_rate", "rate", ("c_likes", "c_imps"), _R),
    DenseFeature("c_hide_rate", "rate", ("c_hides", "c_imps"), _R),
    DenseFeature("c_followers_log", "log1p", ("c_followers",), _R),
    DenseFeature("position_log", "log1p", ("position",), _R),
    DenseFeature("content_emb", "identity", ("content_emb",), _RI, dim=CONTENT_DIM),
)


def sparse_features(part: ModelPart) -> tuple[SparseFeature, ...]:
    """Sparse features of ``part`` in registry order (= KeyedJaggedTensor key order)."""
    return tuple(f for f in SPARSE_FEATURES if part in f.parts)


def dense_features(part: ModelPart) -> tuple[DenseFeature, ...]:
    """Dense features of ``part`` in registry order (= column order of the dense tensor)."""
    return tuple(f for f in DENSE_FEATURES if part in f.parts)


def dense_dim(part: ModelPart) -> int:
    """Width of ``part``'s dense input tensor."""
    return sum(f.dim for f in dense_features(part))


def tables_for(part: ModelPart) -> dict[TableSpec, tuple[SparseFeature, ...]]:
    """Tables used by ``part`` mapped to the features that look them up."""
    by_name = {t.name: t for t in TABLES}
    out: dict[TableSpec, tuple[SparseFeature, ...]] = {}
    for f in sparse_features(part):
        table = by_name[f.table]
        out[table] = (*out.get(table, ()), f)
    return out


def example_arrow_schema() -> pa.Schema:
    """Schema of a preprocessed example: raw columns, labels, day and timestamp."""
    fields = [pa.field(c.name, c.arrow_type(), nullable=False) for c in RAW_COLUMNS]
    fields += [pa.field(label, pa.float32(), nullable=False) for label in LABELS]
    fields += [
        pa.field("impression_id", pa.int64(), nullable=False),
        pa.field("day", pa.int64(), nullable=False),
        pa.field("ts", pa.float64(), nullable=False),
        pa.field("propensity", pa.float32(), nullable=False),
    ]
    return pa.schema(fields)


def _check_registry() -> None:
    raw = {c.name for c in RAW_COLUMNS}
    tables = {t.name for t in TABLES}
    names = [f.name for f in SPARSE_FEATURES] + [f.name for f in DENSE_FEATURES]
    if len(names) != len(set(names)):
        raise ValueError("feature names must be unique")
    for s in SPARSE_FEATURES:
        if s.table not in tables or s.name not in raw:
            raise ValueError(f"sparse feature {s.name}: unknown table or raw column")
    for d in DENSE_FEATURES:
        missing = set(d.inputs) - raw
        if missing:
            raise ValueError(f"dense feature {d.name}: unknown raw inputs {sorted(missing)}")


_check_registry()
