"""Data-parallel training on Ray Train (2 gloo workers on CPU) equals one process with the same global steps."""
from __future__ import annotations

import torch

from fastmil.checkpoint import load_checkpoint
from fastmil.data import SynthConfig, synthesize_store
from fastmil.data.batching import BagBatchSampler
from fastmil.train import TrainConfig, fit
from fastmil.train.splits import write_splits

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
    # the attention score's bias has an exactly-zero gradient (softmax is shift-invariant): what reaches it is
    # rounding noise, which Adam scales to full-size steps, differently in each reduction order; it changes no output
    for key in sorted(set(a) - {"model.pool.w.bias"}):
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    assert (tmp_path / "ddp" / "metrics.json").is_file()  # rank 0 evaluated the finished run
    history = load_checkpoint(tmp_path / "ddp" / "last.pt")["train_state"]["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2]
