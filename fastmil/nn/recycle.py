"""MHIM-MIL's global recycle network: k learned-by-EMA queries cross-attend over each bag's recycled instances.

For each bag, ``k`` global query tokens attend (``H`` heads, pre-LayerNorm on queries and instances) over the
bag's randomly masked instances; the ``k`` outputs summarise what the random masking took away and join the kept
instances in the student's pooling. The queries are a buffer, not a parameter: they get no gradient and follow an
EMA of the bags' output tokens (:meth:`GlobalRecycleNetwork.update_queries`).

Implicit keys and values (cost ``O(n D k H)`` instead of the ``O(n D^2)`` of projecting every instance): with
``x_hat_i = gamma * (x_i - mu_i) / sigma_i + beta`` (LayerNorm) and ``q_jh`` the projected query ``j`` of head
``h``, the attention logit ``q_jh . (W_k^h x_hat_i + b_k^h) / sqrt(d)`` equals ``(W_k^h^T q_jh / sqrt(d)) . x_hat_i``
plus terms constant over ``i`` (which softmax ignores), so the logits of all instances are one ``[n, E] x [E, kH]``
product of the normalised rows ``n_i = (x_i - mu_i) / sigma_i`` with folded directions; the attention output is
``W_v^h (sum_i alpha_i x_hat_i) + b_v^h`` with ``sum_i alpha_i x_hat_i = gamma * sum_i alpha_i n_i + beta``. Both
sums come from :func:`fastmil.ops.normalized_attention_pool`, which never forms the normalised rows: no
``n x E`` normalised copy, keys or values are formed. :func:`recycle_reference` is the explicit computation.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops._segments import segment_sum
from ..ops.normalized_attention_pool import normalized_attention_pool

__all__ = ["GlobalRecycleNetwork", "recycle_reference"]


class GlobalRecycleNetwork(nn.Module):
    """``forward(h [N, E], offsets [B+1], mask bool [N], offsets_cpu=None) -> (tokens [B, k, E], valid bool [B])``.

    ``mask`` selects the instances each bag recycles (MHIM: the randomly masked ones); ``valid[b]`` is False for a
    bag with none, whose tokens are zero and must be ignored. Parameters: the query and instance LayerNorms and
    the q/k/v/output projections (trained with the student); buffer ``queries [k, E]`` (EMA, no gradient).
    """

    def __init__(self, dim: int, n_tokens: int = 5, n_heads: int = 8, query_momentum: float = 0.9999,
                 eps: float = 1e-5) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"the embedding dim {dim} must be divisible by the {n_heads} heads")
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        self.dim, self.n_tokens, self.n_heads, self.query_momentum = dim, n_tokens, n_heads, query_momentum
        self.norm_q, self.norm_x = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.register_buffer("queries", torch.randn(n_tokens, dim))

    def _logit_directions(self) -> torch.Tensor:
        """``[E, k H]``: column ``(j, h)`` is ``gamma * W_k^h^T q_jh / sqrt(d)``."""
        k, heads = self.n_tokens, self.n_heads
        d = self.dim // heads
        q = self.q_proj(self.norm_q(self.queries)).view(k, heads, d)
        directions = torch.einsum("khd,hde->khe", q, self.k_proj.weight.view(heads, d, self.dim)) / math.sqrt(d)
        return (directions * self.norm_x.weight).reshape(k * heads, self.dim).T

    def forward(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor, offsets_cpu: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_bags, k, heads = offsets.numel() - 1, self.n_tokens, self.n_heads
        d = self.dim // heads
        # sum_i alpha_i LN(x_i) = gamma * sum_i alpha_i n_i + beta (the weights sum to 1 in a non-empty bag)
        pooled, _ = normalized_attention_pool(h, self._logit_directions(), offsets, mask, self.norm_x.eps,
                                              offsets_cpu)  # [B, kH, E]
        valid = segment_sum(mask[:, None].to(pooled.dtype), offsets)[:, 0] > 0
        x_hat = self.norm_x.weight * pooled + self.norm_x.bias  # [B, kH, E]
        out = torch.einsum("bkhe,hde->bkhd", x_hat.view(n_bags, k, heads, self.dim),
                           self.v_proj.weight.view(heads, d, self.dim))
        out = out.reshape(n_bags, k, heads * d) + self.v_proj.bias
        tokens = self.out_proj(out)
        return tokens * valid[:, None, None].to(tokens.dtype), valid

    @torch.no_grad()
    def update_queries(self, tokens: torch.Tensor, valid: torch.Tensor, applied: torch.Tensor | None = None) -> None:
        """``queries <- m queries + (1 - m) tokens_b`` for each valid bag ``b`` in order (``m`` =
        ``query_momentum``), as one vectorised update: ``m^V queries + sum_b valid_b (1 - m) m^(after_b) tokens_b``
        with ``V`` valid bags and ``after_b`` valid bags after ``b``. Device arithmetic only (no boolean indexing,
        which would read the count of valid bags back to the host). ``applied`` (a 0-dim bool tensor, e.g. False
        when an fp16 step was skipped) leaves the queries as they are where False."""
        t = tokens.detach().to(self.queries.dtype)  # [B, k, E]
        m = self.query_momentum
        counted = valid.to(torch.float64)
        after = counted.sum() - counted.cumsum(0)  # valid bags after b
        coef = torch.where(valid, (1 - m) * torch.pow(m, after), 0.0).to(t.dtype)  # [B]
        share = torch.where(valid[:, None, None], t, 0.0) * coef[:, None, None]  # an invalid bag's tokens: 0
        updated = self.queries * torch.pow(m, counted.sum()).to(t.dtype) + share.sum(0)
        if applied is not None:
            updated = torch.where(applied, updated, self.queries)
        self.queries.copy_(updated)


def recycle_reference(
    net: GlobalRecycleNetwork, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The explicit computation (a loop over bags, LayerNorm, full keys/values, multi-head softmax attention):
    ``tokens [B, k, E]``, zero for a bag with nothing masked. In the dtype of ``h`` (use fp64)."""
    heads, d = net.n_heads, net.dim // net.n_heads
    q = net.q_proj(net.norm_q(net.queries.to(h.dtype))).view(net.n_tokens, heads, d).transpose(0, 1)  # [H, k, d]
    tokens = []
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x = h[lo:hi][mask[lo:hi]]
        if x.shape[0] == 0:
            tokens.append(h.new_zeros(net.n_tokens, net.dim))
            continue
        xn = net.norm_x(x)
        keys = net.k_proj(xn).view(-1, heads, d).transpose(0, 1)  # [H, n, d]
        values = net.v_proj(xn).view(-1, heads, d).transpose(0, 1)
        attn = torch.softmax(q @ keys.transpose(1, 2) / math.sqrt(d), dim=-1)  # [H, k, n]
        out = (attn @ values).transpose(0, 1).reshape(net.n_tokens, net.dim)
        tokens.append(net.out_proj(out))
    return torch.stack(tokens)
