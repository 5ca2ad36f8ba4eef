"""Drift statistics (PSI, KS), thresholds, the drift job on hand-made examples, drifted days."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from feedrec.cli import DRIFT_ALERT_EXIT, main
from feedrec.data.examples import EXAMPLE_SCHEMA, arrow_from_columns
from feedrec.features.vocabulary import Vocabularies, Vocabulary
from feedrec.monitoring.drift import (
    DriftConfig,
    DriftJob,
    DriftResult,
    categorical_psi,
    category_shares,
    compare_samples,
    ks_statistic,
    psi,
    psi_from_shares,
    quantile_edges,
    run_drift,
    sample_examples,
    split_days,
)
from feedrec.schema.registry import RAW_COLUMNS, TABLES
from feedrec.world import PRESETS, WorldLayout, generate_world
from feedrec.world.generator import append_days, load_world_config, truth_for_day

# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_psi_and_ks_are_near_zero_for_one_distribution() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20_000), rng.normal(size=20_000)
    assert psi(a, a) == pytest.approx(0.0, abs=1e-12)
    assert ks_statistic(a, a) == 0.0
    assert psi(a, b) < 0.01
    assert ks_statistic(a, b) < 0.03


def test_psi_and_ks_are_large_for_a_shifted_distribution() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=20_000), rng.normal(1.0, 1.0, size=20_000)
    assert psi(a, b) > 0.5
    assert 0.3 < ks_statistic(a, b) < 0.45  # Phi(0.5) - Phi(-0.5) = 0.383
    # A small shift lands between the usual warn (0.1) and alert (0.2) lines.
    assert 0.1 < psi(a, rng.normal(0.35, 1.0, size=20_000)) < 0.2


def test_psi_of_hand_computed_shares() -> None:
    expected = 0.25 * math.log(2.0) + 0.25 * math.log(1.5)
    assert psi_from_shares(np.array([0.5, 0.5]), np.array([0.25, 0.75])) == pytest.approx(expected)
    # An empty bin counts as eps, not as zero (which would make PSI infinite).
    value = psi_from_shares(np.array([0.5, 0.5]), np.array([0.0, 1.0]), eps=1e-4)
    assert value == pytest.approx((1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(2.0))
    with pytest.raises(ValueError, match="shapes"):
        psi_from_shares(np.ones(2) / 2, np.ones(3) / 3)


def test_psi_and_ks_of_a_hand_computed_sample() -> None:
    reference, recent = np.arange(100.0), np.arange(50.0, 150.0)
    np.testing.assert_allclose(quantile_edges(reference, 4), [24.75, 49.5, 74.25])
    # recent shares per quartile bin of the reference: 0, 0, 25/100 (50..74), 75/100 (75..149)
    eps = 1e-4
    expected = 2 * (eps - 0.25) * math.log(eps / 0.25) + 0.5 * math.log(3.0)
    assert psi(reference, recent, n_bins=4, eps=eps) == pytest.approx(expected)
    assert ks_statistic(reference, recent) == pytest.approx(0.5)


def test_ties_on_a_quantile_edge_stay_in_one_bin() -> None:
    """A count feature that is 0 for most rows: the zeros are one bin, not spread over several."""
    reference = np.r_[np.zeros(700), np.arange(1.0, 301.0)]
    edges = quantile_edges(reference, 10)
    assert edges[0] == 0.0 and len(edges) == 4  # deciles 1..6 are all 0: one edge
    same_shape = np.r_[np.zeros(70), np.arange(1.0, 31.0) * 10]
    assert psi(reference, same_shape) < 0.05
    fewer_zeros = np.r_[np.zeros(400), np.arange(1.0, 601.0) / 2]
    assert psi(reference, fewer_zeros) > 0.2


def test_ks_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a = rng.integers(0, 20, size=3000).astype(float)
    b = rng.integers(2, 25, size=1700).astype(float)
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic)


def test_categorical_psi_top_k_and_other() -> None:
    reference = np.r_[np.zeros(50), np.ones(30), np.full(20, 2)].astype(np.int64)
    recent = np.r_[np.zeros(20), np.ones(30), np.full(20, 2), np.full(30, 3)].astype(np.int64)
    categories, p, q = category_shares(reference, recent, top_k=2)
    assert categories == ["0", "1", "other"]
    np.testing.assert_allclose(p, [0.5, 0.3, 0.2])
    np.testing.assert_allclose(q, [0.2, 0.3, 0.5])  # the unseen 3 joins "other"
    assert categorical_psi(reference, recent, top_k=2) == pytest.approx(0.6 * math.log(2.5))
    assert categorical_psi(reference, reference.copy()) == 0.0
    # A -1 padded list feature: every slot counts, the padding is a category of its own.
    lists = np.array([[1, 2, -1], [1, -1, -1]])
    categories, p, _ = category_shares(lists, lists, top_k=5)
    assert categories == ["-1", "1", "2", "other"]
    np.testing.assert_allclose(p, [0.5, 2 / 6, 1 / 6, 0.0])


# ---------------------------------------------------------------------------------------------
# Thresholds and results
# ---------------------------------------------------------------------------------------------


def test_thresholds_decide_the_status() -> None:
    cfg = DriftConfig()
    assert (cfg.status(0.05), cfg.status(0.1), cfg.status(0.19), cfg.status(0.2)) == (
        "ok",
        "warn",
        "warn",
        "alert",
    )
    assert cfg.status(0.0, ks=0.9) == "ok"  # KS is reported only by default
    assert DriftConfig(ks_alert=0.3).status(0.0, ks=0.3) == "alert"
    assert DriftConfig(psi_warn=0.3, psi_alert=0.5).status(0.4) == "warn"
    for bad in ({"psi_warn": 0.3, "psi_alert": 0.2}, {"ks_alert": 1.5}, {"n_bins": 1}):
        with pytest.raises(ValueError):
            DriftConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="raw id columns"):
        DriftConfig(categorical=("u_imps",))


def test_compare_samples_alerts_on_the_shifted_features_only() -> None:
    rng = np.random.default_rng(3)
    n = 10_000
    reference = {
        "stable": rng.normal(size=n),
        "moved": rng.normal(size=n),
        "slightly": rng.normal(size=n),
        "topic": rng.integers(0, 4, size=n),
    }
    recent = {
        "stable": rng.normal(size=n),
        "moved": rng.normal(1.5, 1.0, size=n),
        "slightly": rng.normal(0.35, 1.0, size=n),
        "topic": rng.choice(4, size=n, p=[0.7, 0.1, 0.1, 0.1]),
    }
    kinds = {"stable": "dense", "moved": "dense", "slightly": "dense", "topic": "categorical"}
    rows = compare_samples(reference, recent, kinds, DriftConfig())  # type: ignore[arg-type]
    result = DriftResult(rows, DriftConfig())
    assert [r.name for r in rows] == list(kinds)
    assert set(result.alerts) == {"moved", "topic"}
    assert result.alerts[0] == max(("moved", "topic"), key=lambda n: result.row(n).psi)
    assert result.warnings == ("slightly",)
    assert result.row("topic").ks is None and result.row("moved").ks is not None
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["alert"] is True and as_json["alerts"] == list(result.alerts)
    assert len(as_json["features"]) == 4
    with pytest.raises(ValueError, match="missing"):
        compare_samples(reference, {"stable": recent["stable"]}, kinds, DriftConfig())  # type: ignore[arg-type]


def test_split_days_reference_skips_the_warm_up() -> None:
    meta = {
        "split": {"kind": "time"},
        "world": {"post_lifetime_days": 7.0},
        "train_days": list(range(12)),
        "test_days": [13],
    }
    assert split_days(meta, "train", warm=True) == [7, 8, 9, 10, 11]
    assert split_days(meta, "train", warm=False) == list(range(12))
    assert split_days(meta, "train", 2, warm=True) == [10, 11]
    short = {**meta, "train_days": [0, 1, 2, 3]}
    assert split_days(short, "train", warm=True) == [3]
    random = {**meta, "split": {"kind": "random"}}
    assert split_days(random, "train", warm=True) == list(range(12))


# ---------------------------------------------------------------------------------------------
# The job on hand-made examples
# ---------------------------------------------------------------------------------------------


def _examples(n: int, day: int, seed: int, drifted: bool = False) -> dict[str, np.ndarray]:
    """Examples with every registry column; ``drifted`` moves the user-topic history and the
    topic mix (what drifted interests do), nothing else."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for c in RAW_COLUMNS:
        shape = (n, c.length) if c.length else (n,)
        if c.dtype == "int64":
            cols[c.name] = rng.integers(-1 if c.length else 0, 8, size=shape)
        else:
            cols[c.name] = rng.gamma(2.0, 5.0, size=shape).astype(np.float32)
    if drifted:
        cols["ut_imps"] = (cols["ut_imps"] / 4).astype(np.float32)
        cols["topic"] = rng.choice(8, size=n, p=[0.65] + [0.05] * 7)
    for label in ("view", "like", "comment", "share", "hide", "dwell"):
        cols[label] = (rng.random(n) < 0.1).astype(np.float32)
    cols["impression_id"] = day * 1_000_000 + np.arange(n)
    cols["day"] = np.full(n, day)
    cols["ts"] = day + rng.random(n)
    cols["propensity"] = np.full(n, 0.01, np.float32)
    return cols


