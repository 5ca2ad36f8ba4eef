"""Real tritonserver (from the nvidia-pytriton wheel) on CPU: start, score over gRPC, stop.

One server (module fixture) serves two python-backend models:
  * ``toy``: its own model.py, scores = 2 * dense.sum(1) computed with torch via DLPack;
  * ``ranker``: the production template (apps/triton/ranker/model.py) written by
    write_model_repository, with a fake predictor injected through the ``predictor_factory``
    parameter, so the template's batching/splitting/DLPack path runs for real.
A second, broken repository checks that start-up failures surface with the log text.
"""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from feedrec.serving.ranker_client import TritonRankerClient
from feedrec.serving.triton_repository import add_model_version, write_model_repository
from feedrec.serving.triton_server import TritonServer, TritonServerConfig

S, H, D = 2, 3, 4  # sparse ids, history length, dense features per row

TOY_CONFIG = f"""\
name: "toy"
backend: "python"
max_batch_size: 64
input [
  {{ name: "single_ids" data_type: TYPE_INT64 dims: [ {S} ] }},
  {{ name: "multi_ids" data_type: TYPE_INT64 dims: [ {H} ] }},
  {{ name: "dense" data_type: TYPE_FP32 dims: [ {D} ] }}
]
output [ {{ name: "scores" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

TOY_MODEL = """\
import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(1)

    def execute(self, requests):
        responses = []
        for request in requests:
            dense = torch.from_dlpack(
                pb_utils.get_input_tensor_by_name(request, "dense").to_dlpack()
            )
            scores = (dense.sum(dim=1, keepdim=True) * 2).contiguous()
            out = pb_utils.Tensor.from_dlpack("scores", torch.utils.dlpack.to_dlpack(scores))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""

# Imported inside the stub (the module's dir is put on the stubs' PYTHONPATH).
FAKE_PREDICTOR = """\
import time
from pathlib import Path

import torch


class FakePredictor:
    def __init__(self, artifact_dir):
        self.scale = float((artifact_dir / "scale.txt").read_text())
        self.calls = artifact_dir / "calls.txt"

    @classmethod
    def from_artifact(cls, artifact_dir):
        return cls(Path(artifact_dir))

    def __call__(self, single_ids, multi_ids, dense):
        first = not self.calls.exists()
        with self.calls.open("a") as f:
            f.write(f"{len(dense)}\\n")
        if first:
            # Keep the only instance busy so the requests sent meanwhile queue up and the
            # dynamic batcher hands them to ONE later execute() call.
            time.sleep(0.5)
        # [N, 3]: sum of ids, count of non-padding topics, scale * sum of dense.
        return torch.stack(
            [
                single_ids.sum(1).float(),
                (multi_ids >= 0).sum(1).float(),
                dense.sum(1) * self.scale,
            ],
            dim=1,
        )
"""

BROKEN_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("boom: artifact is corrupt")

    def execute(self, requests):
        return []
"""


def _rows(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic inputs: [n,S] int64, [n,H] int64 with -1 padding, [n,D] float32."""
    base = np.arange(offset, offset + n)
    sparse = np.stack([base, base * 10], axis=1).astype(np.int64)
    topics = np.full((n, H), -1, dtype=np.int64)
    for i in range(n):
        topics[i, : i % (H + 1)] = 7  # 0..H real topics per row
    dense = (np.arange(n * D, dtype=np.float32).reshape(n, D) + offset) / 4
    return sparse, topics, dense


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    (repo / "toy" / "1").mkdir(parents=True)
    (repo / "toy" / "config.pbtxt").write_text(TOY_CONFIG)
    (repo / "toy" / "1" / "model.py").write_text(TOY_MODEL)

    artifact = root / "artifact"
    artifact.mkdir()
    (artifact / "scale.txt").write_text("10")
    pymods = root / "pymods"
    pymods.mkdir()
    (pymods / "fake_ranker_predictor.py").write_text(FAKE_PREDICTOR)
    write_model_repository(
        repo,
        artifact,
        num_single=S,
        num_multi=H,
        num_dense=D,
        num_outputs=3,
        max_batch_size=64,
        # Long enough that concurrent requests really get merged into one execute() call.
        max_queue_delay_us=20_000,
        extra_parameters={"predictor_factory": "fake_ranker_predictor:FakePredictor.from_artifact"},
    )
    config = TritonServerConfig(
        model_repository=repo,
        log_path=root / "tritonserver.log",
        ready_timeout_s=90,
        python_path=(pymods,),
    )
    with TritonServer(config) as srv:
        yield srv


