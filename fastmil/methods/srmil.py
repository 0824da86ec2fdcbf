"""SRMIL: spatially regularised MIL (Wu et al., WACV 2026), and its combination with MHIM-MIL.

One SRMIL training step on a packed batch (DESIGN.md section 4), on the ``graphmil`` network:

1. The stencil graph of every slide (``bags.neighbours``, cached in the store; radius 2 = 5 x 5 window) with self
   loops.
2. Label-free stream: 70% of each bag's instances, uniformly at random (exact count, reproducible from the run
   seed, epoch and step), are replaced by a learned mask token in input space, encoded, and decoded back to the
   input width by :class:`fastmil.nn.GraphDecoder` (which re-masks them with its own token); loss =
   :func:`fastmil.ops.reconstruction_loss` on the masked rows against the raw features.
3. Label-guided stream: the supernode readout over the encoder outputs -> MLP -> cross-entropy, on the masked view
   (``ce_masked``) and on the clean view (``ce_clean``).
4. Loss = 0.2 (ce_masked + ce_clean) + 1.8 recon (weights configurable). Inference: the clean view alone.

The reformer ``Linear(D -> D)`` and the first encoder layer's projections are linear and act row by row: the
reformer is folded into that layer's weights (no ``N x D x D`` GEMM at all), and the masked view's first-layer
parts are the clean view's with the masked rows replaced by the mask token's, so one GEMM over the bag serves both
views (the published code runs the reformer and the projections once per view).

``mhim+srmil`` puts both regularisers on one ``graphmil`` student: the MHIM step (EMA teacher, salient instances
dropped, random ones recycled, consistency) on the clean view, plus SRMIL's masked view with its reconstruction
and ``ce_masked``. Loss = ``ce_weight (ce + ce_masked + consistency_weight consistency) + recon_weight recon``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..bags import Bags
from ..nn import GraphDecoder, GraphMIL, bag_neighbours
from ..nn.graph import LayerParts
from ..ops import saliency_mask
from .base import Method, StepContext, StepOutput, register_method
from .mhim import MHIM

__all__ = ["MHIMSRMIL", "MaskedReconstruction", "SRMIL", "random_instance_mask"]


def random_instance_mask(bags: Bags, ratio: float, seed: int) -> torch.Tensor:
    """bool ``[N]``: exactly ``floor(ratio * n)`` instances of each bag, uniformly at random, reproducible from
    ``seed`` (the counter-based random selection of :func:`fastmil.ops.saliency_mask`; no host sync on a GPU)."""
    zeros = torch.zeros(bags.n_instances, device=bags.device)
    return saliency_mask(zeros, bags.offsets, 0.0, ratio, seed=seed, offsets_cpu=bags.offsets_cpu).random


def _stream_seed(seed: int, epoch: int, step: int) -> int:
    """The masking seed of SRMIL's random view at one step (independent of MHIM's masks)."""
    return int(np.random.default_rng([seed, epoch, step, 131]).integers(0, 2**62))


def _check_graph_model(model: nn.Module, method: str) -> None:
    if not isinstance(model, GraphMIL):
        raise TypeError(f"method {method} trains the spatial network: set model.name=graphmil (got "
                        f"{type(model).__name__})")


class MaskedReconstruction(nn.Module):
    """SRMIL's label-free stream around a :class:`GraphMIL`: the input-space mask token and the decoder."""

    def __init__(self, model: GraphMIL, decoder_layers: int = 2) -> None:
        super().__init__()
        width = model.embedding_dim
        self.mask_token = nn.Parameter(torch.zeros(model.in_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        heads, head_dim = model.readout.heads, model.readout.head_dim
        self.decoder = GraphDecoder(width, model.in_dim, heads, head_dim, layers=decoder_layers,
                                    negative_slope=model.encoder[0].negative_slope,
                                    backend=model.encoder[0].backend)

    def masked_parts(self, model: GraphMIL, clean: LayerParts, masked: torch.Tensor) -> LayerParts:
        """The first encoder layer's linear parts of the masked view: the clean view's, with the masked rows
        replaced by the mask token's (all row-wise linear maps: no masked copy of the bag, no second GEMM)."""
        token = model.input_parts(self.mask_token[None])
        return clean.where(masked, token)

    def forward(self, model: GraphMIL, clean: LayerParts, features: torch.Tensor, nbr: torch.Tensor,
                masked: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the masked view and reconstruct it: ``(encoder outputs [N, E], reconstruction loss)``."""
        h_masked = model.encode_parts(self.masked_parts(model, clean, masked), nbr)
        return h_masked, self.decoder.reconstruction_loss(h_masked, nbr, masked, features, alpha)


@dataclass
class _SRMILOptions:
    mask_ratio: float = 0.7  # share of each bag's instances masked in the label-free stream
    recon_alpha: float = 1.0  # exponent of the scaled cosine error
    decoder_layers: int = 2
    ce_weight: float = 0.2
    recon_weight: float = 1.8

    def check_srmil(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.recon_alpha <= 0 or self.decoder_layers < 1 or self.ce_weight < 0 or self.recon_weight < 0:
            raise ValueError("recon_alpha must be > 0, decoder_layers >= 1, ce_weight and recon_weight >= 0")


@register_method("srmil")
class SRMIL(Method):
    """Spatially regularised MIL on ``model: graphmil``. Logged terms: ``ce_masked``, ``ce_clean``, ``recon``."""

    default_model = "graphmil"

    @dataclass
    class Config(_SRMILOptions):
        """The ``method:`` config section of SRMIL (defaults of DESIGN.md section 4)."""

        name: str = "srmil"

        def __post_init__(self) -> None:
            self.check_srmil()

    def __init__(self, model: nn.Module, config: Config) -> None:
        _check_graph_model(model, "srmil")
        super().__init__(model, config)
        self.reconstruction = MaskedReconstruction(model, config.decoder_layers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.model.parameters(), *self.reconstruction.parameters()] if p.requires_grad]

    def training_step(self, bags: Bags, ctx: StepContext) -> StepOutput:
        cfg, model = self.config, self.model
        nbr = bag_neighbours(bags, model.neighbour_radius)
        masked = random_instance_mask(bags, cfg.mask_ratio, _stream_seed(ctx.seed, ctx.epoch, ctx.step))
        clean = model.input_parts(bags.features)
        h_masked, recon = self.reconstruction(model, clean, bags.features, nbr, masked, cfg.recon_alpha)
        out_masked = model.classify(h_masked, bags.offsets, offsets_cpu=bags.offsets_cpu)
        out_clean = model.classify(model.encode_parts(clean, nbr), bags.offsets, offsets_cpu=bags.offsets_cpu)
        ce_masked = ctx.supervised_loss(out_masked.logits, bags)
        ce_clean = ctx.supervised_loss(out_clean.logits, bags)
        loss = cfg.ce_weight * (ce_masked + ce_clean) + cfg.recon_weight * recon
        return StepOutput(loss, {f"{ctx.loss_name}_masked": ce_masked.detach(),
                                 f"{ctx.loss_name}_clean": ce_clean.detach(), "recon": recon.detach()})


@register_method("mhim+srmil")
class MHIMSRMIL(MHIM):
    """MHIM-MIL and SRMIL on one ``graphmil`` student. Logged terms: MHIM's (``ce``, ``consistency``, mask
    shares) plus ``ce_masked`` and ``recon``."""

    default_model = "graphmil"

    @dataclass
    class Config(MHIM.Config, _SRMILOptions):
        """The ``method:`` config section of MHIM+SRMIL: every MHIM-MIL and SRMIL option."""

        name: str = "mhim+srmil"

        def __post_init__(self) -> None:
            MHIM.Config.__post_init__(self)
            self.check_srmil()

    def __init__(self, model: nn.Module, teacher: nn.Module, config: Config) -> None:
        _check_graph_model(model, "mhim+srmil")
        super().__init__(model, teacher, config)
        self.reconstruction = MaskedReconstruction(model, config.decoder_layers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*super().trainable_parameters(), *(p for p in self.reconstruction.parameters() if p.requires_grad)]

    def training_step(self, bags: Bags, ctx: StepContext) -> StepOutput:
        cfg, model = self.config, self.model
        nbr = bag_neighbours(bags, model.neighbour_radius)
        if bags.neighbours is None:  # build the graph once for teacher and student
            bags = Bags(bags.features, bags.offsets, bags.coords, bags.labels, bags.ids, validate=False,
                        offsets_cpu=bags.offsets_cpu, neighbours=nbr)
        clean: LayerParts | None = None

        def embed() -> torch.Tensor:
            nonlocal clean
            clean = model.input_parts(bags.features)
            return model.encode_parts(clean, nbr)

        mhim = self.mhim_step(bags, ctx, embed)
        masked = random_instance_mask(bags, cfg.mask_ratio, _stream_seed(ctx.seed, ctx.epoch, ctx.step))
        h_masked, recon = self.reconstruction(model, clean, bags.features, nbr, masked, cfg.recon_alpha)
        out_masked = model.classify(h_masked, bags.offsets, offsets_cpu=bags.offsets_cpu)
        ce_masked = ctx.supervised_loss(out_masked.logits, bags)
        terms = {**mhim.terms, f"{ctx.loss_name}_masked": ce_masked.detach(), "recon": recon.detach()}
        loss = cfg.ce_weight * (mhim.loss + ce_masked) + cfg.recon_weight * recon
        return StepOutput(loss, terms)
