"""Data-parallel training on Ray Train (2 gloo workers on CPU) equals one process with the same global steps."""
from __future__ import annotations

import math

from fastmil.checkpoint import load_checkpoint
from fastmil.data import SynthConfig, synthesize_store
from fastmil.data.batching import BagBatchSampler
from fastmil.train import TrainConfig, fit
from fastmil.train.splits import write_splits
from tests.tolerance import check_close, rounding_bound

DATA = SynthConfig(n_slides=16, dim=12, median_instances=80, size_sigma=0.3, tumour_fraction_min=0.05,
                   tumour_fraction_max=0.1, seed=5)


def test_sampler_shards_are_disjoint_and_cover_the_global_steps():
    sizes = [5] * 11
    one = BagBatchSampler(sizes, bags_per_step=2, seed=3)
    shards = [BagBatchSampler(sizes, bags_per_step=2, seed=3, rank=r, world=2) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (one, *shards):
            s.set_epoch(epoch)
        local = one.steps()  # 6 steps: 5 of two bags, one of one; global steps = consecutive pairs
        a, b = shards[0].steps(), shards[1].steps()
        assert len(a) == len(b) == len(local) // 2
        for k, (x, y) in enumerate(zip(a, b)):
            assert x == local[2 * k] and y == local[2 * k + 1] and not set(x) & set(y)


def test_sharding_keeps_bags_larger_than_the_budget():
    """A bag above the instance budget is a step of its own on one process; sharded, it still trains."""
    sizes = [60_000, 60_000, 60_000, 10_000, 120_000, 3_000]
    trained = set()
    for epoch in range(3):
        shards = [BagBatchSampler(sizes, max_instances_per_step=50_000, seed=1, rank=r, world=2) for r in (0, 1)]
        for s in shards:
            s.set_epoch(epoch)
        a, b = shards[0].steps(), shards[1].steps()
        assert len(a) == len(b) >= 2
        assert not {i for st in a for i in st} & {i for st in b for i in st}
        trained |= {i for st in a + b for i in st}
    assert trained == set(range(6))


def test_two_workers_equal_one_process_with_both_bags_per_step(ray_local, tmp_path):
    from ray_jobs.ddp import train_data_parallel

    store = synthesize_store(DATA, tmp_path / "store", progress=False)
    ids = store.slide_ids
    split = tmp_path / "splits.csv"
    write_splits(split, {"train": ids[:10], "val": ids[10:13], "test": ids[13:]})
    base = {"model": {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}, "optim": {"epochs": 3, "lr": 1e-3},
            "data": {"max_instances_per_step": None, "class_weighting": False}, "run": {"seed": 1}}
    single = TrainConfig.from_dict(base).with_overrides({"data.bags_per_step": 2})
    fit(store, tmp_path / "single", single, split_csv=split, progress=False)
    parallel = TrainConfig.from_dict(base).with_overrides({"data.bags_per_step": 1})
    train_data_parallel(store.path, tmp_path / "ddp", parallel, workers=2, split_csv=split, use_gpu=False)
    a = load_checkpoint(tmp_path / "single" / "last.pt")["method_state"]
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")["method_state"]
    assert a.keys() == b.keys()
    # What differs: one process reduces each weight gradient over both bags' rows at once, the workers each over
    # their own bag, then gloo sums the two (one rounding; the division by 2 is exact). Per optimiser step the two
    # runs' parameters then drift apart by (a) AdamW's own two roundings of each parameter (the decay and the
    # update, relative to |theta|: measured, the larger part) and (b) lr times the update's difference: Adam divides
    # the gradient by its running RMS, so the gradient's rounding (depth grad_depth, relative to its terms) becomes
    # a relative error of the update, lr * sqrt(grad_depth) * u per step (grad clipping rescales every gradient
    # alike, which Adam undoes). T independent steps add up as sqrt(T): depth T, relative to the largest |theta|.
    steps = 3 * (10 // 2)  # 3 epochs of 10 training slides, 2 bags per global step
    n_max = max(store.sizes(ids[:10]))
    # a weight gradient's reduction over a step's rows (2 bags), the softmax backward over a bag, the GEMMs' K
    # (12 features, 16 embedding, 8 attention units) and ~10 elementwise steps
    grad_depth = 2 * n_max + n_max + 12 + 16 + 8 + 10
    lr = base["optim"]["lr"]  # the cosine schedule's largest
    # the attention score's bias has an exactly-zero gradient (softmax is shift-invariant): what reaches it is
    # rounding noise, which Adam scales to full-size steps, differently in each reduction order; it changes no output
    for key in sorted(set(a) - {"model.pool.w.bias"}):
        theta = float(a[key].abs().max())
        bound = rounding_bound(steps, condition=math.sqrt(2) + lr * math.sqrt(grad_depth) / theta)
        check_close(b[key], a[key], bound, "ray.ddp", key)
    assert (tmp_path / "ddp" / "metrics.json").is_file()  # rank 0 evaluated the finished run
    history = load_checkpoint(tmp_path / "ddp" / "last.pt")["train_state"]["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2]
