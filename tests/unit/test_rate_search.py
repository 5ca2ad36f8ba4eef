"""bench/serve.py's max-RPS search: doubling (a p99 miss run twice), then four bisections."""

from __future__ import annotations

from bench.serve import LoadResult, RateSearch


def _result(rps: float, capacity: float) -> LoadResult:
    p99 = 50.0 if rps <= capacity else 500.0
    return LoadResult(rps, rps, 20.0, p99, errors=0, fallbacks=0, requests=int(rps * 10))


def _search(capacity: float) -> RateSearch:
    search = RateSearch("s", "http://x")
    while not search.done:
        search.record(_result(search.next_rate(), capacity))
    return search


def test_doubles_then_bisects_four_times() -> None:
    search = _search(capacity=26.0)
    # 40 misses twice (the repeat confirms it), then bisection steps run once each.
    assert [r.offered_rps for r in search.runs] == [5, 10, 20, 40, 40, 30, 25, 27.5, 26.25]
    assert search.best is not None and search.best.offered_rps == 25


def test_nothing_meets_the_target() -> None:
    search = _search(capacity=1.0)
    assert search.best is None
    assert [r.offered_rps for r in search.runs] == [5, 5, 2.5, 1.25]  # then mid < 1: stop


def test_an_error_is_over_the_target_whatever_the_latency() -> None:
    search = RateSearch("s", "http://x")
    search.record(LoadResult(5, 5, 20.0, 50.0, errors=1, fallbacks=0, requests=50))
    assert search.best is None and search.next_rate() == 2.5


def test_one_slow_doubling_step_does_not_end_the_doubling() -> None:
    search = RateSearch("s", "http://x")
    search.record(_result(5, capacity=50))
    search.record(_result(10, capacity=50))
    search.record(_result(20, capacity=10))  # a blip: p99 over the target at 20
    assert search.next_rate() == 20
    search.record(_result(20, capacity=50))  # the repeat meets it
    assert search.next_rate() == 40 and search.best is not None and search.best.offered_rps == 20
