"""Preprocess with Ray Data: sharded logs -> point-in-time features, vocabularies, splits, examples.

Pipeline (streaming; only per-entity daily sums ever reach the driver, plus the row ids of a
random split):

1. validate ``logs/day=D/*.parquet`` (:mod:`feedrec.data.log_validation`: bad rows, late events
   and duplicate impressions are quarantined with their reason) and read the valid rows,
2. ``map_batches``: partial daily sums per user, user x topic, post and creator,
3. driver: fold the sums into :class:`FeatureTables` (trailing windows over *earlier* days only),
4. ``map_batches``: the point-in-time join (:meth:`FeatureTables.lookup`) + split label,
5. write ``examples/split={train,valid,test}/`` and the retrieval positives ``pairs/``.

Two evaluation protocols (:attr:`PreprocessConfig.split`): ``time`` holds out the last days of the
log; ``random`` cuts each user's interactions at random by ratios (see :func:`random_split`).
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import SaveMode
from ray.data.expressions import Expr, col

from feedrec.data.examples import EXAMPLE_SCHEMA, arrow_from_columns
from feedrec.data.log_validation import LogValidation, validate_logs
from feedrec.features.tables import (
    KIND_STATS,
    DayStats,
    EntityAttributes,
    FeatureSnapshot,
    FeatureTables,
    SparseStats,
    by_day,
)
from feedrec.features.vocabulary import Vocabularies, Vocabulary
from feedrec.schema.registry import LABELS, TABLES
from feedrec.world.generator import load_world_config
from feedrec.world.layout import WorldLayout

SPLITS = ("train", "valid", "test")
#: Engagements that make a (user, post) pair a retrieval positive.
POSITIVE_LABELS = ("like", "comment", "share")
SplitKind = Literal["time", "random"]
SPLIT_KINDS: tuple[SplitKind, ...] = ("time", "random")


@dataclass(frozen=True)
class PreprocessConfig:
    """How to preprocess a world.

    Args:
        world_dir: a generated world or imported logs (``feedrec.data.log_import``).
        out_dir: where outputs go.
        valid_days, test_days: ``time`` split: the last days of the log held out.
        progress: Ray Data progress bars.
        split: the evaluation protocol.

            * ``time`` (default): valid and test are the last days; every feature of every row is
              computed from earlier days only, so nothing of a held-out day reaches training.
            * ``random``: each user's interactions are shuffled with ``seed`` and cut by
              ``ratios`` (:func:`random_split`); vocabularies are fitted on the train rows. The
              features stay point in time with respect to each row's own day, but they aggregate
              every logged interaction of earlier days whatever its split: a test row's features
              include held-out interactions of earlier days (its user's and others'), and
              training rows may be later than test rows. Retrieval evaluation takes each user's
              state at the end of the log (the serving day). Numbers from the two protocols are
              not comparable.
        ratios: ``random`` split: train:valid:test shares (each > 0).
        seed: ``random`` split: shuffling seed.
        join_memory_mb: how much of the per-day statistics the join keeps in the object store
            at once; the logged days are joined in groups that fit (:func:`write_examples`);
            0 joins one day per pass. 512, not 1024: on ``large_tables`` 1 GiB groups took the
            24 GiB machine to 22.5 GB used and Ray's memory monitor killed three join tasks
            (retried); 512 peaked at 20.0 GB with no kill, for 7 % more join time.
    """

    world_dir: Path
    out_dir: Path
    valid_days: int = 1
    test_days: int = 1
    progress: bool = True
    split: SplitKind = "time"
    ratios: tuple[float, float, float] = (8.0, 1.0, 1.0)
    seed: int = 0
    join_memory_mb: int = 512

    def __post_init__(self) -> None:
        if self.valid_days < 1 or self.test_days < 1:
            raise ValueError("preprocess config: valid_days and test_days must be >= 1")
        if self.split not in SPLIT_KINDS:
            raise ValueError(f"preprocess config: split must be one of {SPLIT_KINDS}")
        if len(self.ratios) != 3 or not all(
            np.isfinite(r) and r > 0 for r in np.asarray(self.ratios, dtype=np.float64)
        ):
            raise ValueError(
                "preprocess config: ratios must be three numbers > 0 (train:valid:test)"
            )
        if self.seed < 0:
            raise ValueError("preprocess config: seed must be >= 0")
        if self.join_memory_mb < 0:
            raise ValueError("preprocess config: join_memory_mb must be >= 0")


@dataclass(frozen=True)
class PreprocessLayout:
    """Outputs of the preprocess job."""

    root: Path

    @property
    def tables(self) -> Path:
        return self.root / "feature_tables.npz"

    @property
    def vocabularies(self) -> Path:
        return self.root / "vocabularies.npz"

    def is_current(self) -> bool:
        """Whether this output exists and its feature tables and examples are of the layout this
        code reads (an output of older code must be preprocessed again before it is used)."""
        if not self.meta.is_file() or not self.tables.is_file():
            return False
        try:
            FeatureTables.load_attributes(self.tables)
        except ValueError:
            return False
        # One file's footer: the examples hold every raw column the registry declares now.
        first = next(self.examples("train").rglob("*.parquet"), None)
        return first is not None and pq.read_schema(first).names == EXAMPLE_SCHEMA.names

    def examples(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.root / "examples" / f"split={split}"

    @property
    def seen(self) -> Path:
        return self.root / "seen_pairs.npy"

    @property
    def hidden(self) -> Path:
        return self.root / "hidden_creator_pairs.npy"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    def read_meta(self) -> dict[str, Any]:
        return dict(json.loads(self.meta.read_text()))


def is_positive() -> Expr:
    """Row predicate: the impression led to an engagement that makes it a retrieval positive."""
    return functools.reduce(operator.or_, [col(label) > 0 for label in POSITIVE_LABELS])


def read_logs(validation: LogValidation) -> ray.data.Dataset:
    """The validated impression logs as a Ray Dataset (``day`` from the hive partition ``day=D``
    of each file's directory): the clean files of the counted days and the cleaned copies of
    the others (:func:`~feedrec.data.log_validation.validate_logs`). Later partitions are days
    still open: the event sink writes live traffic of the serving day there, and they join the
    logs once ``world.json`` counts them."""
    if not validation.files:
        raise ValueError("preprocess: no valid log rows (see the validation summary)")
    partitioning = ray.data.datasource.Partitioning(
        ray.data.datasource.PartitionStyle.HIVE, field_types={"day": int}
    )
    # Ray Data (2.60, datasource v2) bin-packs the files' row groups into read units of
    # RAY_DATA_PARQUET_BIN_PACKING_BYTES (128 MiB by default) and ignores override_num_blocks
    # for Parquet: logs smaller than that are read, with the transforms fused into the read,
    # by one task. Lower it to spread small logs over more tasks and nodes.
    return ray.data.read_parquet(validation.files, partitioning=partitioning)


def load_entity_attributes(world: WorldLayout) -> EntityAttributes:
    users = pq.read_table(world.users).to_pydict()
    posts = pq.read_table(world.posts)
    creators = pq.read_table(world.creators)
    content = posts.column("content_emb").combine_chunks()
    dim = content.type.list_size
    return EntityAttributes(
        user_segment=np.asarray(users["user_segment"], dtype=np.int64),
        post_creator=posts.column("creator_id").to_numpy(),
        post_topic=posts.column("topic").to_numpy(),
        post_media=posts.column("media_type").to_numpy(),
        post_created_at=posts.column("created_at").to_numpy(),
        post_content=content.flatten().to_numpy().reshape(-1, dim).astype(np.float32),
        creator_followers=creators.column("followers").to_numpy().astype(np.float32),
    )


#: Which log column each aggregated statistic sums ("imps" counts rows).
_STAT_SOURCE = {
    "imps": None,
    "likes": "like",
    "comments": "comment",
    "shares": "share",
    "hides": "hide",
    "dwell": "dwell",
}
#: Pending partial-sum rows (all kinds) that trigger a merge into the running sums, at least;
#: merges also wait for half the running sums' size, so their total cost stays linear.
_MERGE_ROWS = 4_000_000


def batch_sums(
    batch: dict[str, np.ndarray], key: np.ndarray, stats: tuple[str, ...]
) -> SparseStats:
    """Sums of ``stats`` over the batch's rows per ``key`` [N] (float64 values)."""
    n = len(key)
    columns = []
    for stat in stats:
        source = _STAT_SOURCE[stat]
        columns.append(np.ones(n) if source is None else np.asarray(batch[source], np.float64))
    return SparseStats.sum_of(key, np.stack(columns, axis=1), dtype=np.float64)


class DailySums:
    """Per-day sums from the logs, sparse, folded batch by batch on the driver.

    Keys are ``day * n + entity`` with ``n`` the kind's number of entities (user_topic:
    ``user_id * n_topics + topic`` of ``n_users * n_topics``). Partial sums of each batch wait
    in a list and are merged into the running sums once they have ``_MERGE_ROWS`` rows and at
    least half as many as the running sums: memory stays within about 1.5x the final sums.
    """

    def __init__(self, attrs: EntityAttributes, n_days: int, n_topics: int) -> None:
        self.attrs, self.n_days, self.n_topics = attrs, n_days, n_topics
        self.size = {
            "user": attrs.n_users,
            "user_topic": attrs.n_users * n_topics,
            "user_content": attrs.n_users,
            "post": attrs.n_posts,
            "creator": attrs.n_creators,
        }
        # How one batch's partial sums of each kind are made: label sums of every row, except
        # the content of liked posts, which sums embeddings over the liked rows only.
        self._part = {kind: self._label_sums for kind in KIND_STATS}
        self._part["user_content"] = self._liked_content
        self._sums = {k: SparseStats.empty(len(s)) for k, s in KIND_STATS.items()}
        self._pending: dict[str, list[SparseStats]] = {k: [] for k in KIND_STATS}
        self._pending_rows = 0
        self._seen: list[np.ndarray] = []
        self._hidden: list[np.ndarray] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Fold log rows (``day``, ids, labels, plus their post's ``topic`` and
        ``creator_id``) in."""
        day = np.asarray(batch["day"], np.int64)
        users = np.asarray(batch["user_id"], np.int64)
        entity = {
            "user": users,
            "user_topic": users * self.n_topics + np.asarray(batch["topic"], np.int64),
            "post": np.asarray(batch["post_id"], np.int64),
            "creator": np.asarray(batch["creator_id"], np.int64),
        }
        for kind in KIND_STATS:
            part = self._part[kind](kind, batch, day, entity)
            self._pending[kind].append(part)
            self._pending_rows += len(part.keys)
        merged = sum(len(s.keys) for s in self._sums.values())
        if self._pending_rows > max(_MERGE_ROWS, merged // 2):
            self._merge()
        hid = batch["hide"] > 0
        self._seen.append(np.unique(users * self.attrs.n_posts + entity["post"]))
        self._hidden.append(np.unique(users[hid] * self.attrs.n_creators + entity["creator"][hid]))

    def _label_sums(
        self,
        kind: str,
        batch: dict[str, np.ndarray],
        day: np.ndarray,
        entity: dict[str, np.ndarray],
    ) -> SparseStats:
        """Sums of the kind's label statistics over every row, per (day, entity)."""
        return batch_sums(batch, day * self.size[kind] + entity[kind], KIND_STATS[kind])

    def _liked_content(
        self,
        kind: str,
        batch: dict[str, np.ndarray],
        day: np.ndarray,
        entity: dict[str, np.ndarray],
    ) -> SparseStats:
        """Sums of the liked posts' content embeddings per (day, user): rows with a like only."""
        liked = np.flatnonzero(np.asarray(batch["like"]) > 0)
        content = self.attrs.post_content[entity["post"][liked]]
        keys = day[liked] * self.size[kind] + entity["user"][liked]
        return SparseStats.sum_of(keys, content, dtype=np.float64)

    def _merge(self) -> None:
        for kind, parts in self._pending.items():
            if parts:
                parts.insert(0, self._sums[kind])
                self._sums[kind] = SparseStats.sum_of(
                    np.concatenate([p.keys for p in parts]),
                    np.concatenate([p.values for p in parts]),
                    dtype=np.float64,
                )
                parts.clear()
        self._pending_rows = 0

    def tables(self) -> FeatureTables:
        """The point-in-time tables of the sums so far."""
        self._merge()
        daily = {}
        for kind, sums in self._sums.items():
            n = self.size[kind]
            cuts = np.searchsorted(sums.keys, np.arange(self.n_days + 1) * n)
            daily[kind] = tuple(
                SparseStats(sums.keys[a:b] - d * n, sums.values[a:b].astype(np.float32))
                for d, (a, b) in enumerate(itertools.pairwise(cuts))
            )
        return FeatureTables(self.attrs, self.n_topics, daily)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(seen, hidden): int64 sorted unique ``user_id * n_posts + post_id`` of logged
        impressions and ``user_id * n_creators + creator_id`` where the user hid a post of
        theirs (serving filters both out)."""
        seen = np.unique(np.concatenate(self._seen)) if self._seen else np.zeros(0, np.int64)
        hidden = np.unique(np.concatenate(self._hidden)) if self._hidden else np.zeros(0, np.int64)
        self._seen, self._hidden = [seen], [hidden]
        return seen, hidden


def daily_sums(
    logs: ray.data.Dataset, attrs: EntityAttributes, n_days: int, n_topics: int
) -> DailySums:
    """Partial sums in Ray Data ``map_batches``, folded on the driver batch by batch.

    Also collects the (user, post) pairs already shown and the (user, creator) pairs with a
    hide, which serving filters out.
    """
    post_topic, post_creator = ray.put(attrs.post_topic), ray.put(attrs.post_creator)
    needed = ("user_id", "post_id", "day", *LABELS)

    def with_entities(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: batch[k] for k in needed}
        out["topic"] = ray.get(post_topic)[batch["post_id"]]
        out["creator_id"] = ray.get(post_creator)[batch["post_id"]]
        return out

    # Each batch is folded as it arrives: the driver never holds more than one batch of logs.
    sums = DailySums(attrs, n_days, n_topics)
    stream = logs.select_columns(list(needed)).map_batches(with_entities, batch_format="numpy")
    for b in stream.iter_batches(batch_size=65536, batch_format="numpy"):
        sums.add(b)
    return sums


def fit_vocabularies(tables: FeatureTables, train_days: int) -> Vocabularies:
    """Vocabularies of the entities seen in the training days only."""
    users = np.concatenate([tables.daily["user"][d].keys for d in range(train_days)])
    posts = np.concatenate([tables.daily["post"][d].keys for d in range(train_days)])
    return vocabularies_of(users, posts, tables.attrs)


def vocabularies_of(users: np.ndarray, posts: np.ndarray, attrs: EntityAttributes) -> Vocabularies:
    """Vocabularies of the given training users and posts (int64 raw ids, any order); the
    creators, topics and media types are those of the posts."""
    users, posts = np.unique(users), np.unique(posts)
    vocabs = {
        "user_id": Vocabulary.fit(users),
        "user_segment": Vocabulary.fit(attrs.user_segment[users]),
        "post_id": Vocabulary.fit(posts),
        "creator_id": Vocabulary.fit(attrs.post_creator[posts]),
        "topic": Vocabulary.fit(attrs.post_topic[posts]),
        "media_type": Vocabulary.fit(attrs.post_media[posts]),
    }
    return Vocabularies({t.vocab: vocabs[t.vocab] for t in TABLES})


@dataclass(frozen=True)
class RandomSplit:
    """A per-user random split of logged rows.

    Shapes [N]: impression_id (sorted, unique), split (int8 index into :data:`SPLITS`).
    """

    impression_id: np.ndarray
    split: np.ndarray

    def __post_init__(self) -> None:
        if self.impression_id.shape != self.split.shape:
            raise ValueError("random split: impression_id and split must have the same shape")

    def of(self, impression_id: np.ndarray) -> np.ndarray:
        """Split names (str [M]) of rows; every id must be one of the split's rows."""
        pos = np.searchsorted(self.impression_id, impression_id)
        pos = np.minimum(pos, max(len(self.impression_id) - 1, 0))
        if len(impression_id) and not np.array_equal(self.impression_id[pos], impression_id):
            raise ValueError("random split: unknown impression_id")
        return np.asarray(SPLITS)[self.split[pos]]


def random_split(
    impression_id: np.ndarray,
    user_id: np.ndarray,
    ratios: tuple[float, float, float],
    seed: int,
) -> RandomSplit:
    """Per-user random ratio split.

    Each user's rows are put in a random order (``seed``) and cut at ``round(n * cumulative
    share)`` (halves round up): a user with n rows gets round(n * r_train / sum) train rows, then
    valid rows up to round(n * (r_train + r_valid) / sum), the rest test. With 8:1:1, 10 rows give
    8/1/1, 5 rows 4/1/0 and a single row goes to train. The result depends only on the rows (as
    a set), the ratios and the seed, not on the order the rows arrive in.

    Args:
        impression_id: int64 [N] unique row ids.
        user_id: int64 [N] the user of each row.
    """
    impression_id = np.asarray(impression_id, dtype=np.int64)
    order = np.argsort(impression_id, kind="stable")
    ids, users = impression_id[order], np.asarray(user_id, dtype=np.int64)[order]
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        raise ValueError("random split: impression ids must be unique")
    key = np.random.default_rng(seed).random(len(ids))
    by_user = np.lexsort((key, users))
    sorted_users = users[by_user]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(ids)])
    rank = np.arange(len(ids)) - np.repeat(starts, counts)
    n = np.repeat(counts, counts).astype(np.float64)
    cum = np.cumsum(np.asarray(ratios, dtype=np.float64))
    cum /= cum[-1]
    train_end, valid_end = np.floor(n * cum[0] + 0.5), np.floor(n * cum[1] + 0.5)
    code = np.where(rank < train_end, 0, np.where(rank < valid_end, 1, 2)).astype(np.int8)
    split = np.empty(len(ids), dtype=np.int8)
    split[by_user] = code
    return RandomSplit(ids, split)


