"""Per-head Platt calibration of the ranker, fitted on held-out rows after training.

A multi-task ranker's heads drift off calibration (shared layers, class imbalance, early stop);
the value model adds probabilities across heads, so each must mean what it says. Platt scaling
(a 2-parameter logistic fit on the head's logit) keeps the ranking of each head intact.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_platt(
    logits: np.ndarray, labels: np.ndarray, *, max_iter: int = 100
) -> tuple[float, float]:
    """(scale, bias) minimising the log loss of ``sigmoid(scale * logit + bias)``.

    Args:
        logits: float [N] raw logits of one head; labels: {0, 1} [N].
    """
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if len(x) == 0 or y.min() == y.max():
        return 1.0, 0.0  # nothing to fit against: leave the head as it is
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * x + params[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, bias = params.detach().tolist()
    return float(scale), float(bias)


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, H] logits and labels -> float32 [H, 2]: (scale, bias) per head, as in ``Ranker``."""
    rows = [fit_platt(logits[:, h], labels[:, h]) for h in range(logits.shape[1])]
    return np.asarray(rows, dtype=np.float32)
