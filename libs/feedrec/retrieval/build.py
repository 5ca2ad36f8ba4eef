"""The index stage: item-tower embeddings of every eligible post -> faiss -> retrieval artifact."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from feedrec.artifacts import ModelArtifact, load_artifact, save_artifact
from feedrec.data.preprocess import PreprocessLayout, load_entity_attributes
from feedrec.features.tables import INDEX_TIME_OF_DAY, FeatureSnapshot
from feedrec.features.transform import FeatureTransform
from feedrec.models.predictor import TowerEncoder
from feedrec.retrieval.post_index import EXACT_MAX_POSTS, PostIndex
from feedrec.world.config import eligible_posts
from feedrec.world.generator import load_world_config
from feedrec.world.layout import WorldLayout

INDEX_FILE = "index.faiss"
INDEX_IDS_FILE = "index_post_ids.npy"
#: Sample user embeddings the index sweep measures recall and speed on (large corpora only).
SWEEP_QUERIES = 1000


def build_retrieval_artifact(
    two_tower_dir: Path, data_dir: Path, world_dir: Path, out_dir: Path
) -> Path:
    """Index the posts eligible on the serving day; write tower + index as one artifact."""
    started = time.perf_counter()
    tower = load_artifact(two_tower_dir)
    encoder = TowerEncoder.from_artifact(tower)
    data, world = PreprocessLayout(Path(data_dir)), WorldLayout(Path(world_dir))
    day = int(data.read_meta()["serving_day"])
    attrs = load_entity_attributes(world)
    lifetime = load_world_config(world).post_lifetime_days
    posts = eligible_posts(attrs.post_created_at, day, lifetime)
    transform = FeatureTransform(tower.vocabs)
    inputs = transform(attrs.post_columns(posts, at=day + INDEX_TIME_OF_DAY), "item_tower")
    queries = None
    if len(posts) > EXACT_MAX_POSTS:  # only large corpora get the sweep: skip the work otherwise
        # Sample viewers as of the serving day: the queries the sweep tunes recall for.
        tables = FeatureSnapshot.load(data.tables, day)
        users = np.random.default_rng(0).choice(attrs.n_users, min(SWEEP_QUERIES, attrs.n_users))
        queries = encoder.users(
            transform(tables.user_columns(users, np.full(len(users), day)), "user_tower")
        )
    index, sweep = PostIndex.build(encoder.items(inputs), posts, queries=queries)
    tmp = Path(out_dir).with_name(Path(out_dir).name + ".index")
    tmp.mkdir(parents=True, exist_ok=True)
    index.save(tmp / INDEX_FILE, tmp / INDEX_IDS_FILE)
    metadata = {
        **tower.metadata,
        "index": {
            "posts": len(index),
            "serving_day": day,
            "faiss_type": type(index.index).__name__,
            "sweep": None
            if sweep is None
            else {
                "chosen": sweep.chosen.to_dict(),
                "exact_qps": round(sweep.exact_qps, 1),
                "speedup": round(sweep.speedup, 2),
                "points": [p.to_dict() for p in sweep.points],
            },
            "build_seconds": round(time.perf_counter() - started, 2),
        },
    }
    out = save_artifact(
        Path(out_dir),
        kind=tower.kind,
        state_dict=tower.state_dict,
        model_config=tower.model_config,
        vocabs=tower.vocabs,
        metadata=metadata,
        extra_files={INDEX_FILE: tmp / INDEX_FILE, INDEX_IDS_FILE: tmp / INDEX_IDS_FILE},
    )
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return out


def load_post_index(artifact: ModelArtifact) -> PostIndex:
    """The faiss index stored in a retrieval artifact."""
    return PostIndex.load(artifact.path(INDEX_FILE), artifact.path(INDEX_IDS_FILE))