def test_toy_model_scores_sync_and_async(server: TritonServer) -> None:
    sparse, topics, dense = _rows(5)
    expected = dense.sum(axis=1, keepdims=True) * 2
    client = TritonRankerClient(server.grpc_url, model_name="toy")
    try:
        got = client.score_sync(sparse, topics, dense, timeout_s=10)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)

        async def go() -> tuple[bool, np.ndarray]:
            ready = await client.ready()
            scores = await client.score(sparse, topics, dense, timeout_s=10)
            await client.close()
            return ready, scores

        ready, got_async = asyncio.run(go())
        assert ready
        np.testing.assert_array_equal(got_async, expected)
    finally:
        client.close_sync()


def test_ranker_template_merges_and_splits_requests(server: TritonServer) -> None:
    """Concurrent requests of different sizes each get exactly their own rows back."""
    client = TritonRankerClient(server.grpc_url)  # model "ranker"
    calls = server.config.model_repository.parent / "artifact" / "calls.txt"
    calls.unlink(missing_ok=True)
    batches = [_rows(n, offset=100 * i) for i, n in enumerate((1, 4, 2, 7))]

    async def go() -> list[np.ndarray]:
        try:
            assert await client.ready()
            return list(await asyncio.gather(*(client.score(*b, timeout_s=10) for b in batches)))
        finally:
            await client.close()

    for (sparse, topics, dense), got in zip(batches, asyncio.run(go()), strict=True):
        expected = np.stack(
            [sparse.sum(1), (topics >= 0).sum(1), dense.sum(1) * 10], axis=1
        ).astype(np.float32)
        assert got.shape == (len(sparse), 3)
        np.testing.assert_array_equal(got, expected)
    rows_per_call = [int(n) for n in calls.read_text().split()]
    assert sum(rows_per_call) == 1 + 4 + 2 + 7
    assert len(rows_per_call) < len(batches), f"requests never merged: {rows_per_call}"


def test_server_rejects_wrong_dims_without_dying(server: TritonServer) -> None:
    client = TritonRankerClient(server.grpc_url)
    sparse, topics, dense = _rows(2)
    try:
        with pytest.raises(InferenceServerException, match="dense"):
            client.score_sync(sparse, topics, dense[:, :2].copy(), timeout_s=10)
        # Still serving after the bad request.
        assert client.score_sync(sparse, topics, dense, timeout_s=10).shape == (2, 3)
    finally:
        client.close_sync()


# 127.0.0.1 as /proc/net/tcp and /proc/net/tcp6 print it (little-endian hex words).
LOOPBACK_V4 = {"0100007F", "0000000000000000FFFF00000100007F"}


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of LISTEN sockets on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = TCP_LISTEN
                found.append(addr)
    return found


def _non_loopback_ipv4() -> str | None:
    # Routing a UDP socket sends nothing but reveals the outgoing interface's address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_listens_on_loopback_only(server: TritonServer) -> None:
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        addrs = _listeners(port)
        assert addrs, f"nothing listens on port {port}"
        # gRPC listens on an IPv6 socket bound to the v4-mapped ::ffff:127.0.0.1.
        assert set(addrs) <= LOOPBACK_V4, f"port {port} bound to {addrs}, not 127.0.0.1 only"
    other = _non_loopback_ipv4()
    if other is not None:
        with pytest.raises(OSError), socket.create_connection((other, server.grpc_port), 2):
            pass


def test_client_validates_inputs_before_sending() -> None:
    client = TritonRankerClient("127.0.0.1:1")  # never contacted
    sparse, topics, dense = _rows(3)
    with pytest.raises(ValueError, match="dense"):
        client.score_sync(sparse, topics, dense.astype(np.float64))
    with pytest.raises(ValueError, match="multi_ids"):
        client.score_sync(sparse, topics[:2], dense)
    with pytest.raises(ValueError, match="single_ids"):
        client.score_sync(sparse[:, 0], topics, dense)
    with pytest.raises(ValueError, match="multi_ids"):
        asyncio.run(client.score(sparse, topics.astype(np.int32), dense, timeout_s=1))


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        TritonServerConfig(model_repository=tmp_path / "missing")
    with pytest.raises(ValueError, match="must differ"):
        TritonServerConfig(model_repository=tmp_path, http_port=9000, grpc_port=9000)
    with pytest.raises(ValueError, match="metrics_port"):
        TritonServerConfig(model_repository=tmp_path, metrics_port=70000)
    with pytest.raises(ValueError, match="ready_timeout_s"):
        TritonServerConfig(model_repository=tmp_path, ready_timeout_s=0)
    with pytest.raises(RuntimeError, match="before start"):
        TritonServer(TritonServerConfig(model_repository=tmp_path)).wait_ready()