def logged_rows(logs: ray.data.Dataset) -> dict[str, np.ndarray]:
    """impression_id, user_id, post_id of every logged row (int64 [N] each), on the driver."""
    names = ("impression_id", "user_id", "post_id")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for b in logs.select_columns(list(names)).iter_batches(batch_size=65536, batch_format="numpy"):
        for k in names:
            parts[k].append(np.asarray(b[k], dtype=np.int64))
    return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}


def split_of(day: np.ndarray, n_days: int, valid_days: int, test_days: int) -> np.ndarray:
    """Time-based split label per row: the last days are test, the ones before valid."""
    test_start = n_days - test_days
    valid_start = test_start - valid_days
    return np.where(day >= test_start, "test", np.where(day >= valid_start, "valid", "train"))


def join_examples(
    batch: dict[str, np.ndarray], tables: FeatureTables | FeatureSnapshot, split: np.ndarray
) -> dict[str, np.ndarray]:
    """Logged impressions -> example columns (raw features as of the impression, labels)."""
    out = tables.lookup(
        batch["user_id"], batch["post_id"], batch["day"], batch["ts"], batch["position"]
    )
    out.update({label: np.asarray(batch[label], np.float32) for label in LABELS})
    for name in ("impression_id", "day", "ts", "propensity"):
        out[name] = batch[name]
    out["split"] = split
    return out


