"""Unit tests run without Ray: starting a cluster here is a bug."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def ranker_artifact() -> Callable[..., Path]:
    """``make(root, seed=0, extra=None, model=None, vocab_size=4)`` -> a verified ranker
    artifact directory at ``root``: ``model``'s weights (default: a fresh ranker seeded with
    ``seed``), every vocabulary ``vocab_size`` ids, ``extra`` files listed in its manifest."""

    def make(
        root: Path,
        seed: int = 0,
        extra: dict[str, Path] | None = None,
        model: Any = None,
        vocab_size: int = 4,
    ) -> Path:
        import numpy as np
        import torch

        from feedrec.artifacts import save_artifact
        from feedrec.features.vocabulary import Vocabularies, Vocabulary
        from feedrec.models.ranker import Ranker, RankerConfig
        from feedrec.schema import TABLES

        vocabs = Vocabularies({t.vocab: Vocabulary(np.arange(vocab_size)) for t in TABLES})
        if model is None:
            torch.manual_seed(seed)
            model = Ranker(RankerConfig(num_rows=vocabs.num_rows()))
        return save_artifact(
            root,
            kind="ranker",
            state_dict=model.state_dict(),
            model_config=model.config,
            vocabs=vocabs,
            metadata={},
            extra_files=extra,
        )

    return make