def test_broken_repository_raises_with_log(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "toy" / "1").mkdir(parents=True)
    (repo / "toy" / "config.pbtxt").write_text(TOY_CONFIG)
    (repo / "toy" / "1" / "model.py").write_text(textwrap.dedent(BROKEN_MODEL))
    srv = TritonServer(TritonServerConfig(model_repository=repo, ready_timeout_s=60))
    srv.start()
    try:
        with pytest.raises(RuntimeError, match="boom: artifact is corrupt") as info:
            srv.wait_ready()
        assert "exited with code" in str(info.value)
    finally:
        srv.stop()
    assert srv.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(srv.pid, 0)


def test_stop_ends_process(server: TritonServer) -> None:
    """Runs last in this module: the fixture's teardown stop() is then a no-op."""
    pid = server.pid
    assert pid is not None and server.is_running()
    server.stop()
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # The python backend stubs (same process group) are gone too.
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_new_ranker_version_takes_over_without_a_failed_request(tmp_path: Path) -> None:
    """Version 2 (another artifact) is added next to version 1 and loaded while two clients
    keep scoring: every request is answered, first by version 1, at the end by version 2 (the
    latest, for clients that name no version); version 1 still answers when asked by name."""
    pymods = tmp_path / "pymods"
    pymods.mkdir()
    (pymods / "fake_ranker_predictor.py").write_text(FAKE_PREDICTOR)
    artifacts = {}
    for version, scale in ((1, "10"), (2, "20")):
        artifacts[version] = tmp_path / f"artifact{version}"
        artifacts[version].mkdir()
        (artifacts[version] / "scale.txt").write_text(scale)
    repo = tmp_path / "repo"

    def write(version: int) -> None:
        write_model_repository(
            repo,
            artifacts[version],
            version=version,
            num_single=S,
            num_multi=H,
            num_dense=D,
            num_outputs=3,
            max_batch_size=64,
            extra_parameters={
                "predictor_factory": "fake_ranker_predictor:FakePredictor.from_artifact"
            },
        )

    write(1)
    config = TritonServerConfig(
        model_repository=repo,
        log_path=tmp_path / "tritonserver.log",
        ready_timeout_s=90,
        python_path=(pymods,),
    )
    sparse, topics, dense = _rows(4)
    scales: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    with TritonServer(config) as srv:

        def hammer() -> None:
            client = TritonRankerClient(srv.grpc_url)
            while not stop.is_set():
                try:
                    out = client.score_sync(sparse, topics, dense, timeout_s=30)
                    ratio = out[:, 2] / dense.sum(axis=1)
                    assert np.allclose(ratio, ratio[0]), "one response mixed two versions"
                    scales.append(float(ratio[0]))
                except BaseException as e:
                    errors.append(e)

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            while len(scales) < 10 and not errors:
                time.sleep(0.05)
            config_before = (repo / "ranker" / "config.pbtxt").read_bytes()
            # Version 1 stays loaded (pinned clients); the config is untouched, so Triton
            # loads version 2 only instead of reloading both.
            add_model_version(repo, artifacts[2], 2, keep=[1])
            srv.load_model("ranker")
            assert (repo / "ranker" / "config.pbtxt").read_bytes() == config_before
            seen = len(scales)
            while len(scales) < seen + 10 and not errors:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        pinned = TritonRankerClient(srv.grpc_url, model_version="1")
        out = pinned.score_sync(sparse, topics, dense, timeout_s=30)
        pinned.close_sync()
        assert np.allclose(out[:, 2] / dense.sum(axis=1), 10)  # the kept version still answers
        with pytest.raises(RuntimeError, match="could not load 'nope'"):
            srv.load_model("nope")
    assert not errors, errors[:3]
    assert scales[0] == pytest.approx(10) and scales[-1] == pytest.approx(20)
    assert {round(s) for s in scales} == {10, 20}
    # After the first version-2 answer, version 1 can only finish what was already in flight
    # (one request per client thread).
    switched = next(i for i, s in enumerate(scales) if round(s) == 20)
    assert sum(round(s) == 10 for s in scales[switched:]) <= len(threads)
