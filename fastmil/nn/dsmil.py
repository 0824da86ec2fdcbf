"""DSMIL (Li, Li & Eliceiri, CVPR 2021): dual-stream MIL on packed ragged bags.

Per bag, over its unmasked instances ``h_i`` (embedded: ``Linear(D -> E) + ReLU + Dropout``, as MHIM-MIL's DSMIL):

- instance stream: ``c_i = W_inst h_i + b`` ``[C]``; the *critical instance* of class ``k`` is the bag's instance
  with the largest ``c_ik`` (ties: the lowest row); the max-instance logits are those maxima, ``[C]``;
- bag stream: queries ``q_i = q(h_i)`` (``Linear(E, 128) + ReLU + Linear(128, 128) + Tanh``); the attention of
  instance ``i`` for class ``k`` is the softmax over the bag of ``q_i . q(h_crit_k) / sqrt(128)``; the bag
  representation ``B_k = sum_i a_ik h_i`` ``[C, E]`` (values are the instances themselves, the published default);
  the bag logits are a linear map of all of ``B`` (``C E -> C``, the published ``Conv1d(C, C, kernel_size=E)``).

``logits`` = the mean of bag and max-instance logits (how MHIM-MIL's code combines them for training and
evaluation); the training objective is the published ``0.5 CE(bag) + 0.5 CE(max-instance)`` (``bag_weight``),
logged as ``ce`` and ``max_instance``. The heatmap attention is each instance's attention for its bag's predicted
class. No padding: critical instances come from segment reductions over the packed rows, the per-bag query products
from a loop over the bags' row ranges, the pooling from :func:`fastmil.ops.attention_pool` with one head per class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..bags import Bags
from ..ops import attention_pool
from ..ops._segments import bag_index
from ..ops._tiles import check_offsets, host_offsets
from .attention import pool_with_tokens, predicted_class_attention
from .base import EmbeddedMIL, check_sizes
from .embed import EmbedBlock
from .output import MILOutput
from .registry import register_model

__all__ = ["DSMIL", "critical_instances"]


def critical_instances(logits: torch.Tensor, offsets: torch.Tensor,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bag and class, the row with the largest instance logit among the bag's unmasked rows (ties: the lowest
    row). ``logits [N, C]``, ``offsets [B+1]`` -> ``(rows int64 [B, C], found bool [B, C])``; ``rows`` is 0 where
    a bag has no unmasked row (``found`` False). Segment reductions on the device, no host synchronisation; a NaN
    logit is never chosen."""
    n, classes = logits.shape
    n_bags = offsets.numel() - 1
    values = logits.detach()
    eligible = ~torch.isnan(values) if mask is None else ~torch.isnan(values) & mask[:, None]
    values = values.masked_fill(~eligible, float("-inf"))
    bag = bag_index(offsets, n)[:, None].expand(n, classes)
    top = values.new_full((n_bags, classes), float("-inf")).scatter_reduce(0, bag, values, "amax")
    at_top = eligible & (values == top.gather(0, bag))
    row = torch.arange(n, device=logits.device)[:, None].expand(n, classes)
    first = torch.full((n_bags, classes), n, dtype=torch.int64, device=logits.device).scatter_reduce(
        0, bag, torch.where(at_top, row, n), "amin")
    found = first < n
    return torch.where(found, first, 0), found


class _CriticalQueryPool:
    """One DSMIL pass's pooling, in the interface :func:`pool_with_tokens` pools through: the scores of a bag's rows
    (``[N, C]``, computed once) and of its extra tokens (``scores(tokens [B, k, E]) -> [B, k, C]``) are their queries
    against the bag's critical queries ``[B, C, Q]``, over ``sqrt(Q)``."""

    def __init__(self, query: nn.Module, critical_queries: torch.Tensor, row_scores: torch.Tensor) -> None:
        self.query, self.critical_queries, self.row_scores = query, critical_queries, row_scores

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query(tokens)
        return torch.einsum("bkq,bcq->bkc", q, self.critical_queries.to(q.dtype)) / math.sqrt(q.shape[-1])

    def __call__(self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None,
                 offsets_cpu: torch.Tensor | None = None, return_lse: bool = False) -> tuple[torch.Tensor, ...]:
        return attention_pool(self.row_scores, h, offsets, mask, offsets_cpu=offsets_cpu, return_lse=return_lse)


