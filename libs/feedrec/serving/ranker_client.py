"""gRPC client for the Triton ranker model (see ``feedrec.serving.triton_repository``).

Shapes (N = candidates in one request, S/H/D/K from the model config):
    single_ids     int64   [N, S]
    multi_ids  int64   [N, H]   -1 = padding
    dense          float32 [N, D]
    -> scores      float32 [N, K]
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from feedrec.serving.triton_repository import (
    INPUT_DENSE,
    INPUT_MULTI,
    INPUT_SINGLE,
    OUTPUT_SCORES,
)

_SPECS: tuple[tuple[str, np.dtype[Any], str], ...] = (
    (INPUT_SINGLE, np.dtype(np.int64), "INT64"),
    (INPUT_MULTI, np.dtype(np.int64), "INT64"),
    (INPUT_DENSE, np.dtype(np.float32), "FP32"),
)


def _validate(single_ids: Any, multi_ids: Any, dense: Any) -> list[np.ndarray]:
    """Check dtypes/ranks/batch dims; raise ValueError naming the offending input."""
    arrays = [single_ids, multi_ids, dense]
    n: int | None = None
    for (name, dtype, _), arr in zip(_SPECS, arrays, strict=True):
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != dtype:
            raise ValueError(f"{name} must have dtype {dtype}, got {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D [N, dim], got shape {arr.shape}")
        if arr.shape[1] == 0:
            raise ValueError(f"{name} has an empty feature dim: shape {arr.shape}")
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise ValueError(
                f"{name} has {arr.shape[0]} rows but {_SPECS[0][0]} has {n}: batch dims differ"
            )
    if n == 0:
        raise ValueError(f"{_SPECS[0][0]} has 0 rows: nothing to score")
    return arrays


def _is_deadline(e: InferenceServerException) -> bool:
    return "DEADLINE_EXCEEDED" in str(e.status() or "") or "Deadline Exceeded" in str(e)


@contextlib.contextmanager
def _deadline_as_timeout(timeout_s: float) -> Iterator[None]:
    """Turn Triton's DEADLINE_EXCEEDED into ``TimeoutError`` (both client flavours)."""
    try:
        yield
    except InferenceServerException as e:
        if _is_deadline(e):
            raise TimeoutError(f"ranker did not answer within {timeout_s}s") from e
        raise


