"""The typed training batch and the one conversion from id arrays to a KeyedJaggedTensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feedrec.features.transform import ModelInputs
from feedrec.schema.registry import TASKS, ModelPart, sparse_features

BINARY_TASKS = TASKS[:-1]


def to_kjt(single_ids: torch.Tensor, multi_ids: torch.Tensor, part: ModelPart) -> KeyedJaggedTensor:
    """Build the part's KJT (keys in registry order).

    Args:
        single_ids: int64 [B, S], one row id per single-valued feature.
        multi_ids: int64 [B, M], multi-valued features concatenated, -1 padded.
    """
    values, lengths = [], []
    s = m = 0
    for f in sparse_features(part):
        if f.max_len == 1:
            values.append(single_ids[:, s])
            lengths.append(torch.ones_like(single_ids[:, s], dtype=torch.int32))
            s += 1
        else:
            block = multi_ids[:, m : m + f.max_len]
            mask = block >= 0
            values.append(block[mask])  # row-major: row 0's ids, then row 1's, ...
            lengths.append(mask.sum(dim=1, dtype=torch.int32))
            m += f.max_len
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in sparse_features(part)],
        values=torch.cat(values),
        lengths=torch.cat(lengths),
    )


@dataclass
class PartInputs:
    """Tensors of one model part: dense float32 [B, D] and its KJT."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor

    @classmethod
    def from_numpy(cls, inputs: ModelInputs, part: ModelPart) -> PartInputs:
        return cls(
            dense=torch.from_numpy(inputs.dense),
            sparse=to_kjt(
                torch.from_numpy(inputs.single_ids), torch.from_numpy(inputs.multi_ids), part
            ),
        )

    def to(self, device: torch.device) -> PartInputs:
        return PartInputs(self.dense.to(device), self.sparse.to(device))


@dataclass
class RankerBatch:
    """A ranker training batch: inputs, binary labels [B, 4] (TASKS order) and dwell [B] seconds."""

    inputs: PartInputs
    labels: torch.Tensor
    dwell: torch.Tensor

    @classmethod
    def from_columns(cls, batch: dict[str, np.ndarray]) -> RankerBatch:
        """Collate a Ray Data batch of transformed ranker examples."""
        labels = np.stack([batch[t] for t in BINARY_TASKS], axis=1).astype(np.float32)
        return cls(
            inputs=PartInputs.from_numpy(ModelInputs.from_columns(batch), "ranker"),
            labels=torch.from_numpy(labels),
            dwell=torch.from_numpy(np.asarray(batch["dwell"], dtype=np.float32)),
        )

    def to(self, device: torch.device) -> RankerBatch:
        return RankerBatch(self.inputs.to(device), self.labels.to(device), self.dwell.to(device))


@dataclass
class PairBatch:
    """A retrieval batch of B positive (user, post) pairs; other rows are in-batch negatives.

    ``item_log_q`` [B]: log of how likely each item, at its age, is to be one candidate of a
    batch (``feedrec.training.candidate_probability``); the logQ correction subtracts it from
    the logits.
    ``negative`` [B rows] / ``negative_log_q`` [B]: one random post per row (columns prefixed
    ``neg_``, ``feedrec.training.negative_sampler``), or None without mixed negatives; a
    ``negative_log_q`` of +inf marks a slot with no post drawn (masked out of the softmax).
    """

    user: PartInputs
    item: PartInputs
    item_log_q: torch.Tensor
    negative: PartInputs | None = None
    negative_log_q: torch.Tensor | None = None

    @classmethod
    def from_columns(cls, batch: dict[str, np.ndarray]) -> PairBatch:
        has_negatives = "neg_log_q" in batch
        return cls(
            user=PartInputs.from_numpy(ModelInputs.from_columns(batch, "user_"), "user_tower"),
            item=PartInputs.from_numpy(ModelInputs.from_columns(batch, "item_"), "item_tower"),
            item_log_q=torch.from_numpy(np.asarray(batch["item_log_q"], dtype=np.float32)),
            negative=PartInputs.from_numpy(ModelInputs.from_columns(batch, "neg_"), "item_tower")
            if has_negatives
            else None,
            negative_log_q=torch.from_numpy(np.asarray(batch["neg_log_q"], dtype=np.float32))
            if has_negatives
            else None,
        )

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.user.to(device),
            self.item.to(device),
            self.item_log_q.to(device),
            None if self.negative is None else self.negative.to(device),
            None if self.negative_log_q is None else self.negative_log_q.to(device),
        )
