"""The model registry: numbered verified copies, the metric gate, promotion and rollback."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from feedrec.artifacts import ArtifactError
from feedrec.artifacts.model_registry import (
    ModelRegistry,
    PromotionGate,
    RegistryError,
    flat_metrics,
)
from feedrec.cli import main

GOOD = {"auc.like": 0.75, "logloss.like": 0.20, "ece.like": 0.003}


def test_register_numbers_versions_and_copies_verified_files(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    a = reg.register("ranker", ranker_artifact(tmp_path / "a"), metrics=GOOD)
    b = reg.register("ranker", ranker_artifact(tmp_path / "b", seed=1), metrics=GOOD)
    assert (a.version, b.version) == (1, 2)
    assert a.path == tmp_path.resolve() / "reg" / "ranker" / "v0001"
    assert a.artifact_version != b.artifact_version
    assert reg.entry("ranker", 2).metrics == GOOD
    assert reg.load("ranker", 1).version == a.artifact_version
    assert reg.production("ranker") is None


def test_corrupt_artifact_is_never_registered(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    src = ranker_artifact(tmp_path / "a")
    (src / "weights.pt").write_bytes((src / "weights.pt").read_bytes()[:-5])
    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(ArtifactError, match=r"weights\.pt"):
        reg.register("ranker", src)
    assert reg.versions("ranker") == []


def test_retrieval_needs_an_index_and_ranker_must_not_have_one(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="must contain a faiss index"):
        reg.register("retrieval", ranker_artifact(tmp_path / "a"))
    index = tmp_path / "index.faiss"
    index.write_bytes(b"x")
    with pytest.raises(RegistryError, match="must not contain"):
        reg.register("ranker", ranker_artifact(tmp_path / "b", extra={"index.faiss": index}))


def test_gate_refuses_regressions_and_force_overrides(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    reg.register("ranker", ranker_artifact(tmp_path / "a"), metrics=GOOD)
    worse = {**GOOD, "auc.like": 0.70}
    reg.register("ranker", ranker_artifact(tmp_path / "b", seed=1), metrics=worse)
    first = reg.promote("ranker", 1)
    assert (first.previous, first.version) == (None, 1)
    with pytest.raises(RegistryError, match=r"auc\.like: 0\.7000 vs production 0\.7500"):
        reg.promote("ranker", 2)
    assert reg.production_version("ranker") == 1
    forced = reg.promote("ranker", 2, force=True)
    assert forced.forced and forced.gate_failures and reg.production_version("ranker") == 2


def test_gate_directions_per_metric() -> None:
    gate = PromotionGate(max_relative_drop=0.01, max_ece_increase=0.005)
    assert gate.check({**GOOD, "auc.like": 0.7426}, GOOD) == []  # -0.99%: allowed
    assert gate.check({**GOOD, "logloss.like": 0.199}, GOOD) == []  # better
    assert len(gate.check({**GOOD, "logloss.like": 0.21}, GOOD)) == 1
    assert len(gate.check({**GOOD, "ece.like": 0.0085}, GOOD)) == 1
    assert "missing" in gate.check({"auc.like": 0.8}, GOOD)[0]
    with pytest.raises(ValueError, match="max_relative_drop"):
        PromotionGate(max_relative_drop=1.5)


def test_rollback_walks_back_the_history(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    for i in range(3):
        reg.register("ranker", ranker_artifact(tmp_path / f"m{i}", seed=i), metrics=GOOD)
        reg.promote("ranker", i + 1)
    assert reg.rollback("ranker").version == 2
    assert reg.rollback("ranker").version == 1
    with pytest.raises(RegistryError, match="no earlier production version"):
        reg.rollback("ranker")
    assert reg.production_version("ranker") == 1


def test_rollback_refuses_a_corrupted_target(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    for i in range(2):
        reg.register("ranker", ranker_artifact(tmp_path / f"m{i}", seed=i), metrics=GOOD)
        reg.promote("ranker", i + 1)
    weights = reg.entry("ranker", 1).path / "weights.pt"
    weights.write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        reg.rollback("ranker")
    assert reg.production_version("ranker") == 2


def test_paths_cannot_escape_the_root(tmp_path: Path, ranker_artifact: Callable[..., Path]) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="unknown model name"):
        reg.version_dir("../../etc", 1)
    with pytest.raises(RegistryError, match="positive integer"):
        reg.version_dir("ranker", 0)
    outside = ranker_artifact(tmp_path / "outside")
    (tmp_path / "reg" / "ranker").mkdir(parents=True)
    (tmp_path / "reg" / "ranker" / "v0001").symlink_to(outside)
    with pytest.raises(RegistryError, match="outside the registry root"):
        reg.entry("ranker", 1)


def test_manifest_naming_a_file_outside_is_refused(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    src = ranker_artifact(tmp_path / "a")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["sha256"]["../secret"] = "0" * 64
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a plain file"):
        ModelRegistry(tmp_path / "reg").register("ranker", src)


def test_flat_metrics_from_an_evaluation() -> None:
    metrics = {
        "ranking": {"rows": 10, "like": {"model": {"auc": 0.7, "logloss": 0.2, "ece": 0.01}}},
        "retrieval": {"model": {"recall@100": 0.03}},
    }
    assert flat_metrics("ranker", metrics) == {
        "auc.like": 0.7,
        "logloss.like": 0.2,
        "ece.like": 0.01,
    }
    assert flat_metrics("retrieval", metrics) == {"recall@100": 0.03}


def test_cli_promote_rollback_and_errors(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    reg.register("ranker", ranker_artifact(tmp_path / "a"), metrics=GOOD)
    reg.register(
        "ranker", ranker_artifact(tmp_path / "b", seed=1), metrics={**GOOD, "auc.like": 0.5}
    )
    runner = CliRunner()
    args = ["--registry", str(tmp_path / "reg")]
    ok = runner.invoke(main, ["models", "promote", "ranker", "1", *args])
    assert ok.exit_code == 0 and "production vNone -> v1" in ok.output
    refused = runner.invoke(main, ["models", "promote", "ranker", "2", *args])
    assert refused.exit_code == 2 and "auc.like" in refused.output
    listed = runner.invoke(main, ["models", "list", *args])
    assert "* ranker-v1" in listed.output and "  ranker-v2" in listed.output
    missing = runner.invoke(main, ["models", "promote", "ranker", "9", *args])
    assert missing.exit_code == 2 and "not registered" in missing.output
    runner.invoke(main, ["models", "promote", "ranker", "2", "--force", *args])
    back = runner.invoke(main, ["models", "rollback", "ranker", *args])
    assert back.exit_code == 0 and "v2 -> v1" in back.output


def _ranker_versions(tmp_path: Path, make: Callable[..., Path], n: int) -> ModelRegistry:
    """A registry with ranker v1..vn (different weights), v1 in production."""
    reg = ModelRegistry(tmp_path / "reg")
    for seed in range(n):
        reg.register("ranker", make(tmp_path / f"m{seed}", seed=seed), metrics=GOOD)
    reg.promote("ranker", 1)
    return reg


def test_shadow_pointer_set_cleared_refused_for_production_and_cleared_by_promotion(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    reg = _ranker_versions(tmp_path, ranker_artifact, 3)
    assert reg.shadow_version("ranker") is None
    assert reg.set_shadow("ranker", 2) is None and reg.shadow_version("ranker") == 2
    with pytest.raises(RegistryError, match="in production"):
        reg.set_shadow("ranker", 1)
    with pytest.raises(RegistryError, match="not registered"):
        reg.set_shadow("ranker", 9)
    weights = reg.entry("ranker", 3).path / "weights.pt"
    weights.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"weights\.pt"):
        reg.set_shadow("ranker", 3)
    assert reg.shadow_version("ranker") == 2  # refusals leave the pointer as it was
    reg.promote("ranker", 2)  # the candidate won: nothing left to shadow
    assert reg.shadow_version("ranker") is None
    reg.set_shadow("ranker", 1)
    assert reg.set_shadow("ranker", None) == 1 and reg.shadow_version("ranker") is None


def test_cli_shadow_sets_clears_and_names_bad_input(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    reg = _ranker_versions(tmp_path, ranker_artifact, 2)
    runner = CliRunner()
    base = ["models", "shadow", "--registry", str(reg.root)]
    done = runner.invoke(main, [*base[:2], "2", *base[2:]])
    assert done.exit_code == 0 and "shadow none -> v2" in done.output, done.output
    listed = runner.invoke(main, ["models", "list", "--registry", str(reg.root), "--json"])
    assert [(m["version"], m["shadow"]) for m in json.loads(listed.output)] == [
        (1, False),
        (2, True),
    ]
    refused = runner.invoke(main, [*base[:2], "1", *base[2:]])
    assert refused.exit_code == 2 and "in production" in refused.output
    both = runner.invoke(main, [*base[:2], "2", *base[2:], "--clear"])
    assert both.exit_code == 2 and "not both" in both.output
    cleared = runner.invoke(main, [*base, "--clear"])
    assert cleared.exit_code == 0 and "ranker: shadow v2 -> none" in cleared.output
    # --model retrieval sets the retrieval pointer, which has its own versions
    missing = runner.invoke(main, [*base[:2], "1", *base[2:], "--model", "retrieval"])
    assert missing.exit_code == 2 and "retrieval" in missing.output, missing.output
    assert reg.shadow_version("retrieval") is None
    bogus = runner.invoke(main, [*base, "--clear", "--model", "tower"])
    assert bogus.exit_code == 2 and "--model" in bogus.output
