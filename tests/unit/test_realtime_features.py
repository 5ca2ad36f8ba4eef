"""Real-time features: one definition, the same values offline and streamed; bounded state;
the serving signals count only events about served slots and shape candidates and scores."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from feedrec.events.event_log import EventLog
from feedrec.events.feed_event import ATTRIBUTION_WINDOW_S
from feedrec.features.realtime_features import (
    FEATURES_BY_NAME,
    KEY_COLUMNS,
    REALTIME_FEATURES,
    DecayedCount,
    RealtimeState,
    offline_values,
)
from feedrec.serving.realtime_signals import (
    REPLAY_S,
    SNAPSHOT_NAME,
    RealtimeSignals,
    SnapshotError,
)
from feedrec.serving.rerank import Candidates, RerankConfig, final_scores


def _stream(rng: np.random.Generator, n: int = 3000) -> dict[str, np.ndarray]:
    """Random events over 3 hours: 30 users, 50 posts, 5 topics, 2 segments, mixed types."""
    posts = rng.integers(0, 50, n)
    users = rng.integers(0, 30, n)
    return {
        "ts": np.sort(rng.uniform(0, 3 * 3600, n)),
        "type": rng.choice(["impression", "view", "like", "comment", "share", "hide"], n),
        "user_id": users,
        "post_id": posts,
        "topic": posts % 5,
        "user_segment": users % 2,
    }


def test_streamed_values_equal_the_offline_point_in_time_values() -> None:
    """Replay the stream; at 200 random moments every feature of random keys equals what
    ``offline_values`` computes from the whole table with only earlier events."""
    rng = np.random.default_rng(0)
    events = _stream(rng)
    queries = np.sort(rng.uniform(0, 3 * 3600, 200))
    state = RealtimeState()
    i = 0
    checked = 0
    for t in queries:
        while i < len(events["ts"]) and events["ts"][i] < t:
            entity = {c: int(events[c][i]) for c in ("user_id", "post_id", "topic", "user_segment")}
            state.apply(str(events["type"][i]), entity, float(events["ts"][i]))
            i += 1
        for feature in REALTIME_FEATURES:
            keys = {
                "user_id": rng.integers(0, 30, 3),
                "post_id": rng.integers(0, 50, 3),
                "topic": rng.integers(0, 5, 3),
                "user_segment": rng.integers(0, 2, 3),
            }
            offline = offline_values(feature, events, keys, np.full(3, t))
            cols = KEY_COLUMNS
            online = [
                state.value(feature.name, tuple(int(keys[c][j]) for c in cols[feature.key]), t)
                for j in range(3)
            ]
            assert online == pytest.approx(offline, rel=1e-9, abs=1e-12), feature.name
            checked += int(np.count_nonzero(offline))
    assert checked > 500  # most checks compare non-zero values, not two zeros


def test_decay_halves_per_half_life_and_only_earlier_events_count() -> None:
    f = DecayedCount("x", "post", ("like",), half_life_s=60.0)
    events = {
        "ts": np.array([0.0, 60.0]),
        "type": np.array(["like", "like"]),
        "post_id": np.array([7, 7]),
    }
    at = offline_values(
        f, events, {"post_id": np.array([7, 7, 7, 8])}, np.array([60.0, 60.1, 120.0, 120.0])
    )
    assert at[0] == pytest.approx(0.5)  # the event at t itself does not count
    assert at[2] == pytest.approx(0.25 + 0.5)  # ages 120 s and 60 s
    assert at[3] == 0.0
    with pytest.raises(ValueError, match="half_life_s"):
        DecayedCount("bad", "post", ("like",), half_life_s=0.0)
    with pytest.raises(ValueError, match="key"):
        DecayedCount("bad", "planet", ("like",), half_life_s=1.0)


def test_values_in_one_pass_equal_value_per_key() -> None:
    state = RealtimeState([FEATURES_BY_NAME["post_engagement_velocity"]])
    rng = np.random.default_rng(0)
    times, posts = np.sort(rng.uniform(0, 7200, 500)), rng.integers(0, 50, 500)
    for ts, post in zip(times, posts, strict=True):
        state.apply("like", {"post_id": int(post)}, float(ts))
    keys = [(p,) for p in range(60)]  # 50 may have events, 10 never do
    now = 7300.0
    one_pass = state.values("post_engagement_velocity", keys, now)
    per_key = [state.value("post_engagement_velocity", k, now) for k in keys]
    assert one_pass.shape == (60,) and one_pass.tolist() == per_key
    assert (one_pass[50:] == 0).all() and (one_pass[:50] > 0).any()
    assert state.values("post_engagement_velocity", [], now).shape == (0,)


def test_state_memory_is_bounded_by_dropping_the_weakest_keys() -> None:
    state = RealtimeState([FEATURES_BY_NAME["post_engagement_velocity"]], max_keys=1000)
    entity = {"user_id": 0, "topic": 0, "user_segment": 0}
    for post in range(5000):  # 5000 posts liked once, one second apart
        state.apply("like", {**entity, "post_id": post}, float(post))
    assert state.keys("post_engagement_velocity") <= 1000
    assert state.evicted >= 4000
    now = 5000.0
    assert state.value("post_engagement_velocity", (4999,), now) > 0.99  # recent: kept
    assert state.value("post_engagement_velocity", (0,), now) == 0.0  # oldest: dropped


def _served(rid: str, user: int, posts: list[int]) -> dict:
    return {
        "kind": "served",
        "request_id": rid,
        "user_id": user,
        "variant": "control",
        "items": [{"post_id": p} for p in posts],
    }


def _event(rid: str, kind: str, position: int, post: int, user: int, at: float) -> dict:
    return {
        "kind": "event",
        "type": kind,
        "request_id": rid,
        "position": position,
        "post_id": post,
        "user_id": user,
        "variant": "control",
        "received_at": at,
    }


def test_signals_count_only_events_about_served_slots() -> None:
    topic = np.arange(20) % 4  # post p has topic p % 4
    signals = RealtimeSignals(topic, np.zeros(10, np.int64))
    signals.apply(_served("a" * 32, 3, [1, 5, 9, 2]))  # topics 1, 1, 1, 2
    now = 1000.0
    for position, post in enumerate([1, 5, 9]):
        signals.apply(_event("a" * 32, "like", position, post, 3, now))
    signals.apply(_event("a" * 32, "like", 3, 7, 3, now))  # not the post served there
    signals.apply(_event("b" * 32, "like", 0, 3, 3, now))  # a feed never served
    signals.apply(_event("a" * 32, "like", 0, 1, 4, now))  # not the viewer
    assert (signals.applied, signals.ignored) == (3, 3)
    assert signals.hot_topics(3, now=now) == [1]
    share = signals.topic_share(3, np.array([1, 2, 3]), now=now)
    assert share == pytest.approx([3 / 4, 0.0, 0.0])  # 3 engagements, +1 smoothing
    assert signals.engaged_posts(3) == {1, 5, 9}
    assert signals.velocity(np.array([5, 2]), now=now) == pytest.approx([1.0, 0.0])
    assert signals.hot_topics(3, now=now + 3 * 3600) == []  # decayed: no longer hot


def test_interest_boosts_only_positive_values() -> None:
    c = Candidates(
        post_ids=np.arange(3),
        predictions=np.array([[0.1, 0, 0, 0, 0], [0.1, 0, 0, 0, 0], [0.0, 0, 0, 0.5, 0]]),
        creators=np.arange(3),
        topics=np.arange(3),
        ages_days=np.full(3, 100.0),  # no freshness bonus left
        small_creator=np.zeros(3, bool),
        interest=np.array([0.0, 0.5, 0.5]),
    )
    cfg = RerankConfig(weights={"like": 1.0, "hide": -1.0}, interest_weight=2.0)
    final, _ = final_scores(c, cfg)
    assert final[1] == pytest.approx(2.0 * final[0])  # 1 + 2 * 0.5
    assert final[2] == pytest.approx(-0.5)  # a negative value is not made better
    with pytest.raises(ValueError, match="interest_weight"):
        RerankConfig(interest_weight=-1.0)


def test_a_starting_follower_replays_only_the_recent_bus(tmp_path: Path) -> None:
    # Old traffic (served + liked 10 h ago) in its own segments, then the last hour's.
    topic = np.arange(20) % 4
    log = EventLog(tmp_path / "bus", segment_bytes=1024)
    now = time.time()
    old, recent = now - 10 * 3600, now - 600
    for i in range(20):  # ~5 records a segment
        log.append([{**_served(f"{i:032x}", 3, [1]), "received_at": old}])
        log.append([_event(f"{i:032x}", "like", 0, 1, 3, old)])
    log.append([{**_served("f" * 32, 3, [6]), "received_at": recent}])
    log.append([_event("f" * 32, "like", 0, 6, 3, recent)])
    stop = threading.Event()
    signals = RealtimeSignals(topic, np.zeros(10, np.int64))
    signals.follow(log, stop=stop)  # replays REPLAY_S = 8 h
    stop.set()
    # The recent like counts; of the 20 old ones only those in the segment where the last
    # 8 h begin (1 KiB: 3 records of each kind at most) were read at all.
    assert 6 in signals.engaged_posts(3)
    assert 1 <= signals.applied <= 1 + 3
    assert REPLAY_S == 8 * 3600.0  # eight half-lives of the slowest feature (1 h)
    everything = RealtimeSignals(topic, np.zeros(10, np.int64))
    everything.follow(log, stop=stop, replay_s=24 * 3600)
    assert everything.applied == 21 and everything.engaged_posts(3) == {1, 6}
    with pytest.raises(ValueError, match="replay_s"):
        RealtimeSignals(topic, np.zeros(10, np.int64)).follow(log, stop=stop, replay_s=0)


def _traffic(n_feeds: int, start: float, seed: int = 0) -> list[dict]:
    """Served feeds (5 slots) and events about them, in bus order over ~3 h: engagements
    and hides on served slots, some on slots never served, some after the window closed."""
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    feeds: list[tuple[str, int, list[int], float]] = []
    t = start
    for i in range(n_feeds):
        t += float(rng.uniform(0, 20))
        rid, user = f"{seed:08x}{i:024x}", int(rng.integers(0, 30))
        posts = rng.choice(50, 5, replace=False).tolist()
        out.append({**_served(rid, user, posts), "received_at": t})
        feeds.append((rid, user, posts, t))
        for _ in range(int(rng.integers(0, 4))):
            rid_e, user_e, posts_e, _ = feeds[int(rng.integers(max(0, i - 150), i + 1))]
            slot = int(rng.integers(0, 5))
            kind = str(rng.choice(["impression", "like", "comment", "share", "hide"]))
            post = posts_e[slot] if rng.random() > 0.1 else 49 - posts_e[slot]
            out.append(_event(rid_e, kind, slot, post, user_e, t + float(rng.uniform(0, 5))))
    return out


def _same_signals(a: RealtimeSignals, b: RealtimeSignals, now: float) -> None:
    assert (a.applied, a.ignored, a.watermark) == (b.applied, b.ignored, b.watermark)
    assert a._served == b._served
    for user in range(30):
        assert a.engaged_posts(user) == b.engaged_posts(user)
        assert a.hot_topics(user, now=now) == b.hot_topics(user, now=now)
        topics = np.arange(5)
        assert (
            a.topic_share(user, topics, now=now).tolist()
            == b.topic_share(user, topics, now=now).tolist()
        )
    assert a.velocity(np.arange(50), now=now).tolist() == b.velocity(np.arange(50), now).tolist()
    for name, columns in a.state.to_arrays().items():
        other = b.state.to_arrays()[name]
        for part, values in columns.items():
            assert values.tolist() == other[part].tolist(), (name, part)


def test_a_restored_snapshot_then_the_rest_equals_applying_everything() -> None:
    topic, segment = np.arange(50) % 5, np.zeros(30, np.int64)
    records = _traffic(600, start=1e6)
    everything = RealtimeSignals(topic, segment)
    for record in records:
        everything.apply(record)
    assert everything.applied > 100 and everything.ignored > 10

    half = len(records) // 2
    first = RealtimeSignals(topic, segment)
    for record in records[:half]:
        first.apply(record)
    first.next_seq = half
    data = first.snapshot()
    resumed = RealtimeSignals(topic, segment)
    resumed.restore(data)
    assert resumed.next_seq == half
    _same_signals(first, resumed, now=records[half - 1]["received_at"])
    for record in records[half:]:
        resumed.apply(record)
    _same_signals(everything, resumed, now=records[-1]["received_at"] + 60)


def test_an_event_counts_only_within_its_feeds_attribution_window() -> None:
    signals = RealtimeSignals(np.arange(20) % 4, np.zeros(10, np.int64))
    t = 1e6
    signals.apply({**_served("a" * 32, 3, [1, 2]), "received_at": t})
    signals.apply(_event("a" * 32, "like", 0, 1, 3, t + ATTRIBUTION_WINDOW_S - 1))
    signals.apply({**_served("b" * 32, 4, [5]), "received_at": t + ATTRIBUTION_WINDOW_S + 1})
    signals.apply(_event("a" * 32, "like", 1, 2, 3, t + ATTRIBUTION_WINDOW_S + 2))  # late
    assert (signals.applied, signals.ignored) == (1, 1)
    assert "a" * 32 not in signals._served and "b" * 32 in signals._served


def test_a_snapshot_that_is_damaged_or_of_other_features_is_refused_unchanged() -> None:
    topic, segment = np.arange(50) % 5, np.zeros(30, np.int64)
    source = RealtimeSignals(topic, segment)
    for record in _traffic(50, start=1e6):
        source.apply(record)
    data = source.snapshot()
    target = RealtimeSignals(topic, segment)
    target.apply({**_served("c" * 32, 1, [7]), "received_at": 5.0})
    for bad in (data[: len(data) // 2], b"not a snapshot"):
        with pytest.raises(SnapshotError, match="damaged"):
            target.restore(bad)
    other = RealtimeSignals(topic, segment)
    other.state = RealtimeState(REALTIME_FEATURES[:2])
    with pytest.raises(SnapshotError, match="other real-time features"):
        target.restore(other.snapshot())
    assert list(target._served) == ["c" * 32] and target.next_seq == 0


def test_a_starting_follower_restores_the_newest_snapshot_and_replays_only_the_rest(
    tmp_path: Path,
) -> None:
    topic, segment = np.arange(50) % 5, np.zeros(30, np.int64)
    records = _traffic(400, start=time.time() - 3600)
    log = EventLog(tmp_path / "bus")
    log.append(records[:300])
    stop = threading.Event()
    try:
        first = RealtimeSignals(topic, segment)
        first.follow(log, poll_s=0.01, stop=stop, snapshot_every=100)
        assert first.restored_from is None and first.next_seq == 300  # nothing to restore
        deadline = time.time() + 10
        while log.snapshot_seq(SNAPSHOT_NAME) != 300 and time.time() < deadline:
            time.sleep(0.01)
        assert log.snapshot_seq(SNAPSHOT_NAME) == 300
        log.append(records[300:])
        second = RealtimeSignals(topic, segment)
        second.follow(log, stop=stop, snapshot_every=0)
        assert second.restored_from == 300 and second.next_seq == len(records)
        assert second.applied - first.applied <= sum(r["kind"] == "event" for r in records[300:])
    finally:
        stop.set()
    everything = RealtimeSignals(topic, segment)
    for record in records:
        everything.apply(record)
    _same_signals(everything, second, now=records[-1]["received_at"] + 1)


def test_a_follower_replays_the_horizon_when_the_snapshot_is_unusable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic, segment = np.arange(50) % 5, np.zeros(30, np.int64)
    records = _traffic(100, start=time.time() - 3600)
    log = EventLog(tmp_path / "bus")
    log.append(records)
    stop = threading.Event()
    stop.set()  # no polling thread work: only the start is checked
    log.save_snapshot(SNAPSHOT_NAME, 10, b"damaged")
    damaged = RealtimeSignals(topic, segment)
    damaged.follow(log, stop=stop)
    assert damaged.restored_from is None and "not restoring the snapshot" in caplog.text
    log.save_snapshot(SNAPSHOT_NAME, len(records) + 5, RealtimeSignals(topic, segment).snapshot())
    beyond = RealtimeSignals(topic, segment)  # a snapshot of a bus deleted and begun again
    beyond.follow(log, stop=stop)
    assert beyond.restored_from is None
    for follower in (damaged, beyond):  # both replayed the whole (1 h old) bus
        assert follower.next_seq == len(records) and follower.applied == damaged.applied
    with pytest.raises(ValueError, match="snapshot_every"):
        RealtimeSignals(topic, segment).follow(log, stop=stop, snapshot_every=-1)
