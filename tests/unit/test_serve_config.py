"""The serve deploy YAML: per-deployment options validated by Ray Serve's own schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from feedrec.runtime.ray_cluster import repo_root
from feedrec.serving.config import deployment_options

SERVE_CONFIG = repo_root() / "apps" / "feed_service" / "serve_config.yaml"


def test_every_deployment_autoscales_on_fractional_cpus() -> None:
    options = deployment_options(SERVE_CONFIG, "feed")
    assert set(options) == {"Ingress", "Retrieval"}
    total_min_cpus = 0.0
    for name, opts in options.items():
        auto = opts["autoscaling_config"]
        assert 1 <= auto["min_replicas"] < auto["max_replicas"], name
        assert auto["upscale_delay_s"] < auto["downscale_delay_s"], name
        cpus = opts["ray_actor_options"]["num_cpus"]
        assert 0 < cpus < 1, name
        total_min_cpus += cpus * auto["min_replicas"]
    assert total_min_cpus <= 1.0  # the minimum fleet leaves a core of a 2-core laptop free


def test_bad_config_is_refused_naming_the_problem(tmp_path: Path) -> None:
    raw = yaml.safe_load(SERVE_CONFIG.read_text())
    raw["applications"][0]["deployments"][1]["autoscaling_config"]["min_replicas"] = -2
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="min_replicas"):
        deployment_options(bad, "feed")
    with pytest.raises(ValueError, match="no application named 'nope'"):
        deployment_options(SERVE_CONFIG, "nope")
