"""Inference over store slides, split metrics, and early stopping on a monitored validation metric."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.batching import BagBatchSampler, BagLoader
from ..data.cache import CohortCache
from ..data.store import FeatureStore
from ..data.transfer import device_batches
from ..methods import Method
from .metrics import compute_metrics
from .step import autocast

__all__ = ["EVAL_INSTANCES_PER_STEP", "EarlyStopping", "predict_slides", "split_metrics"]

EVAL_INSTANCES_PER_STEP = 262_144
"""Instances packed into one inference step (bags are never split)."""


@torch.no_grad()
def predict_slides(
    method: Method, store: FeatureStore, slide_ids: Sequence[str], device: torch.device, *,
    keep_attention: bool = False, progress: bool = False, amp: str = "none", output: str = "probs",
    cache: CohortCache | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Class probabilities ``[S, C]`` (in ``slide_ids`` order; ``output="logits"``: the raw head outputs, e.g. the
    per-bin hazard logits of a survival run) and, optionally, per-slide attention ``{id: [N] or [N, H]}``, from
    ``method.predict`` in eval mode. ``cache``: the run's cohort cache (validation slides are read once)."""
    if output not in ("probs", "logits"):
        raise ValueError(f"output must be probs or logits, got {output!r}")
    method.eval()
    sampler = BagBatchSampler(store.sizes(slide_ids), max_instances_per_step=EVAL_INSTANCES_PER_STEP, shuffle=False)
    loader = BagLoader(store, slide_ids, sampler, neighbour_radius=method.neighbour_radius, cache=cache,
                       pin_memory=device.type == "cuda")
    probs: dict[str, np.ndarray] = {}
    attention: dict[str, np.ndarray] = {}
    batches = device_batches(loader, device)
    for bags in tqdm(batches, desc="predict", unit="step", total=len(loader), disable=None if progress else True,
                     leave=False):
        with autocast(amp, device):
            out = method.predict(bags)
        logits = out.logits.float()
        p = (torch.softmax(logits, dim=-1) if output == "probs" else logits).cpu().numpy()
        w = out.attention.float().cpu().numpy()
        off = bags.offsets_cpu.numpy()
        for b, sid in enumerate(bags.ids):
            probs[sid] = p[b]
            if keep_attention:
                attention[sid] = w[off[b] : off[b + 1]]
    return np.stack([probs[s] for s in slide_ids]) if slide_ids else np.zeros((0, 0)), attention


def split_metrics(
    method: Method, store: FeatureStore, ids: Sequence[str], labels: dict[str, int], device: torch.device,
    class_weight: torch.Tensor | None, amp: str = "none", cache: CohortCache | None = None,
) -> dict:
    """Metrics of ``method`` on the slides ``ids`` (``{"n": 0}`` for an empty split), with the (class-weighted)
    cross-entropy as ``loss``."""
    if not ids:
        return {"n": 0}
    probs, _ = predict_slides(method, store, ids, device, amp=amp, cache=cache)
    y = np.array([labels[s] for s in ids])
    metrics = compute_metrics(y, probs)
    logp = torch.log(torch.from_numpy(probs).clamp_min(1e-12))
    weight = None if class_weight is None else class_weight.cpu()
    metrics["loss"] = float(F.nll_loss(logp.float(), torch.from_numpy(y), weight=weight))
    return metrics


class EarlyStopping:
    """Track the best value of ``monitor`` (higher is better, except ``loss``) and the epochs since it."""

    def __init__(self, monitor: str, patience: int, best: float | None = None, best_epoch: int = -1,
                 bad_epochs: int = 0) -> None:
        self.monitor, self.patience = monitor, patience
        self.best, self.best_epoch, self.bad_epochs = best, best_epoch, bad_epochs

    def value(self, metrics: dict) -> float | None:
        """The monitored value; where it is undefined (``auc`` with one class in the split, ``c_index`` without a
        comparable pair) the negated loss stands in."""
        value = metrics.get(self.monitor)
        if self.monitor != "loss" and value is None and metrics.get("loss") is not None:
            return -metrics["loss"]
        return value

    def update(self, epoch: int, metrics: dict) -> bool:
        """Record an epoch's metrics; True when it is the best so far."""
        value = self.value(metrics)
        better = value is not None and (self.best is None or (value < self.best if self.monitor == "loss"
                                                              else value > self.best))
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def exhausted(self) -> bool:
        return self.bad_epochs >= self.patience