def day_chunks(tables: FeatureTables, days: list[int], budget_bytes: int) -> list[list[int]]:
    """Consecutive groups of ``days`` whose join statistics (each day's :class:`DayStats`
    restricted to that day's users and posts, about the size of its daily sums) fit
    ``budget_bytes`` together; a day larger than the budget is a group of its own."""
    chunks: list[list[int]] = []
    used = budget_bytes + 1
    for d in days:
        # a day's restricted window statistics: about (window + 1) x its own daily sums
        size = sum(p[d].nbytes for p in tables.daily.values()) * 2
        if used + size > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(d)
        used += size
    return chunks


def join_stats(tables: FeatureTables, day: int) -> DayStats:
    """The statistics the join of ``day``'s impressions needs: that day's snapshot restricted
    to the users and posts logged on it."""
    return tables.day_stats(
        day, users=tables.daily["user"][day].keys, posts=tables.daily["post"][day].keys
    )


def write_examples(
    cfg: PreprocessConfig,
    validation: LogValidation,
    tables: FeatureTables,
    assignment: RandomSplit | None,
    out: PreprocessLayout,
) -> None:
    """The point-in-time join of every logged row -> ``examples/split=*/``.

    Days are joined in groups (:func:`day_chunks`, ``cfg.join_memory_mb``): for each group the
    driver builds each day's statistics (:func:`join_stats`), puts them in the object store,
    and one streaming Ray Data pass reads that group's files and joins them. Small logs are one
    group (one pass); large ones keep only a group's statistics in memory at a time.
    """
    n_days = tables.n_days
    attrs_ref = ray.put(tables.attrs)
    assignment_ref = ray.put(assignment)
    schema = EXAMPLE_SCHEMA.append(pa.field("split", pa.string()))
    files_of: dict[int, list[str]] = {}
    for f in validation.files:
        files_of.setdefault(file_day(f), []).append(f)
    chunks = day_chunks(tables, sorted(files_of), cfg.join_memory_mb << 20)
    for i, days in enumerate(chunks):
        stats_refs = {d: ray.put(join_stats(tables, d)) for d in days}

        def to_examples(batch: dict[str, np.ndarray], refs=stats_refs) -> pa.Table:
            by_rows: RandomSplit | None = ray.get(assignment_ref)
            if by_rows is None:
                split = split_of(batch["day"], n_days, cfg.valid_days, cfg.test_days)
            else:
                split = by_rows.of(batch["impression_id"])
            attrs = ray.get(attrs_ref)

            def one_day(joined_day: int, at: np.ndarray) -> dict[str, np.ndarray]:
                snap = FeatureSnapshot(ray.get(refs[joined_day]), attrs)
                return join_examples({k: v[at] for k, v in batch.items()}, snap, split[at])

            joined = by_day(np.asarray(batch["day"], np.int64), one_day)
            return arrow_from_columns(joined, schema)

        files = [f for d in days for f in files_of[d]]
        logs = read_logs(replace(validation, files=files))
        examples = logs.map_batches(to_examples, batch_format="numpy", batch_size=16384)
        examples.write_parquet(
            str(out.root / "examples"),
            partition_cols=["split"],
            mode=SaveMode.OVERWRITE if i == 0 else SaveMode.APPEND,
        )
        del stats_refs