#: gRPC channel options: tritonclient's defaults (no message size limit; it drops them when
#: any are given) plus a short reconnect backoff. gRPC's default backoff grows to 120 s: after a
#: Triton restart the channel could stay in backoff, and feeds on the fallback, for minutes.
#: A channel in backoff fails calls at once, so each Ingress replica is back on full quality
#: at most ``max_reconnect_backoff_ms`` (plus gRPC's 20 % jitter) after Triton is: 1 s keeps
#: that short while a dead server costs a refused local connection a second per replica.
CHANNEL_ARGS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonRankerClient:
    """Scores candidate rows on the Triton ``ranker`` model over gRPC.

    The asyncio client is created lazily on first use and re-created when used from a different
    event loop (grpc.aio channels are bound to the loop that created them); the blocking client
    for scripts/tests is separate and also lazy.
    """

    def __init__(self, url: str, *, model_name: str = "ranker", model_version: str = "") -> None:
        """``url`` is ``host:port`` of Triton's gRPC endpoint (e.g. ``TritonServer.grpc_url``)."""
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self._aio: grpcclient_aio.InferenceServerClient | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._sync: grpcclient.InferenceServerClient | None = None

    # ----------------------------------------------------------------- async API
    def _aio_client(self) -> grpcclient_aio.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio_loop is not loop:
            # A client from a closed/other loop cannot be reused (nor awaited-closed) here.
            self._aio = grpcclient_aio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
            self._aio_loop = loop
        return self._aio

    async def score(
        self,
        single_ids: np.ndarray,
        multi_ids: np.ndarray,
        dense: np.ndarray,
        timeout_s: float,
        model_version: str | None = None,
    ) -> np.ndarray:
        """Score N rows. Inputs [N,S] int64, [N,H] int64 (-1 pad), [N,D] float32 -> [N,K] float32.

        ``model_version``: a Triton model version to pin (default: the client's).

        Raises:
            ValueError: an input has the wrong type, dtype, rank or row count.
            TimeoutError: no answer within ``timeout_s``.
            tritonclient.utils.InferenceServerException: any other server-side failure.
        """
        inputs, outputs = self._build(single_ids, multi_ids, dense)
        with _deadline_as_timeout(timeout_s):
            result = await self._aio_client().infer(
                self.model_name,
                inputs,
                model_version=self.model_version if model_version is None else model_version,
                outputs=outputs,
                client_timeout=timeout_s,
            )
        return self._scores(result, single_ids.shape[0])

    async def ready(self) -> bool:
        """True when the server and the ranker model are ready (False on connection errors)."""
        try:
            client = self._aio_client()
            return bool(
                await client.is_server_ready()
                and await client.is_model_ready(self.model_name, self.model_version)
            )
        except InferenceServerException:
            return False

    async def close(self) -> None:
        """Close both channels (the sync one too, so one call releases everything)."""
        if self._aio is not None:
            if self._aio_loop is asyncio.get_running_loop():
                await self._aio.close()
            self._aio = None
            self._aio_loop = None
        self.close_sync()

    # ----------------------------------------------------------------- sync API
    def ready_sync(self, model_version: str | None = None) -> bool:
        """Blocking readiness of the model (a given version, or the client's); False on
        connection errors (a restarting server)."""
        version = self.model_version if model_version is None else model_version
        try:
            if self._sync is None:
                self._sync = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
            return bool(self._sync.is_model_ready(self.model_name, version))
        except InferenceServerException:
            return False

    def score_sync(
        self,
        single_ids: np.ndarray,
        multi_ids: np.ndarray,
        dense: np.ndarray,
        timeout_s: float = 10.0,
    ) -> np.ndarray:
        """Blocking twin of :meth:`score` (scripts, tests); same shapes and errors."""
        inputs, outputs = self._build(single_ids, multi_ids, dense)
        if self._sync is None:
            self._sync = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        with _deadline_as_timeout(timeout_s):
            result = self._sync.infer(
                self.model_name,
                inputs,
                model_version=self.model_version,
                outputs=outputs,
                client_timeout=timeout_s,
            )
        return self._scores(result, single_ids.shape[0])

    def close_sync(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    # ----------------------------------------------------------------- internals
    @staticmethod
    def _build(
        single_ids: np.ndarray,
        multi_ids: np.ndarray,
        dense: np.ndarray,
    ) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
        # The aio client uses the same InferInput/InferRequestedOutput classes as the sync one.
        arrays = _validate(single_ids, multi_ids, dense)
        inputs = []
        for (name, _, triton_dtype), arr in zip(_SPECS, arrays, strict=True):
            inp = grpcclient.InferInput(name, list(arr.shape), triton_dtype)
            inp.set_data_from_numpy(np.ascontiguousarray(arr))
            inputs.append(inp)
        return inputs, [grpcclient.InferRequestedOutput(OUTPUT_SCORES)]

    @staticmethod
    def _scores(result: Any, n: int) -> np.ndarray:
        scores = result.as_numpy(OUTPUT_SCORES)
        # An empty output with no error is the numpy-2 pb_utils.Tensor pitfall on the server
        # side; fail loudly rather than hand back a silently wrong shape.
        if scores is None or scores.ndim != 2 or scores.shape[0] != n:
            shape = None if scores is None else scores.shape
            raise RuntimeError(f"ranker returned scores of shape {shape} for {n} rows")
        return scores.astype(np.float32, copy=False)