def _write(path: Path, cols: dict[str, np.ndarray], name: str = "part-0.parquet") -> None:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(arrow_from_columns(cols, EXAMPLE_SCHEMA), path / name)


def _fake_run(root: Path, drifted: bool) -> Path:
    """A run directory with preprocessed examples: train days 0..8, valid 9, test 10."""
    data = root / "data"
    for day in range(9):
        _write(data / "examples" / "split=train", _examples(800, day, day), f"d{day}.parquet")
    _write(data / "examples" / "split=valid", _examples(800, 9, 9))
    _write(data / "examples" / "split=test", _examples(3000, 10, 10, drifted=drifted))
    meta = {
        "split": {"kind": "time"},
        "world": {"post_lifetime_days": 7.0},
        "train_days": list(range(9)),
        "valid_days": [9],
        "test_days": [10],
    }
    (data / "meta.json").write_text(json.dumps(meta))
    Vocabularies({t.vocab: Vocabulary.fit(np.arange(8)) for t in TABLES}).save(
        data / "vocabularies.npz"
    )
    return root


def test_sample_examples_is_uniform_bottom_k_whatever_the_file_layout(tmp_path: Path) -> None:
    rows = _examples(3000, 4, seed=0)
    _write(tmp_path / "one", rows)
    halves = [{k: v[s] for k, v in rows.items()} for s in (slice(1500, None), slice(0, 1500))]
    for i, half in enumerate(halves):
        _write(tmp_path / "two", half, f"part-{i}.parquet")
    a = sample_examples(tmp_path / "one", None, 500, seed=7)
    b = sample_examples(tmp_path / "two", None, 500, seed=7)
    assert len(a["impression_id"]) == 500
    np.testing.assert_array_equal(a["impression_id"], b["impression_id"])
    np.testing.assert_array_equal(a["ut_imps"], b["ut_imps"])
    other_seed = sample_examples(tmp_path / "one", None, 500, seed=8)["impression_id"]
    assert not np.array_equal(np.sort(a["impression_id"]), np.sort(other_seed))
    # uniform over the rows: the sampled ids spread over the whole range
    assert 0.4 < np.mean(a["impression_id"] % 1_000_000 < 1500) < 0.6
    assert sample_examples(tmp_path / "one", [4], 10_000, seed=0)["day"].shape == (3000,)
    with pytest.raises(ValueError, match="no examples"):
        sample_examples(tmp_path / "one", [5], 100)


