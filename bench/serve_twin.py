"""The feed service's monolithic twin: the same stages in one FastAPI process, without Serve.

    python -m bench.serve_twin --run-dir runs/demo --triton-url 127.0.0.1:8001 --port 8100

It builds the Ingress replica's ``FeedService`` with the ``Retriever`` called in-process
instead of through a deployment handle: the request path, the Triton ranker, the re-ranking,
the record of every served feed on the run's event bus and the real-time signals are the
served ones, so ``bench/serve.py`` measures what Ray Serve's composition costs (or buys) and
nothing else. (Until 2026-11-25 the twin neither recorded feeds nor followed the bus.)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException

from feedrec.serving.api import FeedRequest, FeedResponse
from feedrec.serving.config import ServiceConfig
from feedrec.serving.feed_service import FeedService
from feedrec.serving.online_store import OnlineFeatureStore, UserFeatures
from feedrec.serving.stages import RequestError, Retriever


def twin_app(cfg: ServiceConfig) -> FastAPI:
    store = OnlineFeatureStore.load(
        cfg.data_dir,
        cfg.world_dir,
        small_quantile=cfg.small_creator_quantile,
        feature_store=cfg.feature_store,
    )
    retriever = Retriever(cfg, store)

    async def retrieve(user: UserFeatures, k: int, blocked: list[int]) -> Any:
        hits = retriever.search([user])[0]
        return (*retriever.allowed(user, hits, k, blocked), retriever.label)

    # The Ingress replica's service: ranking in Triton, re-ranking, the record of each served
    # feed on the run's event bus and the real-time signals that follow it. Only retrieval is
    # called in-process here, and Ray's metrics have no agent to export to.
    service = FeedService(cfg, store, retrieve)

    app = FastAPI(title="feedrec twin")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/feed", response_model=FeedResponse)
    async def feed(request: FeedRequest) -> FeedResponse:  # type: ignore[valid-type]
        try:
            return await service.feed(request)
        except RequestError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--triton-url", required=True)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--retrieve-k", type=int, default=ServiceConfig.model_fields["retrieve_k"].default
    )
    parser.add_argument("--rank-k", type=int, default=ServiceConfig.model_fields["rank_k"].default)
    parser.add_argument("--feature-store", default=None, help="redis://... (default: embedded)")
    parser.add_argument(
        "--events-dir",
        type=Path,
        default=None,
        help="the twin's own event log (default: a fresh temporary directory)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feedrec-twin-events-") as scratch:
        # Its own log, not the run's: with a shared one, each server's real-time follower
        # would parse the other's served feeds (1.4 ms of the Ingress replicas' CPU per twin
        # request, measured) and learn from traffic it did not serve.
        cfg = ServiceConfig.from_run(
            args.run_dir,
            triton_url=args.triton_url,
            retrieve_k=args.retrieve_k,
            rank_k=args.rank_k,
            feature_store=args.feature_store,
            events_dir=args.events_dir or Path(scratch),
        )
        uvicorn.run(twin_app(cfg), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
