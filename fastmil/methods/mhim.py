"""MHIM-MIL: masked hard instance mining with a momentum teacher (Tang et al., ICCV 2023 / IJCV 2025).

One training step on a packed batch (DESIGN.md section 4):

1. The teacher (same backbone; parameters an EMA of the student's) runs without gradient and without dropout on
   the whole bags: attention ``a_i``, embedded instances ``h_i``, bag embedding ``z_T``; class-aware instance
   probability ``s_i = max_c softmax_c(W_cls (a_i h_i) + b)``.
2. ``saliency_mask(s, high_ratio, random_ratio)``: the most salient instances are dropped (hard mining); a random
   share of the rest is not used directly but summarised by the global recycle network; the others are kept.
3. The student embeds all instances once; the recycle network's ``k`` tokens summarise each bag's randomly masked
   instances (implicit keys/values, ``O(n D k)``); the student pools its kept instances plus those tokens through
   the fused pooling op's mask (no gather or concatenation of the bag) and classifies: cross-entropy. The
   tokens pass through the backbone's ``activate_tokens`` (ABMIL: the ReLU + dropout of its embedding block) so
   that they sit where embedded instances sit: measured on the demo cohort, raw (signed) tokens took over the
   pooled vector under the consistency term and test AUC fell from 0.95 to 0.57.
4. Consistency: cross-entropy between ``softmax(z_T / 0.1)`` and ``log_softmax(z_S / 1.0)`` over embedding dims.
   Loss = CE + 0.5 consistency. After the optimiser step: the teacher EMA (one fused multi-tensor update; momentum
   0.9997, optionally rising to 1 on a cosine schedule) and the recycle queries' EMA of the step's tokens.
5. Inference: the student alone, no masking.

All state (student, teacher, recycle network and its queries) is in ``state_dict()``; masks are drawn from
``(run seed, epoch, step)``, so a resumed run replays them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._config import to_dict
from ..bags import Bags
from ..checkpoint import load_checkpoint
from ..nn import GlobalRecycleNetwork, MILOutput, build_model
from ..ops import saliency_mask
from .base import Method, StepContext, StepOutput, model_objective, register_method
from .ema import ema_update_

__all__ = ["MHIM", "teacher_momentum"]

BACKBONE_METHODS = ("embed_bags", "aggregate", "activate_tokens", "instance_logits", "embedding_dim")
"""What a backbone must have to be MHIM's student and teacher. ``aggregate(h, offsets, mask, *, offsets_cpu, tokens,
token_valid, sparse_grad)``: with ``sparse_grad=True`` the gradient it gives ``h`` may be a sparse tensor over the
unmasked rows (MHIM asks for it when the recycle network, which reads every row of ``h``, adds a dense one); a
backbone that transforms ``h`` before pooling it must then give a dense gradient (ignore the flag)."""


def teacher_momentum(base: float, schedule: str, progress: float) -> float:
    """The teacher's EMA momentum at ``progress`` in [0, 1]: constant, or rising from ``base`` to 1 on a
    half cosine (the BYOL schedule)."""
    if schedule == "constant":
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The masking seed of one step: a pure function of (run seed, epoch, step), so resumes replay masks."""
    return int(np.random.default_rng([seed, epoch, step, 97]).integers(0, 2**62))


