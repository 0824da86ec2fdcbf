"""One training epoch over a loader: deterministic seeding, the steps, per-term means, data-wait vs compute time."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..bags import Bags
from ..data.transfer import device_batches
from ..methods import StepContext
from .step import Stepper

__all__ = ["DivergedError", "EpochStats", "epoch_seed", "train_epoch"]


class DivergedError(ValueError):
    """Training produced a non-finite loss: the message names the epoch, the step and what to try."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed of an epoch: a pure function of (seed, epoch), so a resumed run replays the epoch."""
    return int(np.random.default_rng([seed, epoch, 31]).integers(0, 2**62))


@dataclass
class EpochStats:
    """Mean of every named term over the epoch's steps, and where the time went (seconds)."""

    terms: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    data_s: float = 0.0
    compute_s: float = 0.0


def _timed(loader, clock: dict) -> Iterator[Bags]:
    """Iterate ``loader``, adding the time spent waiting for each batch to ``clock["data"]``."""
    it = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            bags = next(it)
        except StopIteration:
            return
        clock["data"] += time.perf_counter() - start
        yield bags


def _diverged(stepper: Stepper, n_bad: int, n_steps: int) -> bool:
    """Whether non-finite losses in ``n_bad`` of ``n_steps`` steps mean the run is lost: always without loss
    scaling; with it (skipped steps leave the weights as they were), when every step was lost or a parameter is
    no longer finite."""
    if stepper.scaler is None or n_bad >= n_steps:
        return True
    return not all(bool(torch.isfinite(p).all()) for p in stepper.params)


def train_epoch(
    stepper: Stepper, loader, epoch: int, *, epochs: int, seed: int, device: torch.device,
    class_weight: torch.Tensor | None, progress: bool = False,
    step_callback: Callable[[int, int, float], None] | None = None,
    loss_fn: Callable[[torch.Tensor, Bags], torch.Tensor] | None = None, loss_name: str = "ce",
) -> EpochStats:
    """Run one epoch of ``stepper`` over ``loader`` (a :class:`fastmil.data.BagLoader`).

    Terms are summed on the device and read once at the end (one host synchronisation per epoch). So is the first
    step whose loss was not finite: the epoch then raises :class:`DivergedError` naming it (the run's last
    checkpoint stays the previous epoch's). With fp16 loss scaling, whose scaler skips a step with non-finite
    gradients (a single overflowing bag is survivable), it raises only when every step of the epoch had a
    non-finite loss or the parameters themselves are no longer finite.
    ``step_callback(epoch, step, loss)``, when given, is called after every step (it reads the loss: a sync).
    ``progress`` shows a step bar on a terminal (tqdm hides it elsewhere). ``loss_fn``/``loss_name``: the task's
    supervised loss for the methods (:class:`fastmil.methods.StepContext`; default: cross-entropy, ``ce``).
    """
    torch.manual_seed(epoch_seed(seed, epoch))
    loader.set_epoch(epoch)
    n_steps = len(loader)
    stepper.method.train()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    clock = {"data": 0.0}
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # the first non-finite step, on the device
    bad_value = torch.zeros((), dtype=torch.float32, device=device)
    n_bad = torch.zeros((), dtype=torch.int64, device=device)
    start = time.perf_counter()
    batches = device_batches(_timed(loader, clock), device)  # on CUDA, copies overlap the previous step
    for step, bags in enumerate(tqdm(batches, desc=f"epoch {epoch}", unit="step", total=n_steps, leave=False,
                                     disable=None if progress else True)):
        ctx = StepContext(epoch=epoch, step=step, steps_per_epoch=n_steps, epochs=epochs, seed=seed,
                          class_weight=class_weight, loss_fn=loss_fn, loss_name=loss_name)
        terms = stepper.step(bags, ctx)
        bad = ~torch.isfinite(terms["loss"])
        n_bad += bad
        newly_bad = (first_bad < 0) & bad
        first_bad = torch.where(newly_bad, step, first_bad)
        bad_value = torch.where(newly_bad, terms["loss"].float(), bad_value)
        for key, value in terms.items():
            sums[key] = sums[key] + value if key in sums else value.float().clone()
            counts[key] = counts.get(key, 0) + 1
        if step_callback is not None:
            step_callback(epoch, step, float(terms["loss"]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    if int(first_bad) >= 0 and _diverged(stepper, int(n_bad), n_steps):
        raise DivergedError(
            f"training diverged: the loss is {float(bad_value)} at epoch {epoch} step {int(first_bad)} "
            f"({int(n_bad)} of {n_steps} steps non-finite, lr {stepper.lr:.3g}); start a new run with a lower "
            "optim.lr or optim.grad_clip, check the features for values near their dtype's limit (fp16: 65504), "
            "or train with run.amp=none")
    means = {key: float(total) / counts[key] for key, total in sums.items()}
    return EpochStats(means, counts.get("loss", 0), clock["data"], max(0.0, wall - clock["data"]))
