import numpy as np
import pytest
import torch

from feedrec.features.transform import ModelInputs
from feedrec.models.batch import PartInputs, RankerBatch, to_kjt
from feedrec.models.ranker import Ranker, RankerConfig, RankerTrain
from feedrec.models.two_tower import TwoTower, TwoTowerConfig, TwoTowerTrain
from feedrec.schema import TABLES, dense_dim, sparse_features

ROWS = {t.name: 10 for t in TABLES}


def _inputs(part, n: int = 6) -> ModelInputs:
    feats = sparse_features(part)
    rng = np.random.default_rng(0)
    multi = rng.integers(-1, 10, size=(n, sum(f.max_len for f in feats if f.max_len > 1)))
    return ModelInputs(
        dense=rng.random((n, dense_dim(part)), dtype=np.float32),
        single_ids=rng.integers(0, 10, size=(n, sum(f.max_len == 1 for f in feats))),
        multi_ids=multi,
    )


def test_kjt_drops_padding_and_keeps_key_order() -> None:
    multi = torch.tensor([[3, -1, -1, -1, -1], [1, 2, -1, -1, -1]])
    single = torch.zeros((2, 2), dtype=torch.long)
    kjt = to_kjt(single, multi, "user_tower")
    assert kjt.keys() == [f.name for f in sparse_features("user_tower")]
    assert kjt["u_recent_topics"].lengths().tolist() == [1, 2]
    assert kjt["u_recent_topics"].values().tolist() == [3, 1, 2]


@pytest.mark.parametrize(
    "arch",
    [{"interaction": "mlp"}, {"interaction": "dcn"}, {"interaction": "dcn", "num_experts": 3}],
    ids=["mlp", "dcn", "dcn-mmoe"],
)
def test_ranker_forward_and_loss(arch: dict) -> None:
    model = Ranker(RankerConfig(num_rows=ROWS, **arch))
    inputs = PartInputs.from_numpy(_inputs("ranker"), "ranker")
    out = model(inputs.dense, inputs.sparse)
    assert out.shape == (6, 5)
    preds = Ranker.predictions(out)
    assert ((preds[:, :4] > 0) & (preds[:, :4] < 1)).all() and (preds[:, 4] >= 0).all()
    batch = RankerBatch(inputs, torch.ones((6, 4)), torch.ones(6))
    loss, _ = RankerTrain(model)(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "gates" not in n)
    if arch.get("num_experts"):
        assert all(g.weight.grad is not None for g in model.gates)


def test_ranker_calibration_is_applied_to_the_binary_logits() -> None:
    model = Ranker(RankerConfig(num_rows=ROWS)).eval()
    inputs = PartInputs.from_numpy(_inputs("ranker"), "ranker")
    with torch.no_grad():
        raw = model(inputs.dense, inputs.sparse)
        model.calibration[:, 0] = 2.0
        model.calibration[:, 1] = -1.0
        calibrated = model(inputs.dense, inputs.sparse)
    torch.testing.assert_close(calibrated[:, :4], raw[:, :4] * 2.0 - 1.0)
    torch.testing.assert_close(calibrated[:, 4], raw[:, 4])  # dwell is not a logit


@pytest.mark.parametrize(
    "bad", [{"interaction": "dot"}, {"cross_layers": 0}, {"num_experts": -1}, {"over_arch": ()}]
)
def test_ranker_config_rejects_bad_architecture(bad: dict) -> None:
    with pytest.raises(ValueError, match="ranker config"):
        RankerConfig(num_rows=ROWS, **bad)


def test_two_tower_embeddings_are_unit_norm_and_loss_finite() -> None:
    model = TwoTower(TwoTowerConfig(num_rows=ROWS, embedding_dim=16))
    u = PartInputs.from_numpy(_inputs("user_tower"), "user_tower")
    v = PartInputs.from_numpy(_inputs("item_tower"), "item_tower")
    eu, ev = model(u.dense, u.sparse, v.dense, v.sparse)
    torch.testing.assert_close(ev.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(eu.norm(dim=1), torch.ones(6))
    from feedrec.models.batch import PairBatch

    log_q = torch.log(torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]))
    loss, logits = TwoTowerTrain(model)(PairBatch(u, v, log_q))
    assert logits.shape == (6, 6) and torch.isfinite(loss)
    plain, same_logits = TwoTowerTrain(model, logq_correction=False)(PairBatch(u, v, log_q))
    torch.testing.assert_close(logits, same_logits)  # correction changes the loss only
    assert not torch.isclose(loss, plain)


def test_two_tower_random_negatives_join_the_candidates_and_get_gradients() -> None:
    from feedrec.models.batch import PairBatch

    model = TwoTower(TwoTowerConfig(num_rows=ROWS, embedding_dim=16))
    u = PartInputs.from_numpy(_inputs("user_tower"), "user_tower")
    v = PartInputs.from_numpy(_inputs("item_tower"), "item_tower")
    neg_inputs = _inputs("item_tower")
    neg_inputs.dense[:] = neg_inputs.dense[::-1] + 1.0  # other posts than the positives
    neg = PartInputs.from_numpy(neg_inputs, "item_tower")
    log_q = torch.full((6,), -3.0)
    in_batch, _ = TwoTowerTrain(model)(PairBatch(u, v, log_q))
    mixed, logits = TwoTowerTrain(model)(PairBatch(u, v, log_q, neg, torch.full((6,), -9.0)))
    # every row scores the 6 in-batch items, then the 6 random posts
    assert logits.shape == (6, 12)
    assert mixed > in_batch  # more negatives: a harder softmax
    neg.dense.requires_grad_(True)
    loss, _ = TwoTowerTrain(model)(PairBatch(u, v, log_q, neg, torch.full((6,), -9.0)))
    loss.backward()
    assert neg.dense.grad is not None and neg.dense.grad.abs().sum() > 0  # negatives are trained
    # the random negatives' correction is their own: a rarer proposal weighs them up
    rare, _ = TwoTowerTrain(model)(PairBatch(u, v, log_q, neg, torch.full((6,), -12.0)))
    assert rare > mixed
    # a slot with no post drawn (log q = +inf) drops out: all masked = in-batch only
    masked, _ = TwoTowerTrain(model)(PairBatch(u, v, log_q, neg, torch.full((6,), float("inf"))))
    torch.testing.assert_close(masked, in_batch)
    masked.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
