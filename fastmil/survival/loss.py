"""The discrete-time survival loss and risk score (Zadeh & Schmid, 2020; the form MIL survival code uses).

With ``K`` time bins, logits ``l [P, K]`` per patient, hazards ``h_k = sigmoid(l_k)``, survival past bin ``k``
``S_k = prod_{j <= k} (1 - h_j)`` (``S_{-1} = 1``), a patient whose time falls in bin ``y`` contributes

    uncensored (event seen in bin y):   -log S_{y-1} - log h_y
    censored   (alive at end of bin y): -log S_y

and the loss is ``(1 - alpha) (uncensored + censored) + alpha uncensored``, averaged over patients: ``alpha`` > 0
weights the patients with an observed event more. Everything is computed from ``logsigmoid`` in log space (no
``log(1 - h)`` of a rounded ``h``). The risk score is ``-sum_k S_k`` (higher = earlier event), the
negative of the expected number of bins survived.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["group_logits", "risk_from_logits", "survival_nll"]


def group_logits(logits: torch.Tensor, groups: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
    """Mean of the rows of ``logits [B, K]`` per group: ``groups int64 [B]`` in ``[0, G)`` -> ``[G, K]`` (the
    dtype of ``logits``; differentiable). A patient's slides are one group."""
    if groups.dim() != 1 or groups.shape[0] != logits.shape[0]:
        raise ValueError(f"groups must be [B] = [{logits.shape[0]}], got {tuple(groups.shape)}")
    n = int(groups.max()) + 1 if n_groups is None else n_groups
    sums = logits.new_zeros(n, logits.shape[1]).index_add(0, groups, logits)
    counts = torch.bincount(groups, minlength=n).to(logits.dtype)
    if (counts == 0).any():
        raise ValueError("group_logits: a group has no rows")
    return sums / counts[:, None]


def survival_nll(
    logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, alpha: float = 0.0
) -> torch.Tensor:
    """Mean censored discrete-time NLL (module docstring) of ``logits [P, K]`` (fp32 or fp64; computed in fp32 at
    least) for patients in time bins ``bins int64 [P]`` with ``events [P]`` (bool or 0/1: 1 = event observed,
    0 = censored). A scalar tensor."""
    if logits.dim() != 2 or bins.shape != logits.shape[:1] or events.shape != logits.shape[:1]:
        raise ValueError(f"survival_nll: logits [P, K], bins [P] and events [P] expected, got {tuple(logits.shape)}, "
                         f"{tuple(bins.shape)}, {tuple(events.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = logits.shape[1]
    if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) >= k):
        raise ValueError(f"survival_nll: time bins must be in [0, {k}), got {sorted(set(bins.tolist()))}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    log_h = F.logsigmoid(x)
    log_s = torch.cumsum(F.logsigmoid(-x), dim=1)  # log S_k
    log_s_before = torch.cat([log_s.new_zeros(x.shape[0], 1), log_s[:, :-1]], dim=1)  # log S_{k-1}
    y = bins[:, None].long()
    event = events.to(x.dtype)
    uncensored = -event * (log_s_before.gather(1, y)[:, 0] + log_h.gather(1, y)[:, 0])
    censored = -(1.0 - event) * log_s.gather(1, y)[:, 0]
    return ((1.0 - alpha) * (uncensored + censored) + alpha * uncensored).mean()


def risk_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``-sum_k S_k`` per row of ``logits [P, K]`` -> ``[P]`` (fp32/fp64): higher means an earlier event."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return -torch.exp(torch.cumsum(F.logsigmoid(-x), dim=1)).sum(1)