def file_day(path: str) -> int:
    """The day of a log file from its hive partition directory ``day=D``."""
    name = Path(path).parent.name
    if not name.startswith("day="):
        raise ValueError(f"preprocess: {path} is not in a day=D directory")
    return int(name.removeprefix("day="))


def run_preprocess(cfg: PreprocessConfig) -> PreprocessLayout:
    """Run the whole preprocess job (Ray must be initialised). Re-running overwrites outputs."""
    started = time.perf_counter()
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
    world = WorldLayout(Path(cfg.world_dir))
    world_cfg = load_world_config(world)
    out = PreprocessLayout(Path(cfg.out_dir))
    out.root.mkdir(parents=True, exist_ok=True)
    n_days = world_cfg.n_days
    train_days = n_days - cfg.valid_days - cfg.test_days
    if cfg.split == "time" and train_days < 1:
        raise ValueError(f"preprocess: {n_days} days leave no training day")

    attrs = load_entity_attributes(world)
    phases: dict[str, float] = {}
    phase_start = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal phase_start
        now = time.perf_counter()
        phases[name] = round(now - phase_start, 1)
        phase_start = now

    validation = validate_logs(world.logs, n_days, attrs.n_users, attrs.n_posts, out.root)
    phase("validate")
    logs = read_logs(validation)
    sums = daily_sums(logs, attrs, n_days, world_cfg.n_topics)
    tables = sums.tables()
    seen, hidden = sums.pairs()
    del sums
    phase("daily_sums")
    assignment: RandomSplit | None = None
    if cfg.split == "random":
        rows = logged_rows(logs)
        assignment = random_split(rows["impression_id"], rows["user_id"], cfg.ratios, cfg.seed)
        train = assignment.of(rows["impression_id"]) == "train"
        vocabs = vocabularies_of(rows["user_id"][train], rows["post_id"][train], attrs)
        del rows, train
    else:
        vocabs = fit_vocabularies(tables, train_days)
    tables.save(out.tables)
    vocabs.save(out.vocabularies)
    np.save(out.seen, seen)
    np.save(out.hidden, hidden)
    del seen, hidden
    phase("tables_and_vocabularies")
    write_examples(cfg, validation, tables, assignment, out)
    phase("join")
    counts = {s: _count_rows(out.examples(s)) for s in SPLITS}
    empty = [s for s in SPLITS if not counts[s]]
    if empty:
        raise ValueError(
            f"preprocess: split(s) {empty} have no rows ({counts}); "
            + (
                "choose other ratios"
                if cfg.split == "random"
                else "the held-out days have no logs: choose other valid/test days"
            )
        )
    pairs = ray.data.read_parquet(str(out.examples("train"))).filter(expr=is_positive())
    pairs.write_parquet(str(out.pairs), mode=SaveMode.OVERWRITE)
    n_pairs = _count_rows(out.pairs)
    if not n_pairs:
        raise ValueError(
            f"preprocess: no retrieval positives ({'/'.join(POSITIVE_LABELS)} > 0) in the "
            "training split: check the label mapping"
        )

    if cfg.split == "random":
        all_days = list(range(n_days))
        days = {"train_days": all_days, "valid_days": all_days, "test_days": all_days}
        split_info: dict[str, Any] = {
            "kind": "random",
            "ratios": list(cfg.ratios),
            "seed": cfg.seed,
        }
        retrieval_day = n_days
    else:
        days = {
            "train_days": list(range(train_days)),
            "valid_days": list(range(train_days, n_days - cfg.test_days)),
            "test_days": list(range(n_days - cfg.test_days, n_days)),
        }
        split_info = {"kind": "time", "valid_days": cfg.valid_days, "test_days": cfg.test_days}
        retrieval_day = n_days - cfg.test_days
    meta = {
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "world": world_cfg.to_dict(),
        "n_days": n_days,
        **days,
        "split": split_info,
        # the day whose feature snapshot and eligible posts retrieval evaluation uses
        "retrieval_day": retrieval_day,
        "serving_day": n_days,
        "rows": counts,
        "validation": validation.to_dict(),
        "pairs": n_pairs,
        "vocab_rows": vocabs.num_rows(),
        "seconds": round(time.perf_counter() - started, 1),
        "phase_seconds": phases,
    }
    out.meta.write_text(json.dumps(meta, indent=2))
    return out


def _count_rows(path: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(path.rglob("*.parquet")))