@register_model("dsmil")
class DSMIL(EmbeddedMIL):
    """DSMIL on packed bags (module docstring). ``forward(bags)`` or ``forward(features [N, D], offsets [B+1],
    mask [N] | None)`` -> ``(logits [B, C], attention [N])``; ``forward_all`` -> :class:`MILOutput` with
    ``bag_embedding`` ``[B, C E]`` (the flattened ``B``) and extras ``bag_logits``, ``max_logits`` ``[B, C]``,
    ``instance_logits`` ``[N, C]``, ``class_attention`` ``[N, C]``."""

    @dataclass
    class Config:
        """The ``model:`` config section of DSMIL."""

        name: str = "dsmil"
        embed_dim: int = 512
        query_dim: int = 128
        nonlinear_query: bool = True  # Linear + ReLU + Linear + Tanh (the published default); False: one Linear
        dropout: float = 0.25
        bag_weight: float = 0.5  # loss = bag_weight CE(bag logits) + (1 - bag_weight) CE(max-instance logits)

        def __post_init__(self) -> None:
            check_sizes(embed_dim=self.embed_dim, query_dim=self.query_dim, dropout=self.dropout)
            if not 0.0 <= self.bag_weight <= 1.0:
                raise ValueError(f"bag_weight must be in [0, 1], got {self.bag_weight}")

    def __init__(self, in_dim: int, embed_dim: int = 512, n_classes: int = 2, query_dim: int = 128,
                 nonlinear_query: bool = True, dropout: float = 0.25, bag_weight: float = 0.5) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.embed = EmbedBlock(in_dim, embed_dim, dropout)
        self.instance_classifier = nn.Linear(embed_dim, n_classes)
        self.query = (nn.Sequential(nn.Linear(embed_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim),
                                    nn.Tanh()) if nonlinear_query else nn.Linear(embed_dim, query_dim))
        self.bag_classifier = nn.Linear(n_classes * embed_dim, n_classes)
        self.n_classes, self.bag_weight = n_classes, bag_weight

    @classmethod
    def from_config(cls, config: Config, in_dim: int, n_classes: int) -> DSMIL:
        return cls(in_dim, embed_dim=config.embed_dim, n_classes=n_classes, query_dim=config.query_dim,
                   nonlinear_query=config.nonlinear_query, dropout=config.dropout, bag_weight=config.bag_weight)

    def aggregate(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None, *,
        offsets_cpu: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
        token_valid: torch.Tensor | None = None, sparse_grad: bool = False,
    ) -> MILOutput:
        """Both streams over each bag's unmasked rows of ``h [N, E]`` and, when given, its extra ``tokens
        [B, k, E]`` (``token_valid [B]``), which count as instances of the bag (after its rows: a row wins a tie
        for critical instance). ``sparse_grad`` is ignored (the instance stream reads every row)."""
        bounds = host_offsets(offsets, offsets_cpu)
        check_offsets(bounds, h.shape[0])
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        instance_logits = self.instance_classifier(h)  # [N, C]
        rows, found = critical_instances(instance_logits, offsets, mask)
        if h.shape[0] == 0:  # no rows in the whole batch: nothing to gather from
            row_max = instance_logits.new_zeros(rows.shape, dtype=acc)
            critical = h.new_zeros(*rows.shape, h.shape[1])
        else:
            row_max = instance_logits.gather(0, rows).to(acc)  # [B, C]
            critical = h[rows]  # [B, C, E]
        if tokens is not None:
            token_logits = self.instance_classifier(tokens).to(acc)  # [B, k, C]
            usable = torch.ones(tokens.shape[0], dtype=torch.bool, device=h.device) if token_valid is None \
                else token_valid
            token_logits = token_logits.masked_fill(~usable[:, None, None], float("-inf"))
            best = token_logits.detach().argmax(1)  # [B, C], the first of equal maxima
            token_max = token_logits.gather(1, best[:, None])[:, 0]
            from_token = usable[:, None] & (token_max.detach() > torch.where(found, row_max.detach(), -torch.inf))
            critical = torch.where(from_token[..., None],
                                   tokens.gather(1, best[..., None].expand(-1, -1, tokens.shape[2])), critical)
            row_max, found = torch.where(from_token, token_max, row_max), found | from_token
        max_logits = torch.where(found, row_max, torch.zeros_like(row_max))
        critical_queries = self.query(critical)  # [B, C, Q]
        queries = self.query(h)  # [N, Q]
        scale = 1.0 / math.sqrt(queries.shape[1])
        edges = bounds.tolist()
        row_scores = torch.cat([queries[lo:hi] @ critical_queries[b].T for b, (lo, hi)
                                in enumerate(zip(edges[:-1], edges[1:]))]) * scale  # [N, C]
        pool = _CriticalQueryPool(self.query, critical_queries, row_scores)
        pooled, weights = pool_with_tokens(pool, h, offsets, mask, tokens, token_valid, offsets_cpu)  # [B, C, E]
        embedding = pooled.flatten(1).to(h.dtype)
        bag_logits = self.bag_classifier(embedding)
        logits = 0.5 * (bag_logits + max_logits.to(bag_logits.dtype))
        return MILOutput(logits, predicted_class_attention(weights, logits, offsets), embedding, h,
                         {"bag_logits": bag_logits, "max_logits": max_logits, "instance_logits": instance_logits,
                          "class_attention": weights})

    def instance_logits(self, out: MILOutput) -> torch.Tensor:
        """``[N, C]``: the instance classifier's logits (MHIM's class-aware instance probability is their max
        softmax)."""
        return out.extras["instance_logits"]

    def objective(self, out: MILOutput, bags: Bags, ctx) -> dict[str, tuple[float, torch.Tensor]]:
        """``bag_weight CE(bag logits) + (1 - bag_weight) CE(max-instance logits)`` (the task's label loss in place of
        CE), as ``{"ce": ..., "max_instance": ...}``."""
        return {"ce": (self.bag_weight, ctx.supervised_loss(out.extras["bag_logits"], bags)),
                "max_instance": (1.0 - self.bag_weight, ctx.supervised_loss(out.extras["max_logits"], bags))}
