from collections import deque

import numpy as np
import pytest

from fastmil.data import SynthConfig, make_slide, open_store, synthesize_store
from fastmil.data.grid import lattice_cells, patch_stride
from fastmil.data.synthetic import bag_size


def _components(cells: np.ndarray) -> int:
    """Number of 4-connected components of a set of lattice cells."""
    todo = {tuple(c) for c in cells.tolist()}
    count = 0
    while todo:
        count += 1
        queue = deque([todo.pop()])
        while queue:
            r, c = queue.popleft()
            for nb in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if nb in todo:
                    todo.remove(nb)
                    queue.append(nb)
    return count


def _positive(cfg, start=0):
    for i in range(start, start + 50):
        s = make_slide(cfg, i)
        if s.label == 1:
            return s
    raise AssertionError("no positive slide generated")


def test_deterministic_in_seed_and_index():
    cfg = SynthConfig(dim=16, median_instances=500, n_slides=3)
    a, b = make_slide(cfg, 2), make_slide(cfg, 2)
    assert np.array_equal(a.features, b.features) and np.array_equal(a.coords, b.coords)
    assert not np.array_equal(make_slide(cfg, 1).features[:5], a.features[:5])


@pytest.mark.parametrize("fraction", [0.005, 0.05])
def test_tumour_is_connected_blobs_of_requested_size(fraction):
    cfg = SynthConfig(dim=16, median_instances=6000, size_sigma=0.1, tumour_fraction_min=fraction,
                      tumour_fraction_max=fraction, positive_fraction=1.0)
    s = _positive(cfg)
    n = len(s.instance_labels)
    assert abs(s.instance_labels.sum() - round(fraction * n)) <= 1
    cells = lattice_cells(s.coords, cfg.patch_size_level0)
    assert _components(cells[s.instance_labels == 1]) <= 2  # one blob (a second only if its fragment ran out)
    assert _components(cells) < 10  # tissue: a few irregular fragments, not scattered dust


def test_negative_slides_have_no_tumour():
    cfg = SynthConfig(dim=8, median_instances=300, positive_fraction=0.0)
    s = make_slide(cfg, 0)
    assert s.label == 0 and s.instance_labels.sum() == 0


def test_features_are_spatially_autocorrelated_and_carry_class_signal():
    cfg = SynthConfig(dim=64, median_instances=4000, size_sigma=0.1, positive_fraction=1.0, dtype="float32",
                      tumour_fraction_min=0.05, tumour_fraction_max=0.05)
    s = _positive(cfg)
    cells = lattice_cells(s.coords, 512)
    index = {tuple(c): i for i, c in enumerate(cells.tolist())}
    normal = s.instance_labels == 0
    x = s.features - s.features[normal].mean(0)
    pairs = [(i, index[(r, c + 1)]) for (r, c), i in index.items() if (r, c + 1) in index]
    pairs = np.array([(i, j) for i, j in pairs if normal[i] and normal[j]])
    nb_sim = np.mean(np.sum(x[pairs[:, 0]] * x[pairs[:, 1]], 1))
    rng = np.random.default_rng(0)
    rand = rng.choice(np.flatnonzero(normal), size=(len(pairs), 2))
    rand_sim = np.mean(np.sum(x[rand[:, 0]] * x[rand[:, 1]], 1))
    assert nb_sim > 5 * abs(rand_sim) and nb_sim > 1.0
    # tumour patches differ from normal ones along a consistent direction
    diff = s.features[s.instance_labels == 1].mean(0) - s.features[normal].mean(0)
    assert np.linalg.norm(diff) > 2.0


def test_bag_sizes_are_lognormal_with_a_long_tail():
    cfg = SynthConfig()
    sizes = np.array([bag_size(cfg, i) for i in range(2000)])
    assert 7000 < np.median(sizes) < 9000
    assert sizes.max() > 100_000 and sizes.min() >= cfg.min_instances
    assert make_slide(SynthConfig(dim=2, median_instances=300), 3).features.shape[0] == bag_size(
        SynthConfig(dim=2, median_instances=300), 3
    )


def test_real_clam_layouts_are_used_unchanged(clam_coords_dir):
    import h5py

    cfg = SynthConfig(dim=8, layout="clam", clam_coords_dir=str(clam_coords_dir))
    s = make_slide(cfg, 0)
    first = sorted(clam_coords_dir.glob("*.h5"))[0]
    with h5py.File(first) as fh:
        assert np.array_equal(s.coords, fh["coords"][:])
    assert s.layout == f"clam:{first.stem}"


def test_synthesize_store_is_resumable_and_records_ground_truth(tmp_path):
    cfg = SynthConfig(n_slides=4, dim=8, median_instances=200, seed=5)
    store = synthesize_store(cfg, tmp_path / "s", progress=False)
    assert len(store) == 4 and store.classes == ["normal", "tumour"]
    before = store.read("synth-00002")[0]
    cfg.n_slides = 6
    store = synthesize_store(cfg, tmp_path / "s", progress=False)
    assert len(store) == 6 and np.array_equal(store.read("synth-00002")[0], before)
    for sid in store.slide_ids:
        truth = store.read_instance_labels(sid)
        assert truth is not None and (truth.sum() > 0) == (store.label(sid) == 1)
        assert store.slide_attrs(sid)["synthetic"] is True
    cfg.dim = 16
    with pytest.raises(ValueError, match="other settings \\(dim\\)"):
        synthesize_store(cfg, tmp_path / "s", progress=False)
    assert open_store(tmp_path / "s").dim == 8


def test_invalid_config():
    with pytest.raises(ValueError, match="tumour_fraction"):
        SynthConfig(tumour_fraction_min=0.1, tumour_fraction_max=0.01).validate()
    with pytest.raises(ValueError, match="clam_coords_dir"):
        SynthConfig(layout="clam").validate()


def test_patch_stride_is_512_on_every_real_clam_file(clam_coords_dir):
    import h5py

    for path in sorted(clam_coords_dir.glob("*.h5")):
        with h5py.File(path) as fh:
            assert patch_stride(fh["coords"][:]) == 512, path.name