def _load_run_model(run_dir: str, model: nn.Module, model_cfg) -> None:
    """Copy the model of a finished run's ``best.pt`` into ``model`` (the run's model config must match)."""
    best = load_checkpoint(os.path.join(run_dir, "best.pt"))
    signature = best.get("signature", {})
    if signature.get("model") != to_dict(model_cfg):
        raise ValueError(f"method.teacher_init: {run_dir} was trained with model {signature.get('model')}, this run "
                         f"uses {to_dict(model_cfg)}")
    state = {k.removeprefix("model."): v for k, v in best["method_state"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"method.teacher_init: {run_dir}/best.pt does not fit this model: {exc}") from exc


@register_method("mhim")
class MHIM(Method):
    """Masked hard instance mining around any backbone with ``embed_bags``/``aggregate``/``instance_logits``
    (ABMIL, the mean-pooling baseline, DSMIL, CLAM, TransMIL, the SRMIL network ``graphmil``). Logged terms: ``ce``,
    ``consistency``, ``salient_frac``, ``random_frac``, ``keep_frac`` (shares of the step's instances), and the
    student's own terms where its backbone has a published objective (DSMIL ``max_instance``, CLAM ``instance``)."""

    @dataclass
    class Config:
        """The ``method:`` config section of MHIM-MIL (defaults of DESIGN.md section 4)."""

        name: str = "mhim"
        high_ratio: float = 0.03  # share of each bag's instances masked as most salient (0.01-0.05 in the paper)
        random_ratio: float = 0.8  # share of the remaining instances masked at random and recycled
        teacher_momentum: float = 0.9997
        momentum_schedule: Literal["constant", "cosine"] = "constant"
        teacher_init: str | None = None  # a finished run folder whose best model initialises the teacher
        student_init: bool = True  # and the student: teacher and student must start in one embedding space
        recycle_tokens: int = 5  # k global queries of the recycle network (0: no recycling)
        recycle_heads: int = 8
        query_momentum: float = 0.9999
        consistency_weight: float = 0.5
        teacher_temperature: float = 0.1
        student_temperature: float = 1.0

        def __post_init__(self) -> None:
            for name in ("high_ratio", "random_ratio", "teacher_momentum", "query_momentum"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
            if self.recycle_tokens < 0 or self.recycle_heads < 1:
                raise ValueError("recycle_tokens must be >= 0 and recycle_heads >= 1")
            if self.teacher_temperature <= 0 or self.student_temperature <= 0 or self.consistency_weight < 0:
                raise ValueError("temperatures must be > 0 and consistency_weight >= 0")

    def __init__(self, model: nn.Module, teacher: nn.Module, config: Config) -> None:
        super().__init__(model, config)
        missing = [name for name in BACKBONE_METHODS if not hasattr(model, name)]
        if missing:
            raise TypeError(f"method mhim needs a backbone with {', '.join(BACKBONE_METHODS)}; "
                            f"{type(model).__name__} lacks {', '.join(missing)}")
        self.teacher = teacher.requires_grad_(False)
        self.recycle = (GlobalRecycleNetwork(model.embedding_dim, config.recycle_tokens, config.recycle_heads,
                                             config.query_momentum) if config.recycle_tokens > 0 else None)
        self._tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # the last step's, for the query EMA

    @classmethod
    def from_config(cls, config: Config, model_config, in_dim: int, n_classes: int) -> MHIM:
        student = build_model(model_config, in_dim, n_classes)
        teacher = build_model(model_config, in_dim, n_classes)
        if config.teacher_init:
            _load_run_model(config.teacher_init, teacher, model_config)
            if config.student_init:
                student.load_state_dict(teacher.state_dict())
        else:
            teacher.load_state_dict(student.state_dict())
        return cls(student, teacher, config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        if self.recycle is not None:
            params += list(self.recycle.parameters())
        return [p for p in params if p.requires_grad]

    @torch.no_grad()
    def _teacher_pass(self, bags: Bags) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher on the whole bags, without dropout: its bag embeddings ``[B, E]`` and the class-aware
        instance probabilities ``[N]`` (its ``[N, E]`` instance embeddings are freed here, before the student)."""
        self.teacher.eval()
        out = self.teacher.forward_all(bags)
        salience = torch.softmax(self.teacher.instance_logits(out).float(), -1).amax(-1)
        return out.bag_embedding, salience

    def training_step(self, bags: Bags, ctx: StepContext) -> StepOutput:
        return self.mhim_step(bags, ctx, lambda: self.model.embed_bags(bags))

    def mhim_step(self, bags: Bags, ctx: StepContext, embed: Callable[[], torch.Tensor]) -> StepOutput:
        """The MHIM loss of one step; ``embed()`` gives the student's instance embeddings ``[N, E]`` and is called
        after the teacher pass, so the teacher's activations are freed before the student's exist."""
        cfg = self.config
        z_teacher, salience = self._teacher_pass(bags)
        masks = saliency_mask(salience, bags.offsets, cfg.high_ratio, cfg.random_ratio,
                              seed=step_seed(ctx.seed, ctx.epoch, ctx.step), offsets_cpu=bags.offsets_cpu)
        h = embed()
        tokens = valid = None
        if self.recycle is not None:
            raw, valid = self.recycle(h, bags.offsets, masks.random, bags.offsets_cpu)
            self._tokens = (raw.detach(), valid)
            tokens = self.model.activate_tokens(raw)
        # with the recycle network reading every row of h (its gradient dense), the pooling of the kept rows may
        # return theirs as a sparse tensor: autograd then writes those rows into the dense gradient
        out: MILOutput = self.model.aggregate(h, bags.offsets, masks.keep, offsets_cpu=bags.offsets_cpu,
                                              tokens=tokens, token_valid=valid, sparse_grad=self.recycle is not None)
        supervised, terms = model_objective(self.model, out, bags, ctx)
        target = torch.softmax(z_teacher.float() / cfg.teacher_temperature, -1)
        consistency = -(target * F.log_softmax(out.bag_embedding.float() / cfg.student_temperature, -1)).sum(-1).mean()
        n = max(1, bags.n_instances)
        terms.update({"consistency": consistency.detach(), "salient_frac": masks.salient.sum() / n,
                      "random_frac": masks.random.sum() / n, "keep_frac": masks.keep.sum() / n})
        return StepOutput(supervised + cfg.consistency_weight * consistency, terms)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        cfg = self.config
        momentum = teacher_momentum(cfg.teacher_momentum, cfg.momentum_schedule, ctx.progress)
        ema_update_(list(self.teacher.parameters()), list(self.model.parameters()), momentum, ctx.step_applied)
        if self.recycle is not None and self._tokens is not None:
            self.recycle.update_queries(*self._tokens, applied=ctx.step_applied)
            self._tokens = None
