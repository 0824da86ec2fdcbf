import numpy as np
import pytest

from fastmil.data import BagBatchSampler, BagLoader, create_store
from tests.files import grid_coords

SIZES = np.array([100, 5, 4000, 20, 700, 1, 90_000, 33, 250, 12])


def test_budget_packing_covers_every_bag_once_and_respects_budget():
    sampler = BagBatchSampler(SIZES, max_instances_per_step=1000, seed=3)
    steps = sampler.steps()
    flat = sorted(i for s in steps for i in s)
    assert flat == list(range(len(SIZES)))
    for step in steps:
        load = SIZES[step].sum()
        assert load <= 1000 or len(step) == 1  # an oversize bag travels alone
    assert any(len(s) > 1 for s in steps)


def test_bags_per_step_and_combined_limits():
    steps = BagBatchSampler(SIZES, bags_per_step=3, shuffle=False).steps()
    assert [len(s) for s in steps] == [3, 3, 3, 1]
    assert BagBatchSampler(SIZES, bags_per_step=3, shuffle=False, drop_last=True).steps()[-1] == [6, 7, 8]
    both = BagBatchSampler(SIZES, bags_per_step=2, max_instances_per_step=200, shuffle=False).steps()
    assert all(len(s) <= 2 and (SIZES[s].sum() <= 200 or len(s) == 1) for s in both)
    assert BagBatchSampler(SIZES).steps() == BagBatchSampler(SIZES)._order()  # default: 1 bag per step


def test_shuffle_is_seeded_per_epoch():
    a, b = BagBatchSampler(SIZES, seed=1), BagBatchSampler(SIZES, seed=1)
    assert a.steps() == b.steps()
    first = a.steps()
    a.set_epoch(1)
    assert a.steps() != first
    b.set_epoch(1)
    assert a.steps() == b.steps()
    assert BagBatchSampler(SIZES, seed=2).steps() != BagBatchSampler(SIZES, seed=1).steps()


def test_invalid_sampler_arguments():
    with pytest.raises(ValueError, match="max_instances_per_step"):
        BagBatchSampler(SIZES, max_instances_per_step=0)
    with pytest.raises(ValueError, match="bags_per_step"):
        BagBatchSampler(SIZES, bags_per_step=0)


def _store(tmp_path, sizes, written=None):
    store = create_store(tmp_path / "s")
    rng = np.random.default_rng(0)
    for i, n in enumerate(sizes):
        features, coords = rng.standard_normal((n, 8)).astype(np.float32), grid_coords(n)
        store.write_slide(f"s{i}", features, coords, {"label": i % 2})
        if written is not None:
            written[f"s{i}"] = (features, coords, i % 2)
    store.set_labels({f"s{i}": i % 2 for i in range(len(sizes))}, ["a", "b"])
    return store


def test_loader_yields_packed_steps_in_sampler_order(tmp_path):
    written = {}
    store = _store(tmp_path, [5, 7, 3, 9, 2], written)
    ids = store.slide_ids
    sampler = BagBatchSampler(store.sizes(ids), max_instances_per_step=12, seed=0)
    steps = sampler.steps()
    loaded = list(BagLoader(store, ids, sampler, prefetch=1))
    assert [b.ids for b in loaded] == [[ids[i] for i in s] for s in steps]
    for bags in loaded:  # against the arrays that were written, not against the reader the loader uses
        for b, sid in enumerate(bags.ids):
            features, coords, label = written[sid]
            assert np.array_equal(bags[b].features.numpy(), features)
            assert np.array_equal(bags[b].coords.numpy(), coords) and int(bags.labels[b]) == label


def test_loader_reraises_reader_errors(tmp_path):
    store = _store(tmp_path, [5, 7, 3])
    (tmp_path / "s" / "slides" / "s1" / "features" / "c" / "0" / "0").unlink()
    loader = BagLoader(store, store.slide_ids, prefetch=2)
    with pytest.raises(ValueError, match=r"slide 's1'.*chunk 0 is missing"):
        list(loader)


def test_loader_stops_cleanly_when_consumer_breaks(tmp_path):
    store = _store(tmp_path, [5, 7, 3, 4, 4, 4])
    loader = BagLoader(store, store.slide_ids, prefetch=1)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert len(list(loader)) == 6  # a fresh iteration works after an abandoned one


def test_groups_stay_in_one_step():
    """A patient's slides (one group) are shuffled as a unit and packed into one step, whatever the limits."""
    groups = [0, 1, 0, 2, 3, 3, 3, 4, 5, 1]
    for kwargs in ({"bags_per_step": 1}, {"bags_per_step": 2}, {"max_instances_per_step": 150}):
        for epoch in range(3):
            sampler = BagBatchSampler(SIZES, groups=groups, seed=1, **kwargs)
            sampler.set_epoch(epoch)
            steps = sampler.steps()
            assert sorted(i for s in steps for i in s) == list(range(len(SIZES)))
            step_of = {i: k for k, s in enumerate(steps) for i in s}
            for g in set(groups):
                assert len({step_of[i] for i, gi in enumerate(groups) if gi == g}) == 1
            if kwargs == {"bags_per_step": 1}:  # one group per step
                assert all(len({groups[i] for i in s}) == 1 for s in steps)
    with pytest.raises(ValueError, match="one group per bag"):
        BagBatchSampler(SIZES, groups=[0, 1])
