import math

import numpy as np
import pytest

from feedrec.serving.rerank import (
    Candidates,
    RerankConfig,
    Selection,
    final_scores,
    rerank,
    value_scores,
)

NO_RULES = RerankConfig(freshness_weight=0.0, max_per_creator=100, max_per_topic=4, fair_share=0)


def _cands(
    likes: list[float],
    creators: list[int] | None = None,
    topics: list[int] | None = None,
    ages: list[float] | None = None,
    small: list[bool] | None = None,
) -> Candidates:
    n = len(likes)
    p = np.zeros((n, 5))
    p[:, 0] = likes
    return Candidates(
        post_ids=np.arange(100, 100 + n),
        predictions=p,
        creators=np.array(creators if creators is not None else range(n)),
        topics=np.array(topics if topics is not None else range(n)),
        ages_days=np.array(ages if ages is not None else [9.0] * n),
        small_creator=np.array(small if small is not None else [False] * n),
    )


def _likes(n: int) -> list[float]:
    return [1.0 - 0.05 * i for i in range(n)]


def test_without_rules_it_is_the_value_order() -> None:
    sel = rerank(_cands([0.2, 0.9, 0.5]), 3, NO_RULES)
    assert sel.index.tolist() == [1, 2, 0]
    assert sel.score.tolist() == sorted(sel.score.tolist(), reverse=True)
    assert sel.reasons == [[], [], []] and sel.demoted == {}


def test_at_most_max_per_creator() -> None:
    cfg = RerankConfig(freshness_weight=0, max_per_creator=2, fair_share=0, max_per_topic=4)
    sel = rerank(_cands(_likes(6), creators=[1, 1, 1, 2, 2, 3]), 5, cfg)
    assert sel.index.tolist() == [0, 1, 3, 4, 5]
    assert sel.demoted == {"max_per_creator": 1}  # post 2, left out


def test_topic_window_spreads_a_topic_and_relaxes_only_when_forced() -> None:
    cfg = RerankConfig(
        freshness_weight=0, max_per_creator=9, topic_window=3, max_per_topic=1, fair_share=0
    )
    # Topics A A A B: A can take only every third slot; once only A is left, the rule relaxes.
    sel = rerank(_cands(_likes(4), topics=[0, 0, 0, 1]), 4, cfg)
    assert sel.index.tolist() == [0, 3, 1, 2]
    assert sel.reasons[0] == [] and sel.reasons[1] == []
    assert any("topic window relaxed" in r for r in sel.reasons[2] + sel.reasons[3])
    topics = np.array([0, 0, 0, 1])[sel.index]
    assert topics[0] != topics[1]


def test_fair_share_guarantees_small_creator_slots() -> None:
    cfg = RerankConfig(freshness_weight=0, max_per_creator=9, max_per_topic=4, fair_share=0.25)
    small = [False] * 8 + [True, True]  # the two small creators' posts rank last on value
    sel = rerank(_cands(_likes(10), small=small), 8, cfg)
    picked_small = np.array(small)[sel.index]
    # Every prefix of length L holds at least floor(0.25 * L) small-creator posts.
    for length in range(1, 9):
        assert picked_small[:length].sum() >= int(0.25 * length)
    assert picked_small.sum() == 2
    promoted = [i for i, r in enumerate(sel.reasons) if any("fairness" in x for x in r)]
    assert [sel.index[i] for i in promoted] == [8, 9]
    assert sel.demoted["fair_share"] > 0


def test_fairness_without_small_candidates_just_fills_by_value() -> None:
    cfg = RerankConfig(freshness_weight=0, max_per_creator=9, max_per_topic=4, fair_share=0.5)
    sel = rerank(_cands(_likes(4)), 4, cfg)
    assert sel.index.tolist() == [0, 1, 2, 3]


def test_freshness_boost_reorders_close_scores_and_says_so() -> None:
    cfg = RerankConfig(freshness_weight=0.5, freshness_days=1.0, fair_share=0)
    sel = rerank(_cands([0.50, 0.45], ages=[5.0, 0.0]), 2, cfg)
    assert sel.index.tolist() == [1, 0] and sel.score[0] > sel.score[1]
    assert sel.reasons[0] == ["freshness: x1.50"]


def test_hide_weight_is_negative_and_boost_never_helps_negative_values() -> None:
    c = _cands([0.0, 0.1], ages=[0.0, 9.0])
    c.predictions[0, 3] = 0.5  # likely hidden
    assert value_scores(c.predictions, RerankConfig().weights)[0] < 0
    assert rerank(c, 2, RerankConfig()).index.tolist() == [1, 0]


