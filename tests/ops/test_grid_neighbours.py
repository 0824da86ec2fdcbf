"""grid_neighbours against an independent dict-based reference on the 8 real CLAM coordinate files and on synthetic
layouts; the store's cached tables."""
from __future__ import annotations

import importlib

import h5py
import numpy as np
import pytest
import torch

from fastmil.bags import Bags
from fastmil.ops.grid_neighbours import (
    check_stencil,
    grid_neighbours,
    grid_neighbours_reference,
    infer_step,
    n_slots,
    stencil_directions,
)


def _clam_files(folder):
    files = sorted(folder.glob("*.h5"))
    assert len(files) == 8
    return files


def _read(path) -> np.ndarray:
    with h5py.File(path, "r") as fh:
        return fh["coords"][:].astype(np.int64)


def test_stencil_layout_reverse_slot_is_the_opposite_direction():
    for r in (1, 2, 3):
        d = stencil_directions(r)
        assert len(d) == n_slots(r) == (2 * r + 1) ** 2 - 1
        assert all(d[len(d) - 1 - s] == (-dy, -dx) for s, (dy, dx) in enumerate(d))
        assert d[0] == (-r, -r) and d[-1] == (r, r)


@pytest.mark.parametrize("radius", [1, 2])
def test_real_clam_files_equal_the_reference(clam_coords_dir, radius):
    for path in _clam_files(clam_coords_dir):
        c = _read(path)
        assert infer_step(c) == 512, path.name  # DESIGN.md: 512 on all 8 real files
        nbr = grid_neighbours(torch.from_numpy(c), torch.tensor([0, len(c)]), radius)
        ref = grid_neighbours_reference(c, [0, len(c)], radius, [512])
        np.testing.assert_array_equal(nbr.numpy(), ref, err_msg=path.name)
        check_stencil(nbr)
        assert (nbr >= 0).float().mean() > 0.8  # tissue is mostly contiguous: most slots are filled


def test_offset_tissue_grids_snap_to_one_lattice(clam_coords_dir):
    """CLAM tiles tissue contours on grids that need not align; a file with such offsets still gets full
    neighbourhoods (exact division would leave the offset pieces isolated)."""
    offsets_seen = 0
    for path in _clam_files(clam_coords_dir):
        c = _read(path)
        if len(np.unique((c - c.min(0)) % 512, axis=0)) > 1:
            offsets_seen += 1
            nbr = grid_neighbours(torch.from_numpy(c), torch.tensor([0, len(c)]), 1)
            assert (nbr >= 0).any(1).float().mean() > 0.95, path.name
    assert offsets_seen == 3


def _layout(rng, kind: str, n_cells: int = 30) -> np.ndarray:
    step = 256
    yy, xx = np.mgrid[0:n_cells, 0:n_cells]
    cells = np.stack([xx.ravel(), yy.ravel()], 1)
    if kind == "holes":
        keep = rng.random(len(cells)) > 0.35
    elif kind == "tumour-masked":  # an irregular blob cut out of the tissue
        centre = rng.integers(5, n_cells - 5, size=2)
        keep = np.hypot(*(cells - centre).T) + rng.normal(0, 2, len(cells)) > 6
    else:
        keep = np.ones(len(cells), bool)
    c = cells[keep] * step + rng.integers(0, 10_000, size=2)  # an arbitrary tissue origin
    if kind == "jitter":  # coordinates off the lattice by less than half a step snap to the nearest cell
        c = c + rng.integers(0, 100, size=c.shape)  # (c - bag min) moves by < 100 < 128
    return c[rng.permutation(len(c))]


