"""bench/serve.py pins the Serve fleet for a capacity search: Ray Serve's schema accepts it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.serve import parse_replicas, pinned_serve_config
from feedrec.runtime.ray_cluster import repo_root
from feedrec.serving.config import deployment_options

SERVE_CONFIG = repo_root() / "apps" / "feed_service" / "serve_config.yaml"


def test_replicas_are_pinned_at_the_given_count_or_min_replicas(tmp_path: Path) -> None:
    out = pinned_serve_config(SERVE_CONFIG, "feed", {"Ingress": 4}, tmp_path / "pinned.yaml")
    shipped, pinned = deployment_options(SERVE_CONFIG, "feed"), deployment_options(out, "feed")
    assert pinned["Ingress"]["num_replicas"] == 4
    retrieval_min = shipped["Retrieval"]["autoscaling_config"]["min_replicas"]
    assert pinned["Retrieval"]["num_replicas"] == retrieval_min
    for name, opts in pinned.items():
        assert "autoscaling_config" not in opts, name
        # Everything else (admission bounds, Retry-After, resources) is the shipped config's.
        rest = {k: v for k, v in shipped[name].items() if k != "autoscaling_config"}
        assert {k: opts[k] for k in rest} == rest, name
    with pytest.raises(ValueError, match="Ranking"):
        pinned_serve_config(SERVE_CONFIG, "feed", {"Ranking": 2}, tmp_path / "bad.yaml")


@pytest.mark.parametrize("text", ["Ingress", "Ingress=0", "Ingress=x", "=3"])
def test_bad_replica_specs_name_the_part(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"'{text}'"):
        parse_replicas(f"Retrieval=2,{text}")


def test_replica_specs_parse() -> None:
    assert parse_replicas("Ingress=4, Retrieval=2") == {"Ingress": 4, "Retrieval": 2}
    assert parse_replicas("") == {}