def test_run_drift_writes_the_report_and_alerts_only_on_drift(tmp_path: Path) -> None:
    calm = run_drift(
        DriftJob(data_dir=_fake_run(tmp_path / "calm", False) / "data", out_dir=tmp_path / "c")
    )
    assert calm.alerts == () and calm.reference["days"] == [7, 8]  # the warm training days
    assert calm.recent["days"] == [10] and calm.ranker is None

    drifted = run_drift(
        DriftJob(data_dir=_fake_run(tmp_path / "drift", True) / "data", out_dir=tmp_path / "d")
    )
    # the moved columns, and the like rate whose denominator is the moved ut_imps
    assert set(drifted.alerts) == {"topic", "ut_imps_log", "ut_like_rate"}
    report = json.loads((tmp_path / "d" / "drift.json").read_text())
    assert report["alerts"] == list(drifted.alerts)
    names = {f["name"] for f in report["features"]}
    assert {"u_imps_log", "p_freshness", "creator_id", "u_recent_topics"} <= names
    assert "content_emb" not in names and "post_id" not in names
    html = (tmp_path / "d" / "drift.html").read_text()
    assert "ALERT" in html and html.count("data:image/png;base64,") == 2  # PSI bars + histograms
    prom = (tmp_path / "d" / "drift.prom").read_text().splitlines()
    topic = next(line for line in prom if line.startswith('feedrec_drift_psi{feature="topic"'))
    assert float(topic.rsplit(" ", 1)[1]) >= 0.2  # what the FeatureDrift alert rule reads
    assert sum(line.startswith("feedrec_drift_psi{") for line in prom) == len(names)


