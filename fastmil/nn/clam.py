"""CLAM (Lu et al., Nature Biomedical Engineering 2021), single- and multi-branch, on packed ragged bags.

``Linear(D -> E) + ReLU + Dropout`` embeds the instances; gated attention (``E -> 256``, tanh and sigmoid gates)
gives one score column (``clam_sb``) or one per class (``clam_mb``); each column is softmaxed over the bag's
unmasked instances and pools them. Bag logits: ``clam_sb`` one ``Linear(E, C)`` of the pooled vector; ``clam_mb``
class ``k``'s logit is ``w_k . pooled_k + b_k``, its own linear map of its own branch.

Instance clustering (training only): for each class ``k`` there is an instance classifier ``Linear(E, 2)``. In a
bag of class ``k`` the ``k_sample`` most attended instances (of branch ``k``; ``clam_sb``: the one branch) are
its positives and the ``k_sample`` least attended its negatives; with ``subtyping`` (mutually exclusive classes)
the ``k_sample`` most attended instances of every *other* class's branch are that class's negatives too. Loss:
smooth top-1 SVM (``instance_loss: svm``, alpha = tau = 1, CLAM's default) or cross-entropy (``ce``), summed over
classes (divided by the number of classes with ``subtyping``), averaged over the batch's bags. Objective:
``bag_weight CE + (1 - bag_weight) instance`` (published 0.7), logged as ``ce`` and ``instance``.

Deviations from the published code, on purpose: a bag with fewer than ``k_sample`` unmasked instances (where the
published ``topk`` fails) takes ``n // 2`` positives and as many negatives (none for a bag of one) and, out of
class, its ``n`` instances; dropout is the embedding's (the published attention gates' own dropout is not there).
Like the published code, a bag of ``k_sample`` to ``2 k_sample - 1`` instances has overlapping positives and
negatives. The heatmap attention is the weight of the one branch (``clam_sb``) or of the bag's predicted class's
branch (``clam_mb``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..bags import Bags
from ..ops._segments import rows_per_bag
from ..ops._tiles import host_offsets
from .attention import GatedBranchPool, pool_with_tokens, predicted_class_attention
from .base import EmbeddedMIL, check_sizes, weighted_instance_logits
from .embed import EmbedBlock
from .instance_losses import INSTANCE_LOSSES, instance_loss
from .output import MILOutput
from .registry import register_model

__all__ = ["CLAM_MB", "CLAM_SB", "clustering_instances"]


def clustering_instances(weights: torch.Tensor, rows: torch.Tensor, k_sample: int, negatives: bool) -> torch.Tensor:
    """Rows of one bag chosen for instance clustering from one branch's attention ``weights [N]`` over the bag's
    unmasked ``rows``: the ``k`` most attended, then (``negatives``) the ``k`` least attended, with ``k = k_sample``
    when the bag has at least ``k_sample`` rows (the two sets may overlap, as published), else ``n // 2`` with
    ``negatives`` and ``n`` without. int64 ``[k]`` or ``[2k]``, absolute row numbers."""
    n = rows.numel()
    k = k_sample if n >= k_sample else (n // 2 if negatives else n)
    if k == 0:
        return rows[:0]
    w = weights[rows].detach()
    top = rows[torch.topk(w, k).indices]
    return torch.cat([top, rows[torch.topk(-w, k).indices]]) if negatives else top


class _CLAM(EmbeddedMIL):
    """CLAM with ``branches`` attention columns (1: ``clam_sb``, C: ``clam_mb``); see the module docstring.
    ``forward(bags)`` or ``forward(features [N, D], offsets [B+1], mask [N] | None)`` -> ``(logits [B, C],
    attention [N])``; ``forward_all`` -> :class:`MILOutput` with ``bag_embedding`` ``[B, branches E]`` and extras
    ``branch_weights`` ``[N, branches]`` (and ``mask`` when one was given)."""

    multi_branch = False

    @dataclass
    class Config:
        """The ``model:`` config section of CLAM (``name``: ``clam_sb`` or ``clam_mb``)."""

        name: str = "clam_sb"
        embed_dim: int = 512
        attn_dim: int = 256
        dropout: float = 0.25
        k_sample: int = 8  # positives (and negatives) per bag and class for instance clustering
        instance_loss: Literal["svm", "ce"] = "svm"
        bag_weight: float = 0.7  # loss = bag_weight CE + (1 - bag_weight) instance clustering
        subtyping: bool = False  # mutually exclusive classes: other classes' branches also give negatives

        def __post_init__(self) -> None:
            check_sizes(embed_dim=self.embed_dim, attn_dim=self.attn_dim, k_sample=self.k_sample,
                        dropout=self.dropout)
            if self.instance_loss not in INSTANCE_LOSSES:
                raise ValueError(f"instance_loss must be one of {INSTANCE_LOSSES}, got {self.instance_loss!r}")
            if not 0.0 <= self.bag_weight <= 1.0:
                raise ValueError(f"bag_weight must be in [0, 1], got {self.bag_weight}")

    def __init__(self, in_dim: int, embed_dim: int = 512, attn_dim: int = 256, n_classes: int = 2,
                 dropout: float = 0.25, k_sample: int = 8, instance_loss: str = "svm", bag_weight: float = 0.7,
                 subtyping: bool = False) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.embed = EmbedBlock(in_dim, embed_dim, dropout)
        self.pool = GatedBranchPool(embed_dim, attn_dim, n_classes if self.multi_branch else 1)
        self.classifier = nn.Linear(embed_dim, n_classes)  # clam_mb: row k is class k's own linear map
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(n_classes))
        self.n_classes, self.k_sample, self.instance_loss = n_classes, k_sample, instance_loss
        self.bag_weight, self.subtyping = bag_weight, subtyping

    @classmethod
    def from_config(cls, config: Config, in_dim: int, n_classes: int) -> _CLAM:
        return cls(in_dim, embed_dim=config.embed_dim, attn_dim=config.attn_dim, n_classes=n_classes,
                   dropout=config.dropout, k_sample=config.k_sample, instance_loss=config.instance_loss,
                   bag_weight=config.bag_weight, subtyping=config.subtyping)

    def aggregate(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None, *,
        offsets_cpu: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
        token_valid: torch.Tensor | None = None, sparse_grad: bool = False,
    ) -> MILOutput:
        """Pool each bag's unmasked rows of ``h [N, E]`` and, when given, its extra ``tokens [B, k, E]`` (they
        share each branch's softmax; instance clustering picks rows only) and classify. ``sparse_grad`` reaches the
        one-branch pool (the fused op); the multi-branch pool returns a dense gradient."""
        pooled, weights = pool_with_tokens(self.pool, h, offsets, mask, tokens, token_valid, offsets_cpu,
                                           sparse_grad)
        pooled = pooled.to(h.dtype)  # [B, branches, E]
        if self.multi_branch:
            logits = (pooled * self.classifier.weight).sum(-1) + self.classifier.bias
            attention = predicted_class_attention(weights, logits, offsets)
        else:
            logits, attention = self.classifier(pooled[:, 0]), weights[:, 0]
        extras = {"branch_weights": weights} if mask is None else {"branch_weights": weights, "mask": mask}
        return MILOutput(logits, attention, pooled.flatten(1), h, extras)

    def instance_logits(self, out: MILOutput) -> torch.Tensor:
        """``[N, C]``: each class's bag classifier applied to the instance weighted by its branch's attention,
        ``w_k (a_ik h_i) + b_k`` (MHIM's class-aware instance probability is their max softmax)."""
        weights = out.extras["branch_weights"]  # [N, 1] (every class weighted by the one branch) or [N, C]
        return weighted_instance_logits(self.classifier, out.instance_embedding,
                                        weights[:, 0] if weights.shape[1] == 1 else weights)

    def clustering_loss(self, out: MILOutput, offsets_cpu: torch.Tensor, labels: list[int]) -> torch.Tensor:
        """The instance clustering loss of the batch (module docstring), averaged over its bags."""
        h, weights = out.instance_embedding, out.extras["branch_weights"]
        bag_rows = rows_per_bag(out.extras.get("mask"), offsets_cpu.tolist(), h.device)
        total = h.new_zeros((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
        for label, unmasked in zip(labels, bag_rows):
            for k, classifier in enumerate(self.instance_classifiers):
                if k != label and not self.subtyping:
                    continue
                branch = weights[:, k if self.multi_branch else 0]
                rows = clustering_instances(branch, unmasked, self.k_sample, negatives=k == label)
                if rows.numel() == 0:
                    continue
                target = torch.zeros(rows.numel(), dtype=torch.int64, device=h.device)
                if k == label:
                    target[: rows.numel() // 2] = 1
                term = instance_loss(self.instance_loss, classifier(h[rows]), target)
                total = total + (term / self.n_classes if self.subtyping else term)
        return total / max(1, len(labels))

    def objective(self, out: MILOutput, bags: Bags, ctx) -> dict[str, tuple[float, torch.Tensor]]:
        """``bag_weight CE + (1 - bag_weight) instance clustering`` as ``{"ce": ..., "instance": ...}``. The
        clustering needs class labels: with a task's own loss (``task: survival``) set ``bag_weight: 1``."""
        terms = {"ce": (self.bag_weight, ctx.supervised_loss(out.logits, bags))}
        if self.bag_weight < 1.0:
            if ctx.loss_fn is not None or bags.labels is None:
                raise ValueError(f"{type(self).__name__}'s instance clustering needs class labels; with a task's own "
                                 "loss (survival) set model.bag_weight=1")
            labels = bags.labels.tolist()
            terms["instance"] = (1.0 - self.bag_weight,
                                 self.clustering_loss(out, host_offsets(bags.offsets, bags.offsets_cpu), labels))
        return terms

@register_model("clam_sb")
class CLAM_SB(_CLAM):  # noqa: N801 (the published name)
    """CLAM single-branch: one attention branch shared by all classes, ``Linear(E, C)`` on its pooled vector."""

    multi_branch = False


@register_model("clam_mb")
class CLAM_MB(_CLAM):  # noqa: N801 (the published name)
    """CLAM multi-branch: one attention branch per class, class ``k``'s logit from its own branch's pooled vector."""

    multi_branch = True

    @dataclass
    class Config(_CLAM.Config):
        name: str = "clam_mb"
