"""Multi-node for real on one machine: Ray's multi-node test cluster (a head and a second node,
each with its own raylet, object store and worker processes) in a driver process that runs
preprocess, a short distributed training and the Serve app there with no code change, and
reports where the work ran. (`ray start --address` for the second node is refused while Ray
is kept on loopback: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.)

The second node carries a custom resource, and the test asserts: Ray Data tasks of the
preprocess ran on both nodes, the two Ray Train workers (STRICT_SPREAD) on different nodes,
and the two Retrieval replicas (max_replicas_per_node 1) on different nodes, one on the node
with the custom resource; HAProxy runs on both nodes and a feed request through each works.

Serve runs HAProxy on every node (``SERVE_ENV``). On a real cluster each node has its own
address and Ray's fixed ports; two nodes on one host need ports of their own, so the second
node gets its HTTP, metrics and stats ports through its raylet's environment, the way Serve's
per-node override (``RAY_SERVE_WORKER_PROXY_HTTP_PORT``) is meant to be used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from feedrec.runtime.ray_cluster import HAPROXY_PORT_ENV, SERVE_ENV, free_ports

pytestmark = pytest.mark.slow

_DRIVER = textwrap.dedent(
    """
    import json, shutil, sys, time
    from pathlib import Path

    import httpx, ray
    from ray.util.state import list_actors, list_tasks

    from feedrec import pipeline
    from feedrec.runtime import RunLayout, init_ray
    from feedrec.serving.stack import ServingStack, StackConfig

    from ray._private.utils import read_ray_address
    from ray.cluster_utils import Cluster

    src, work, http_port, serve_config, worker_env = sys.argv[1:6]
    worker_env = json.loads(worker_env)
    # Ray's multi-node test cluster: a head and a second node with its own raylet, object
    # store and workers, both on 127.0.0.1; the second carries a custom resource.
    gib = 1024**3
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": gib, "node_ip_address": "127.0.0.1",
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": None})
    cluster.add_node(num_cpus=2, object_store_memory=gib, node_ip_address="127.0.0.1",
                     resources={"feedrec_worker_node": 1}, env_vars=worker_env)
    cluster.wait_for_nodes()
    address = cluster.address
    init_ray(address)
    run = RunLayout(Path(work))
    shutil.copytree(RunLayout(Path(src)).world, run.world)
    shutil.copy(Path(src) / "run.json", run.root / "run.json")
    for _ in range(240):  # the second node may still be joining
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        if len(nodes) == 2:
            break
        time.sleep(0.5)
    worker_node = next(i for i, r in nodes.items() if "feedrec_worker_node" in r)

    def node_ids(items):
        return sorted({x.node_id for x in items if x.node_id})

    def per_node(items):
        return {n[:8]: sum(x.node_id == n for x in items) for n in node_ids(items)}

    pipeline.preprocess(run)
    data_tasks = [t for t in list_tasks(address=address, detail=True, limit=10000)
                  if "ReadParquet" in t.name or "MapBatches" in t.name]
    pipeline.train(run, "ranker", "debug",
                   overrides={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"})
    train_workers = list_actors(address=address, detail=True, limit=10000,
                                filters=[("class_name", "=", "RayTrainWorker")])
    pipeline.train(run, "two_tower", "debug")
    pipeline.index(run)
    config = StackConfig(run_dir=run.root, http_port=int(http_port), ray_address=address,
                         serve_config=Path(serve_config), export_portable=False)
    with ServingStack(config) as stack:
        feed = httpx.post(f"{stack.url}/v1/feed", json={"user_id": 3, "count": 5}, timeout=60)
        # The second node's HAProxy comes up on its own; give it the time a node start takes.
        worker_url = f"http://127.0.0.1:{worker_env['RAY_SERVE_WORKER_PROXY_HTTP_PORT']}"
        via_worker = None
        for _ in range(120):
            try:
                via_worker = httpx.post(f"{worker_url}/v1/feed",
                                        json={"user_id": 4, "count": 5}, timeout=60)
                if via_worker.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        proxies = list_actors(address=address, detail=True, filters=[
            ("class_name", "=", "HAProxyManager"), ("state", "=", "ALIVE")])
        replicas = list_actors(address=address, detail=True, filters=[
            ("class_name", "=", "ServeReplica:feed:Retrieval"), ("state", "=", "ALIVE")])
        out = {
            "nodes": sorted(nodes), "worker_node": worker_node,
            "data_task_nodes": node_ids(data_tasks), "data_tasks_per_node": per_node(data_tasks),
            "train_worker_nodes": node_ids(train_workers),
            "retrieval_replica_nodes": node_ids(replicas),
            "feed_status": feed.status_code, "feed_fallback": feed.json().get("fallback"),
            "haproxy_nodes": node_ids(proxies),
            "worker_feed_status": via_worker and via_worker.status_code,
            "worker_feed_fallback": via_worker and via_worker.json().get("fallback"),
        }
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()
    # The utility records its cluster as the machine's current one (/tmp/ray/
    # ray_current_cluster); a later ray.init() without an address would try to join it.
    if read_ray_address() == address:
        Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)
    """
)

_SERVE_CONFIG = """
proxy_location: EveryNode
http_options: {host: 127.0.0.1, port: %(port)d}
applications:
  - name: feed
    route_prefix: /
    import_path: apps.feed_service.app:build_app
    args: {run_dir: unused}
    deployments:
      - name: Retrieval
        num_replicas: 2
        max_replicas_per_node: 1
        ray_actor_options: {num_cpus: 0.25}
      - name: Ingress
        num_replicas: 1
        ray_actor_options: {num_cpus: 0.25}
"""


def test_preprocess_training_and_serving_spread_over_two_nodes(
    debug_run: Path, tmp_path: Path
) -> None:
    http_port, worker_http, *haproxy = map(str, free_ports(2 + 2 * len(HAPROXY_PORT_ENV)))
    head_ports = dict(zip(HAPROXY_PORT_ENV, haproxy[: len(HAPROXY_PORT_ENV)], strict=True))
    worker_env = dict(zip(HAPROXY_PORT_ENV, haproxy[len(HAPROXY_PORT_ENV) :], strict=True))
    worker_env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = worker_http
    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text(_SERVE_CONFIG % {"port": int(http_port)})
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    repo = Path(__file__).resolve().parents[2]
    # Head: the driver's environment; second node: its raylet's (its workers inherit it).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **SERVE_ENV, **head_ports}
    # Ray Data packs Parquet row groups into 128 MiB read units, so the debug logs would be
    # read by one task on one node: one row group a unit gives a read task per log file.
    env["RAY_DATA_PARQUET_BIN_PACKING_BYTES"] = "1"
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "libs"), str(repo)])
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(debug_run),
            str(tmp_path / "run"),
            http_port,
            str(serve_config),
            json.dumps(worker_env),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"\nmulti-node placement: {json.dumps(result)}")
    assert len(result["nodes"]) == 2
    assert set(result["data_task_nodes"]) == set(result["nodes"]), "Ray Data used one node"
    assert len(result["train_worker_nodes"]) == 2, "both Ray Train workers on one node"
    assert len(result["retrieval_replica_nodes"]) == 2
    assert result["worker_node"] in result["retrieval_replica_nodes"]
    assert result["feed_status"] == 200 and result["feed_fallback"] is False
    assert result["haproxy_nodes"] == sorted(result["nodes"]), "HAProxy is not on every node"
    assert result["worker_feed_status"] == 200 and result["worker_feed_fallback"] is False
