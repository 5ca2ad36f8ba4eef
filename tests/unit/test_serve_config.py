"""The serve deploy YAML: per-deployment options validated by Ray Serve's own schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from feedrec.runtime.ray_cluster import repo_root
from feedrec.serving.config import deployment_options

SERVE_CONFIG = repo_root() / "apps" / "feed_service" / "serve_config.yaml"
CLUSTER_CONFIG = SERVE_CONFIG.with_name("serve_config.cluster.yaml")


@pytest.mark.parametrize("path", [SERVE_CONFIG, CLUSTER_CONFIG], ids=["laptop", "cluster"])
def test_every_deployment_autoscales_on_fractional_cpus(path: Path) -> None:
    options = deployment_options(path, "feed")
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


def test_the_cluster_config_differs_from_the_laptop_one_only_in_autoscaling() -> None:
    laptop, cluster = (yaml.safe_load(p.read_text()) for p in (SERVE_CONFIG, CLUSTER_CONFIG))
    for doc in (laptop, cluster):
        for d in doc["applications"][0]["deployments"]:
            d.pop("autoscaling_config")
    assert cluster == laptop
    options = deployment_options(CLUSTER_CONFIG, "feed")  # and Serve's schema accepts it
    assert set(options) == {"Ingress", "Retrieval"}


def test_on_a_cluster_the_ingress_holds_a_p99_target_with_the_latency_policy() -> None:
    from ray.serve.config import AutoscalingConfig

    from feedrec.serving.latency_policy import LatencyPolicy

    auto = AutoscalingConfig.model_validate(
        deployment_options(CLUSTER_CONFIG, "feed")["Ingress"]["autoscaling_config"]
    )
    policy_class = auto.policy.get_policy()  # as the Serve controller loads it: by value
    assert policy_class.__name__ == LatencyPolicy.__name__
    policy = policy_class(**auto.policy.policy_kwargs)
    assert policy.target_p99_ms == 100  # the p99 target for a feed request
    # Latency reports every 2 s (Serve's default 10 s would delay a scale-up by that much).
    assert auto.metrics_interval_s <= 2
    # The laptop keeps Serve's ongoing-request policy (see the cluster file's header).
    laptop = deployment_options(SERVE_CONFIG, "feed")["Ingress"]["autoscaling_config"]
    assert "policy" not in laptop
