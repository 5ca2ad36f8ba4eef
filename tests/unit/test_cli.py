from pathlib import Path

from click.testing import CliRunner

from feedrec.cli import main


def test_help_lists_every_stage() -> None:
    out = CliRunner().invoke(main, ["--help"]).output
    for cmd in ("generate", "preprocess", "train", "evaluate", "index", "serve", "feed", "demo"):
        assert cmd in out
    serve = CliRunner().invoke(main, ["serve", "--help"]).output
    for cmd in ("up", "down", "status", "run"):
        assert cmd in serve


def test_bad_override_names_the_field(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["generate", "--preset", "debug", "--run-dir", str(tmp_path), "--set", "n_users=-5"]
    )
    assert res.exit_code != 0 and "n_users" in res.output
    res = CliRunner().invoke(main, ["generate", "--run-dir", str(tmp_path), "--set", "bogus"])
    assert res.exit_code != 0 and "KEY=VALUE" in res.output


def test_stage_out_of_order_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["preprocess", "--run-dir", str(tmp_path)])
    assert res.exit_code == 2 and "feedrec generate" in res.output
