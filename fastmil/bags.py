"""``Bags``: the packed ragged batch that every layer of fastmil speaks.

Bags of different sizes are concatenated along the instance axis, never padded (the flash-attention
"varlen" layout). Bag ``b`` owns rows ``offsets[b]:offsets[b + 1]`` of ``features`` (and ``coords``).
One kernel launch therefore covers many bags with zero padding waste.

Validation happens once, here, at construction; every error names the offending slide.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["Bags"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int16, torch.int32, torch.int64)


class Bags:
    """A packed batch of B bags holding N_total instances.

    Attributes:
        features: ``[N_total, D]`` float tensor (fp32, fp16, bf16; fp64 accepted for references).
        offsets: ``int64 [B + 1]``; ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == N_total``.
        offsets_cpu: the same offsets on the host (``offsets`` itself for CPU batches). It travels with the batch
            through :meth:`to`, so the ops that size launch grids or loop over bags never copy offsets back from
            a GPU (no device-to-host synchronisation per op call).
        coords: optional ``[N_total, 2]`` integer patch coordinates (level-0 pixels, top-left, x then y).
        labels: optional ``int64 [B]`` slide labels.
        ids: list of B slide ids (strings, unique within the batch).
        neighbours: optional ``int64 [N_total, K]`` spatial stencil table (:func:`fastmil.ops.grid_neighbours`):
            rows of this packed batch, -1 where a lattice cell is empty; never crosses a bag.

    Args:
        n_classes: when given, labels must lie in ``[0, n_classes)``.
        allow_empty: accept bags with zero instances (off by default: an empty slide is usually a bug upstream).
        validate: run the checks (features finiteness costs one pass over the data; turn off only for
            tensors that were validated before, e.g. subsets of a validated batch).

    Raises:
        ValueError: with the slide id and the problem, on any inconsistent input.
    """

    __slots__ = ("features", "offsets", "offsets_cpu", "coords", "labels", "ids", "neighbours")

    def __init__(
        self,
        features: torch.Tensor,
        offsets: torch.Tensor,
        coords: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ids: Sequence[str] | None = None,
        *,
        n_classes: int | None = None,
        allow_empty: bool = False,
        validate: bool = True,
        offsets_cpu: torch.Tensor | None = None,
        neighbours: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(features, torch.Tensor) or not isinstance(offsets, torch.Tensor):
            raise TypeError("Bags: features and offsets must be torch tensors")
        n_bags = offsets.numel() - 1
        self.ids = [f"bag{i}" for i in range(max(n_bags, 0))] if ids is None else [str(s) for s in ids]
        self.features = features
        self.offsets = offsets
        if offsets_cpu is None:
            offsets_cpu = offsets if offsets.device.type == "cpu" else offsets.detach().cpu()
        self.offsets_cpu = offsets_cpu
        self.coords = coords
        self.labels = labels
        self.neighbours = neighbours
        if validate:
            self._validate(n_classes=n_classes, allow_empty=allow_empty)

    # ------------------------------------------------------------------ validation
    def _validate(self, *, n_classes: int | None, allow_empty: bool) -> None:
        f, off = self.features, self.offsets
        if f.dim() != 2:
            raise ValueError(f"Bags: features must be [N_total, D], got shape {tuple(f.shape)}")
        if f.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"Bags: features must be a float tensor (fp32/fp16/bf16), got {f.dtype}")
        if off.dim() != 1 or off.numel() < 2:
            raise ValueError(f"Bags: offsets must be int64 [B+1] with B >= 1, got shape {tuple(off.shape)}")
        if off.dtype != torch.int64:
            raise ValueError(f"Bags: offsets must be int64, got {off.dtype}")
        if off.device != f.device:
            raise ValueError(f"Bags: offsets on {off.device} but features on {f.device}")
        n_bags = off.numel() - 1
        if len(self.ids) != n_bags:
            raise ValueError(f"Bags: {len(self.ids)} ids for {n_bags} bags")
        seen: set[str] = set()
        for sid in self.ids:
            if sid in seen:
                raise ValueError(f"Bags: duplicate slide id {sid!r} in one batch")
            seen.add(sid)
        off_cpu = self.offsets_cpu
        if off_cpu.shape != off.shape or (off.device.type == "cpu" and not torch.equal(off_cpu, off)):
            raise ValueError("Bags: offsets_cpu must be the host copy of offsets")
        if int(off_cpu[0]) != 0:
            raise ValueError(f"Bags: offsets[0] must be 0, got {int(off_cpu[0])}")
        sizes = off_cpu[1:] - off_cpu[:-1]
        if bool((sizes < 0).any()):
            b = int(torch.nonzero(sizes < 0)[0])
            raise ValueError(f"slide {self.ids[b]!r}: offsets decrease ({int(off_cpu[b])} -> {int(off_cpu[b + 1])})")
        if int(off_cpu[-1]) != f.shape[0]:
            raise ValueError(
                f"Bags: offsets[-1] = {int(off_cpu[-1])} but features hold {f.shape[0]} rows"
            )
        if not allow_empty and bool((sizes == 0).any()):
            b = int(torch.nonzero(sizes == 0)[0])
            raise ValueError(f"slide {self.ids[b]!r}: empty bag (0 instances)")
        if f.numel() and not bool(torch.isfinite(f).all()):
            row = int(torch.nonzero(~torch.isfinite(f).all(dim=1))[0])
            b = int(torch.searchsorted(off_cpu, torch.tensor(row), right=True)) - 1
            kind = "NaN" if bool(torch.isnan(f[row]).any()) else "Inf"
            raise ValueError(
                f"slide {self.ids[b]!r}: features contain {kind} (instance {row - int(off_cpu[b])} of the bag)"
            )
        if self.coords is not None:
            c = self.coords
            if c.dim() != 2 or c.shape[1] != 2:
                raise ValueError(f"Bags: coords must be [N_total, 2], got shape {tuple(c.shape)}")
            if c.dtype not in _INT_DTYPES:
                raise ValueError(f"Bags: coords must be integer patch coordinates, got {c.dtype}")
            if c.shape[0] != f.shape[0]:
                b = _first_bag_with_mismatch(off_cpu, c.shape[0])
                raise ValueError(
                    f"slide {self.ids[b]!r}: coords/features length mismatch "
                    f"({c.shape[0]} coords rows for {f.shape[0]} feature rows in the batch)"
                )
            if c.device != f.device:
                raise ValueError(f"Bags: coords on {c.device} but features on {f.device}")
        if self.neighbours is not None:
            self._validate_neighbours()
        if self.labels is not None:
            y = self.labels
            if y.dim() != 1 or y.numel() != n_bags:
                raise ValueError(f"Bags: labels must be [B] = [{n_bags}], got shape {tuple(y.shape)}")
            if y.dtype != torch.int64:
                raise ValueError(f"Bags: labels must be int64 class indices, got {y.dtype}")
            y_cpu = y.detach().cpu()
            upper = n_classes if n_classes is not None else None
            bad = (y_cpu < 0) if upper is None else ((y_cpu < 0) | (y_cpu >= upper))
            if bool(bad.any()):
                b = int(torch.nonzero(bad)[0])
                allowed = "[0, inf)" if upper is None else f"[0, {upper})"
                raise ValueError(f"slide {self.ids[b]!r}: label {int(y_cpu[b])} out of range {allowed}")

    def _validate_neighbours(self) -> None:
        from .ops.grid_neighbours import check_stencil

        nbr, n = self.neighbours, self.features.shape[0]
        if nbr.dim() != 2 or nbr.shape[0] != n or nbr.dtype != torch.int64:
            raise ValueError(f"Bags: neighbours must be int64 [N_total, K] = [{n}, K], got {nbr.dtype} "
                             f"{tuple(nbr.shape)}")
        if nbr.device != self.features.device:
            raise ValueError(f"Bags: neighbours on {nbr.device} but features on {self.features.device}")
        check_stencil(nbr)
        bag = self.bag_index()
        crossing = (nbr >= 0) & (bag[nbr.clamp(min=0)] != bag[:, None])
        if bool(crossing.any()):
            row = int(torch.nonzero(crossing)[0, 0])
            raise ValueError(f"slide {self.ids[int(bag[row])]!r}: neighbour table links instance {row} to another bag")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_list(
        cls,
        features_list: Sequence[torch.Tensor],
        coords: Sequence[torch.Tensor] | None = None,
        labels: Sequence[int] | torch.Tensor | None = None,
        ids: Sequence[str] | None = None,
        neighbours: Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> Bags:
        """Pack a list of ``[n_b, D]`` tensors (and optional ``[n_b, 2]`` coords and ``[n_b, K]`` neighbour tables
        with rows local to each bag, -1 for none) into one batch."""
        if len(features_list) == 0:
            raise ValueError("Bags.from_list: no bags given")
        names = [f"bag{i}" for i in range(len(features_list))] if ids is None else list(ids)
        if len(names) != len(features_list):
            raise ValueError(f"Bags.from_list: {len(names)} ids for {len(features_list)} bags")
        dims = set()
        for name, x in zip(names, features_list):
            if x.dim() != 2:
                raise ValueError(f"slide {name!r}: features must be [n, D], got shape {tuple(x.shape)}")
            dims.add(x.shape[1])
        if len(dims) > 1:
            raise ValueError(f"Bags.from_list: bags have different feature dims {sorted(dims)}")
        sizes = torch.tensor([x.shape[0] for x in features_list], dtype=torch.int64)
        offsets = torch.zeros(len(features_list) + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=offsets[1:])
        device = features_list[0].device
        features = torch.cat(list(features_list), dim=0)
        packed_coords = None
        if coords is not None:
            if len(coords) != len(features_list):
                raise ValueError(f"Bags.from_list: {len(coords)} coords arrays for {len(features_list)} bags")
            for name, x, c in zip(names, features_list, coords):
                if c.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"slide {name!r}: coords/features length mismatch ({c.shape[0]} coords, {x.shape[0]} features)"
                    )
            packed_coords = torch.cat(list(coords), dim=0)
        label_tensor = None
        if labels is not None:
            label_tensor = torch.as_tensor(labels, dtype=torch.int64).to(device).reshape(-1)
        packed_nbr = None
        if neighbours is not None:
            if len(neighbours) != len(features_list):
                raise ValueError(f"Bags.from_list: {len(neighbours)} neighbour tables for {len(features_list)} bags")
            parts = []
            for name, x, t, start in zip(names, features_list, neighbours, offsets[:-1].tolist()):
                if t.dim() != 2 or t.shape[0] != x.shape[0]:
                    raise ValueError(f"slide {name!r}: neighbour table of shape {tuple(t.shape)} for {x.shape[0]} "
                                     "instances")
                t = t.to(device=device, dtype=torch.int64)
                parts.append(torch.where(t >= 0, t + start, t))
            packed_nbr = torch.cat(parts, 0)
        return cls(features, offsets.to(device), packed_coords, label_tensor, names, offsets_cpu=offsets,
                   neighbours=packed_nbr, **kwargs)

    @classmethod
    def from_padded(
        cls,
        X: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        ids: Sequence[str] | None = None,
        coords: torch.Tensor | None = None,
        **kwargs,
    ) -> Bags:
        """Pack a padded batch ``X [B, Nmax, D]`` with ``mask [B, Nmax]`` (True = real instance).

        Instances keep their order within a bag; padded rows (mask False) are dropped wherever they sit.
        """
        if X.dim() != 3:
            raise ValueError(f"Bags.from_padded: X must be [B, Nmax, D], got {tuple(X.shape)}")
        if mask.shape != X.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(
                f"Bags.from_padded: mask must be bool {tuple(X.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        sizes = mask.sum(dim=1).to(torch.int64)
        offsets = torch.zeros(X.shape[0] + 1, dtype=torch.int64, device=X.device)
        torch.cumsum(sizes, 0, out=offsets[1:])
        packed_coords = coords[mask] if coords is not None else None
        return cls(X[mask], offsets, packed_coords, labels, ids, **kwargs)

    # ------------------------------------------------------------------ views and conversions
    @property
    def sizes(self) -> torch.Tensor:
        """``int64 [B]``: instances per bag (on the host)."""
        return self.offsets_cpu[1:] - self.offsets_cpu[:-1]

    @property
    def n_instances(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def device(self) -> torch.device:
        return self.features.device

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def bag_index(self) -> torch.Tensor:
        """``int64 [N_total]``: the bag each instance belongs to (on the batch's device)."""
        sizes = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(len(self), device=self.offsets.device), sizes,
                                       output_size=self.n_instances)

    def __getitem__(self, i: int) -> Bags:
        """Bag ``i`` as a batch of one (views, no copies)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"bag index {i} out of range for {n} bags")
        i %= n
        lo, hi = int(self.offsets_cpu[i]), int(self.offsets_cpu[i + 1])
        offsets_cpu = torch.tensor([0, hi - lo], dtype=torch.int64)
        return Bags(
            self.features[lo:hi],
            offsets_cpu.to(self.offsets.device),
            None if self.coords is None else self.coords[lo:hi],
            None if self.labels is None else self.labels[i : i + 1],
            [self.ids[i]],
            validate=False,
            offsets_cpu=offsets_cpu,
            neighbours=None if self.neighbours is None else torch.where(
                self.neighbours[lo:hi] >= 0, self.neighbours[lo:hi] - lo, self.neighbours[lo:hi]),
        )

    def __iter__(self) -> Iterable[Bags]:
        return (self[i] for i in range(len(self)))

    def to_padded(self, pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(X [B, Nmax, D], mask [B, Nmax] bool)``; padded rows hold ``pad_value``."""
        n_bags = len(self)
        sizes = self.sizes
        n_max = int(sizes.max()) if n_bags else 0
        X = self.features.new_full((n_bags, n_max, self.dim), pad_value)
        mask = torch.zeros(n_bags, n_max, dtype=torch.bool, device=self.device)
        bag = self.bag_index()
        pos = torch.arange(self.n_instances, device=self.device) - self.offsets[bag]
        X[bag, pos] = self.features
        mask[bag, pos] = True
        return X, mask

    def to(self, target: torch.device | str | torch.dtype, non_blocking: bool = False) -> Bags:
        """Move every tensor to a device (features keep their dtype), or, given a dtype, cast the features only
        (offsets, coords and labels keep their integer dtypes). The host copy of the offsets travels along."""
        if isinstance(target, torch.dtype):
            if not target.is_floating_point:
                raise ValueError(f"Bags.to: features must stay floating point, got {target}")
            return Bags(self.features.to(target), self.offsets, self.coords, self.labels, list(self.ids),
                        validate=False, offsets_cpu=self.offsets_cpu, neighbours=self.neighbours)
        move = lambda t: None if t is None else t.to(target, non_blocking=non_blocking)  # noqa: E731
        return Bags(
            move(self.features), move(self.offsets), move(self.coords), move(self.labels), list(self.ids),
            validate=False, offsets_cpu=self.offsets_cpu, neighbours=move(self.neighbours),
        )

    def pin_memory(self) -> Bags:
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Bags(pin(self.features), pin(self.offsets), pin(self.coords), pin(self.labels), list(self.ids),
                    validate=False, offsets_cpu=self.offsets_cpu, neighbours=pin(self.neighbours))

    def __repr__(self) -> str:
        return (
            f"Bags(B={len(self)}, N_total={self.n_instances}, D={self.dim}, dtype={self.features.dtype}, "
            f"device={self.device}, coords={'yes' if self.coords is not None else 'no'}, "
            f"labels={'yes' if self.labels is not None else 'no'}, "
            f"neighbours={'no' if self.neighbours is None else 'K=' + str(self.neighbours.shape[1])})"
        )


def _first_bag_with_mismatch(offsets: torch.Tensor, n_rows: int) -> int:
    """Index of the first bag whose row range is not fully covered by ``n_rows`` rows."""
    ends = offsets[1:]
    beyond = torch.nonzero(ends > n_rows)
    return int(beyond[0]) if beyond.numel() else len(ends) - 1
