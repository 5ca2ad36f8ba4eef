"""cluster.yaml: validated by Ray's own cluster-launcher code, plus feedrec's requirements.

`ray up` runs ``prepare_config`` (merge with the provider's ``defaults.yaml``, merge setup
commands, fill per-type worker bounds), asks the cloud for instance resources, then
``validate_config`` (Ray's bundled ``ray-schema.json`` plus its cross-field checks). Everything
but the cloud call runs offline, so it runs here on the file as committed.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from feedrec.runtime.ray_cluster import HAPROXY_PORT_ENV, SERVE_ENV, local_serve_env, repo_root

ROOT = repo_root()
CLUSTER_YAML = ROOT / "cluster.yaml"
# pyproject dependency -> the package the GPU variant installs instead.
GPU_SUBSTITUTES = {"faiss-cpu": "faiss-gpu-cu12"}


def _raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to the file before it talks to the cloud; returns the filled config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


def _bound_problems(config: dict[str, Any]) -> list[str]:
    """feedrec's checks on worker bounds, including one Ray's validation leaves out."""
    problems = []
    cap = config["max_workers"]
    for name, spec in _worker_types(config).items():
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers", cap)
        if not 0 <= lo <= hi:
            problems.append(f"{name}: min_workers {lo} > max_workers {hi}")
        if hi > cap:
            problems.append(f"{name}: max_workers {hi} > global max_workers {cap}")
    if cap > sum(s.get("max_workers", cap) for s in _worker_types(config).values()):
        problems.append(f"global max_workers {cap} exceeds what the groups can reach")
    return problems


def _uncommented_keys(text: str) -> list[str]:
    """Mapping keys whose line neither ends in a ``# comment`` nor follows a comment line.

    Key positions come from PyYAML's scanner (block and flow mappings alike), not a regex, so
    list items and multi-line values are not mistaken for keys. Keys of a flow mapping share
    their line, and so its comment, with the key that holds them.
    """
    lines = text.splitlines()
    key_lines = sorted(
        {
            tok.start_mark.line
            for tok in yaml.scan(text)
            if isinstance(tok, yaml.KeyToken) and tok.start_mark.line < len(lines)
        }
    )
    bad = []
    for i in key_lines:
        carries = re.search(r"\s#\s", lines[i]) is not None
        preceded = i > 0 and lines[i - 1].lstrip().startswith("#")
        if not (carries or preceded):
            bad.append(f"line {i + 1}: {lines[i].strip()}")
    return bad


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            names.add(_norm(Requirement(spec).name))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- Ray's own validation ----------------------------------------------------------------------


def test_ray_launcher_validates_the_committed_file() -> None:
    raw = _raw()
    prepared = _ray_validate(raw)
    # prepare_config filled what `ray up` relies on: per-type bounds and merged setup commands.
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["min_workers"] == head["max_workers"] == 0
    common = raw["setup_commands"]
    assert prepared["worker_setup_commands"] == common
    assert prepared["head_setup_commands"] == common + raw["head_setup_commands"]


@pytest.mark.parametrize(
    ("breakage", "error", "match"),
    [
        (lambda c: c.update(max_worker=3), jsonschema.ValidationError, "max_worker"),
        (
            lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1),
            jsonschema.ValidationError,
            "min_worker",
        ),
        (
            lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": 0.5}),
            jsonschema.ValidationError,
            "0.5",
        ),
        (
            lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=11),
            ValueError,
            "sum of `min_workers`",
        ),
        (lambda c: c.update(head_node_type="nope"), ValueError, "head_node_type"),
    ],
    ids=["unknown-top-level-key", "unknown-node-type-key", "fractional-gpu", "min-sum", "head"],
)
def test_ray_launcher_rejects_a_broken_copy(breakage: Any, error: type, match: str) -> None:
    broken = _raw()
    breakage(broken)
    with pytest.raises(error, match=match):
        _ray_validate(broken)


def test_min_above_max_in_a_group_is_caught_here_though_ray_accepts_it() -> None:
    broken = _raw()
    broken["available_node_types"]["gpu_worker"]["min_workers"] = 5  # max_workers is 4
    _ray_validate(broken)  # Ray's validation has no per-type min <= max check...
    assert _bound_problems(broken) == ["gpu_worker: min_workers 5 > max_workers 4"]  # ...ours does


# --- feedrec's requirements ---------------------------------------------------------------------


def test_head_gpu_and_cpu_worker_groups_with_consistent_bounds() -> None:
    config = _ray_validate(_raw())
    assert config["head_node_type"] in config["available_node_types"]
    workers = _worker_types(config)
    gpu = {n for n, s in workers.items() if s["resources"].get("GPU", 0) >= 1}
    cpu = {n for n, s in workers.items() if s["resources"].get("GPU", 0) == 0}
    assert gpu and cpu, workers
    assert all(workers[n]["resources"].get("CPU", 0) >= 1 for n in cpu)
    assert all(workers[n]["max_workers"] >= 1 for n in gpu | cpu)
    assert _bound_problems(config) == []


def test_every_node_starts_ray_with_the_serve_environment() -> None:
    # Serve reads these when a process starts: a node started without them would host
    # replicas that call their neighbours another way than the rest of the cluster.
    config = _raw()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in config[key] if " ray start " in f" {c} "]
        words = shlex.split(start)  # as the node's shell splits it (a value has a space)
        env = dict(w.split("=", 1) for w in words[: words.index("ray")])
        assert env == SERVE_ENV, (key, start)


def test_setup_installs_the_gpu_variant_from_the_mounted_repository() -> None:
    config = _ray_validate(_raw())
    [(remote, local)] = config["file_mounts"].items()
    assert Path(local).resolve() == ROOT.resolve() or local == "."
    home = f"/home/{config['auth']['ssh_user']}"
    mounted = remote.replace(home, "~", 1)
    expected = [
        ("-r requirements/gpu.txt", False),
        ("-r requirements/cpu-nodeps.txt", True),
        ("-e .", True),
    ]
    for name, spec in config["available_node_types"].items():
        is_head = name == config["head_node_type"]
        commands = spec.get(
            "worker_setup_commands",
            config["head_setup_commands" if is_head else "worker_setup_commands"],
        )
        positions = []
        for target, no_deps in expected:
            [(pos, cmd)] = [(i, c) for i, c in enumerate(commands) if target in c]
            assert f"cd {mounted} " in cmd and "pip install" in cmd, (name, cmd)
            assert ("--no-deps" in cmd) == no_deps, (name, cmd)
            positions.append(pos)
        assert positions == sorted(positions), (name, commands)


def test_gpu_variant_covers_the_package_dependencies() -> None:
    gpu = _requirement_names(ROOT / "requirements" / "gpu.txt")
    no_deps = _requirement_names(ROOT / "requirements" / "cpu-nodeps.txt")
    # A package that needs --no-deps must not be resolved with its metadata in gpu.txt.
    assert not gpu & no_deps
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = {_norm(Requirement(d).name) for d in project}
    missing = {GPU_SUBSTITUTES.get(n, n) for n in needed} - gpu - no_deps
    assert not missing, f"pyproject dependencies the cluster would not install: {missing}"
    # The cluster runs the Ray whose schema validated this file.
    [ray_pin] = [
        Requirement(line.split("#")[0])
        for line in (ROOT / "requirements" / "gpu.txt").read_text().splitlines()
        if line.startswith("ray[")
    ]
    assert ray_pin.specifier.contains(ray.__version__), (str(ray_pin), ray.__version__)


def test_every_key_is_commented() -> None:
    assert _uncommented_keys(CLUSTER_YAML.read_text()) == []


def test_comment_rule_flags_an_uncommented_key() -> None:
    text = "# about a\na: 1\nb: {c: 2}  # about b and c\n\nd:\n  # about e\n  e: 3\n  f: 4\n"
    assert _uncommented_keys(text) == ["line 5: d:", "line 8: f: 4"]


def test_a_local_cluster_gets_haproxy_ports_of_its_own() -> None:
    first, second = local_serve_env(), local_serve_env()
    assert {k: first[k] for k in SERVE_ENV} == SERVE_ENV
    ports = [int(env[name]) for env in (first, second) for name in HAPROXY_PORT_ENV]
    assert all(1024 < port < 65536 for port in ports)
    assert len(set(ports[:2])) == 2  # metrics and stats never share one
    assert {"9101", "8404"}.isdisjoint(first.values())  # not Ray's fixed defaults