def test_drift_cli_exits_3_on_alert(tmp_path: Path) -> None:
    for name, drifted, code in (("calm", False, 0), ("drift", True, DRIFT_ALERT_EXIT)):
        run = _fake_run(tmp_path / name, drifted)
        res = CliRunner().invoke(main, ["drift", "--run-dir", str(run), "--max-rows", "2000"])
        assert res.exit_code == code, res.output
        assert (run / "drift" / "drift.html").exists()
        assert ("DRIFT ALERT: " in res.output) == drifted
    res = CliRunner().invoke(main, ["drift", "--run-dir", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "preprocess" in res.output


# ---------------------------------------------------------------------------------------------
# Drifted days from the generator
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(PRESETS["debug"], tmp_path_factory.mktemp("w"), progress=False).root


def _appended(base: Path, to: Path, drift: float, seed: int = 0) -> WorldLayout:
    shutil.copytree(base, to)
    return append_days(to, 1, drift=drift, seed=seed)


def _day_topics(layout: WorldLayout, day: int) -> np.ndarray:
    posts = pq.read_table(layout.log_day(day)).column("post_id").to_numpy()
    return pq.read_table(layout.posts).column("topic").to_numpy()[posts]


def test_appended_day_has_drifted_topic_interests(base_world: Path, tmp_path: Path) -> None:
    calm = _appended(base_world, tmp_path / "calm", drift=0.0)
    drifted = _appended(base_world, tmp_path / "drifted", drift=0.8)
    n_days = PRESETS["debug"].n_days
    for layout in (calm, drifted):
        assert load_world_config(layout).n_days == n_days + 1
        assert pq.read_table(layout.log_day(n_days)).num_rows > 0.9 * 4000
    # drift=0: the same interests, so the new day's topic mix is like the last original day's
    original = truth_for_day(calm, n_days - 1).theta
    np.testing.assert_array_equal(truth_for_day(calm, n_days).theta, original)
    last = _day_topics(calm, n_days - 1)
    assert categorical_psi(last, _day_topics(calm, n_days)) < 0.05
    # drift=0.8: moved interests, a moved topic mix; the truth of the earlier days is kept
    moved = truth_for_day(drifted, n_days).theta
    assert np.abs(moved - original).sum(axis=1).mean() > 0.5
    np.testing.assert_allclose(moved.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(truth_for_day(drifted, 0).theta, original)
    assert categorical_psi(last, _day_topics(drifted, n_days)) > 0.2


def test_appended_days_are_deterministic_and_bounded(base_world: Path, tmp_path: Path) -> None:
    a = _appended(base_world, tmp_path / "a", drift=0.5, seed=3)
    b = _appended(base_world, tmp_path / "b", drift=0.5, seed=3)
    c = _appended(base_world, tmp_path / "c", drift=0.5, seed=4)
    day = PRESETS["debug"].n_days
    table = pq.read_table(a.log_day(day))
    assert table.equals(pq.read_table(b.log_day(day)))
    assert not table.equals(pq.read_table(c.log_day(day)))
    # impression ids stay unique across days
    assert table.column("impression_id").to_numpy().min() > (
        pq.read_table(a.log_day(day - 1)).column("impression_id").to_numpy().max()
    )
    append_days(a.root, 1, drift=0.2)  # a second append continues after the first
    assert json.loads((a.root / "appended.json").read_text())["appends"][1]["first_day"] == day + 1
    assert load_world_config(a).n_days == day + 2
    # Posts are only created during the original days: past their lifetime, none is eligible.
    before = a.config.read_text()
    with pytest.raises(ValueError, match="no post is eligible"):
        append_days(a.root, 8)
    assert a.config.read_text() == before
    with pytest.raises(ValueError, match="drift"):
        append_days(a.root, 1, drift=1.5)
