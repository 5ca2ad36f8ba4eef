"""The hidden ground-truth engagement model of the synthetic world.

Engagement of user ``u`` with post ``p`` shown at feed position ``k`` at time ``t`` (days):

    affinity a = 0.8 * (log(theta_u[topic_p] + 0.02) + 2)      latent user interests x post topic
               + 0.5 * <z_u, z_p> / sqrt(L)                     finer latent taste
               + q_c                                            creator quality
               + 0.3 * media_pref[segment_u, media_p]
    freshness   log f = -(t - created_p) / FRESHNESS_DAYS
    p(view)     = (1 + k) ** -POSITION_EXP * sigmoid(1.5 + 0.5 a)
    p(task)     = p(view) * sigmoid(b_task + w_task * a + fresh_task * log f + ...)
    dwell       ~ view * LogNormal(1.5 + 0.4 a + 0.5 [video], 0.5)

The probabilities returned are unconditional (they include p(view)): they are what a ranker that
sees the same impression should predict, so their AUC on logged labels is the oracle ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

FRESHNESS_DAYS = 3.0
POSITION_EXP = 0.7
DWELL_SIGMA = 0.5
MEDIA_VIDEO = 1
N_MEDIA = 3
N_SEGMENTS = 8
LATENT_DIM = 8
BINARY_TASKS = ("like", "comment", "share", "hide")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class GroundTruth:
    """Hidden parameters of every entity (arrays indexed by entity id).

    Shapes: theta [U, T], z_user [U, L], segment [U], z_post [P, L], topic [P], media [P],
    creator [P], created_at [P], quality [C], media_pref [N_SEGMENTS, N_MEDIA].
    """

    theta: np.ndarray
    z_user: np.ndarray
    segment: np.ndarray
    z_post: np.ndarray
    topic: np.ndarray
    media: np.ndarray
    creator: np.ndarray
    created_at: np.ndarray
    quality: np.ndarray
    media_pref: np.ndarray

    def affinity(self, users: np.ndarray, posts: np.ndarray) -> np.ndarray:
        """Affinity of aligned (broadcastable) user and post id arrays."""
        interest = np.log(self.theta[users, self.topic[posts]] + 0.02) + 2.0
        latent = np.einsum("...l,...l->...", self.z_user[users], self.z_post[posts])
        return (
            0.8 * interest
            + 0.5 * latent / np.sqrt(LATENT_DIM)
            + self.quality[self.creator[posts]]
            + 0.3 * self.media_pref[self.segment[users], self.media[posts]]
        )

    def without_taste(self) -> GroundTruth:
        """This truth with every user's latent taste zeroed (what no log feature carries)."""
        return replace(self, z_user=np.zeros_like(self.z_user))

    def probabilities(
        self,
        users: np.ndarray,
        posts: np.ndarray,
        ts: np.ndarray | float,
        position: np.ndarray | float = 0.0,
    ) -> dict[str, np.ndarray]:
        """True unconditional p(view), p(binary task) and E[dwell] (broadcast shapes)."""
        a = self.affinity(users, posts)
        age = np.maximum(np.asarray(ts) - self.created_at[posts], 0.0)
        log_f = -age / FRESHNESS_DAYS
        is_video = (self.media[posts] == MEDIA_VIDEO).astype(np.float64)
        quality = self.quality[self.creator[posts]]
        p_view = (1.0 + np.asarray(position)) ** -POSITION_EXP * sigmoid(1.5 + 0.5 * a)
        logits = {
            "like": -1.6 + 1.1 * a + 0.6 * log_f,
            "comment": -3.6 + 0.9 * a + 0.6 * is_video + 0.3 * log_f,
            "share": -4.0 + 1.0 * a + 0.6 * quality + 0.3 * log_f,
            "hide": -2.8 - 1.0 * a - 0.2 * log_f,
        }
        out = {"view": p_view}
        out.update({task: p_view * sigmoid(logit) for task, logit in logits.items()})
        mu = self.dwell_mu(a, is_video)
        out["dwell"] = p_view * np.exp(mu + DWELL_SIGMA**2 / 2)
        return out

    @staticmethod
    def dwell_mu(affinity: np.ndarray, is_video: np.ndarray) -> np.ndarray:
        return 1.5 + 0.4 * affinity + 0.5 * is_video

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})