def test_creator_cap_can_leave_fewer_than_count() -> None:
    cfg = RerankConfig(max_per_creator=1, fair_share=0)
    assert len(rerank(_cands(_likes(3), creators=[7, 7, 7]), 3, cfg).index) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weights": {"likes": 1.0}}, "unknown task"),
        ({"max_per_topic": 5, "topic_window": 4}, "max_per_topic"),
        ({"fair_share": 1.5}, "fair_share"),
        ({"max_per_creator": 0}, "max_per_creator"),
    ],
)
def test_config_rejects_bad_values_naming_them(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RerankConfig(**kwargs)


def test_candidates_with_mismatched_rows_are_refused() -> None:
    c = _cands([0.1, 0.2])
    with pytest.raises(ValueError, match="topics has 1 rows"):
        Candidates(
            c.post_ids, c.predictions, c.creators, c.topics[:1], c.ages_days, c.small_creator
        )


def test_posts_without_a_moved_reason_are_in_score_order() -> None:
    rng = np.random.default_rng(3)
    n = 60
    c = _cands(
        list(rng.random(n)),
        creators=list(rng.integers(0, 15, n)),
        topics=list(rng.integers(0, 4, n)),
        small=list(rng.random(n) < 0.2),
    )
    sel = rerank(c, 30, RerankConfig(freshness_weight=0, fair_share=0.3))
    moved = [any(r.startswith(("fairness", "held back")) for r in why) for why in sel.reasons]
    assert any(moved), "the rules must have moved something in this draw"
    plain = [s for s, m in zip(sel.score, moved, strict=True) if not m]
    assert plain == sorted(plain, reverse=True)


@pytest.mark.parametrize("seed", range(5))
def test_rules_hold_on_random_draws(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    c = _cands(
        list(rng.random(n)),
        creators=list(rng.integers(0, 40, n)),
        topics=list(rng.integers(0, 5, n)),
        small=list(rng.random(n) < 0.3),
    )
    cfg = RerankConfig(freshness_weight=0, topic_window=4, max_per_topic=2, fair_share=0.25)
    sel = rerank(c, 50, cfg)
    assert len(sel.index) == 50 and len(set(sel.index.tolist())) == 50
    _, per_creator = np.unique(c.creators[sel.index], return_counts=True)
    assert per_creator.max() <= cfg.max_per_creator
    topics = c.topics[sel.index]
    for end in range(len(topics)):
        window = topics[max(0, end - 3) : end + 1]
        relaxed = any("relaxed" in r for r in sel.reasons[end])
        assert relaxed or (window == topics[end]).sum() <= 2
    small = np.asarray(c.small_creator)[sel.index]
    for length in range(1, 51):
        assert small[:length].sum() >= int(0.25 * length)


def _brute_force(c: Candidates, count: int, cfg: RerankConfig) -> Selection:
    """The module doc's rules, slot by slot over every remaining post: the reference for
    ``rerank``'s per-topic queues."""
    final, boost = final_scores(c, cfg)
    order = np.argsort(-final, kind="stable").tolist()
    creators, topics, small = c.creators.tolist(), c.topics.tolist(), c.small_creator.tolist()
    chosen: list[int] = []
    reasons: list[list[str]] = []
    demoted: dict[int, str] = {}
    while len(chosen) < count:
        # The last topic_window - 1 posts chosen (none with a window of one slot).
        window = [topics[i] for i in chosen[max(0, len(chosen) - cfg.topic_window + 1) :]]
        window = window if cfg.topic_window > 1 else []

        def held(i: int, window: list[int] = window) -> bool:
            return window.count(topics[i]) >= cfg.max_per_topic

        def capped(i: int) -> bool:
            return [creators[j] for j in chosen].count(creators[i]) >= cfg.max_per_creator

        eligible = [i for i in order if i not in chosen and not capped(i)]
        if not eligible:
            break
        overall = next((i for i in eligible if not held(i)), eligible[0])
        smalls = [i for i in eligible if small[i]]
        floor = math.floor(cfg.fair_share * (len(chosen) + 1))
        need_small = bool(smalls) and sum(small[i] for i in chosen) < floor
        pick = next((i for i in smalls if not held(i)), smalls[0]) if need_small else overall
        why = ["fairness: small-creator slot"] if pick != overall else []
        for i in order:  # passed over now: every remaining post above the pick
            if i == pick:
                break
            if i not in chosen and i not in demoted:
                rule = "max_per_creator" if capped(i) else None
                demoted[i] = rule or ("topic_window" if held(i) else "fair_share")
        if pick in demoted:
            why.append(f"held back: {demoted[pick]}")
        if held(pick):
            why.append("diversity: topic window relaxed (no other candidate)")
        if boost[pick] > 1.005:
            why.append(f"freshness: x{boost[pick]:.2f}")
        chosen.append(pick)
        reasons.append(why)
    idx = np.asarray(chosen, dtype=np.int64)
    counts: dict[str, int] = {}
    for rule in demoted.values():
        counts[rule] = counts.get(rule, 0) + 1
    return Selection(idx, final[idx], reasons, counts)


@pytest.mark.parametrize("seed", range(300))
def test_per_topic_queues_pick_what_the_brute_force_scan_picks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    p = rng.random((n, 5)) * [1.0, 1.0, 1.0, 0.1, 10.0]
    c = Candidates(
        post_ids=np.arange(n),
        predictions=p,
        creators=rng.integers(0, int(rng.integers(1, 30)), n),
        topics=rng.integers(0, int(rng.integers(1, 6)), n),
        ages_days=rng.random(n) * 5,
        small_creator=rng.random(n) < rng.random() * 0.5,
    )
    window = int(rng.integers(1, 5))
    cfg = RerankConfig(
        max_per_creator=int(rng.integers(1, 4)),
        topic_window=window,
        max_per_topic=int(rng.integers(1, window + 1)),
        fair_share=float(rng.random() * 0.6),
    )
    count = int(rng.integers(1, 60))
    got, want = rerank(c, count, cfg), _brute_force(c, count, cfg)
    assert got.index.tolist() == want.index.tolist()
    assert np.array_equal(got.score, want.score)
    assert got.reasons == want.reasons
    assert got.demoted == want.demoted