def test_synthetic_layouts_ragged_bags_equal_the_reference():
    rng = np.random.default_rng(0)
    bags = [_layout(rng, k) for k in ("holes", "tumour-masked", "full", "jitter")] + [np.array([[5, 7]])]
    coords = np.concatenate(bags)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bags])])
    for radius in (1, 2, 3):
        nbr = grid_neighbours(torch.from_numpy(coords), torch.from_numpy(offsets), radius, step=256)
        ref = grid_neighbours_reference(coords, offsets.tolist(), radius, [256] * len(bags))
        np.testing.assert_array_equal(nbr.numpy(), ref)
        check_stencil(nbr)
        bag = np.repeat(np.arange(len(bags)), np.diff(offsets))
        hit = nbr.numpy() >= 0
        assert (bag[nbr.numpy()[hit]] == np.broadcast_to(bag[:, None], hit.shape)[hit]).all()  # never across bags
        assert (nbr[-1] == -1).all()  # the bag of one has no neighbour


def test_sparse_lookup_equals_the_dense_table(monkeypatch):
    """Far-apart tissue pieces make the bounding box huge: the sorted-key path gives the same table."""
    gn = importlib.import_module("fastmil.ops.grid_neighbours")

    rng = np.random.default_rng(1)
    a, b = _layout(rng, "holes"), _layout(rng, "holes") + [50_000_000, 0]  # ~12M cells: sparse path
    coords = torch.from_numpy(np.concatenate([a, b]))
    off = torch.tensor([0, len(coords)])
    sparse = grid_neighbours(coords, off, 2, step=256)
    monkeypatch.setattr(gn, "DENSE_CELLS_PER_INSTANCE", 10**12)
    dense = grid_neighbours(coords, off, 2, step=256)
    assert torch.equal(sparse, dense)
    np.testing.assert_array_equal(sparse.numpy(), grid_neighbours_reference(coords.numpy(), [0, len(coords)], 2,
                                                                            [256]))


@pytest.mark.parametrize("dense", [True, False])
def test_duplicate_cells_are_an_error_naming_the_slide(monkeypatch, dense):
    gn = importlib.import_module("fastmil.ops.grid_neighbours")

    if not dense:
        monkeypatch.setattr(gn, "DENSE_CELLS_PER_INSTANCE", -10**9)
    c = torch.tensor([[0, 0], [256, 0], [0, 256], [260, 10]])  # the last two land in one cell
    with pytest.raises(ValueError, match=r"slide 'S1': instances 1 and 3 fall in one lattice cell"):
        grid_neighbours(c, torch.tensor([0, 4]), 1, step=256, ids=["S1"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="radius must be >= 1"):
        grid_neighbours(torch.zeros(2, 2, dtype=torch.int64), torch.tensor([0, 2]), 0)
    with pytest.raises(ValueError, match="integer patch coordinates"):
        grid_neighbours(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="do not partition"):
        grid_neighbours(torch.zeros(3, 2, dtype=torch.int64), torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        grid_neighbours(torch.zeros(2, 2, dtype=torch.int64), torch.tensor([0, 2]), backend="triton")


def test_check_stencil_rejects_an_asymmetric_table():
    nbr = torch.tensor([[-1, 1], [-1, -1]])  # 0 -> 1 in slot 1, but 1 has no edge back in slot 0
    with pytest.raises(ValueError, match="not a symmetric stencil"):
        check_stencil(nbr)


def test_bags_carry_the_table_and_slice_it():
    c = [torch.tensor([[0, 0], [256, 0], [512, 0]]), torch.tensor([[0, 0], [0, 256]])]
    local = [grid_neighbours(x, torch.tensor([0, len(x)]), 1, step=256) for x in c]
    bags = Bags.from_list([torch.randn(3, 4), torch.randn(2, 4)], coords=c, neighbours=local)
    assert torch.equal(bags.neighbours, grid_neighbours(torch.cat(c), bags.offsets, 1, step=256))
    assert torch.equal(bags[1].neighbours, local[1])
    bad = bags.neighbours.clone()
    bad[2, 4], bad[3, 3] = 3, 2  # a symmetric edge from the first bag's last patch into the second bag
    with pytest.raises(ValueError, match="another bag"):
        Bags(bags.features, bags.offsets, neighbours=bad)
