"""Instance-level losses of MIL backbones: CLAM's instance clustering loss on its top and bottom attended instances."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["INSTANCE_LOSSES", "instance_loss", "smooth_top1_svm"]

INSTANCE_LOSSES = ("svm", "ce")


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """The smooth top-1 SVM loss of Berrada, Zisserman & Kumar (ICLR 2018), CLAM's default instance loss, averaged
    over rows: ``tau * log sum_j exp((logits_j + alpha [j != y]) / tau) - logits_y``.

    ``logits [n, K]`` (any float dtype; computed in fp32, fp64 for fp64), ``target`` int64 ``[n]`` in ``[0, K)``.
    As ``tau -> 0`` it tends to the multi-class hinge ``max_j (logits_j + alpha [j != y]) - logits_y``."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"smooth_top1_svm: logits must be [n, K] and target [n], got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    if tau <= 0:
        raise ValueError(f"smooth_top1_svm: tau must be > 0, got {tau}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    margin = alpha * (1.0 - F.one_hot(target, x.shape[1]).to(acc))
    return (tau * torch.logsumexp((x + margin) / tau, dim=1) - x.gather(1, target[:, None])[:, 0]).mean()


def instance_loss(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The instance loss ``name`` (``"svm"``: :func:`smooth_top1_svm` with alpha = tau = 1, as CLAM uses it;
    ``"ce"``: cross-entropy) of ``logits [n, K]`` against ``target [n]``, averaged over rows."""
    if name == "svm":
        return smooth_top1_svm(logits, target)
    if name == "ce":
        return F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, target)
    raise ValueError(f"instance loss must be one of {INSTANCE_LOSSES}, got {name!r}")
