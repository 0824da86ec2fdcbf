"""The cohort cache (data.cache): bit-identical training, one store read per slide, clear refusals."""
import numpy as np
import pytest
import torch

from fastmil.data import SynthConfig, read_splits_csv, synthesize_store
from fastmil.data import cache as cache_module
from fastmil.data.cache import CohortCache, cohort_bytes, open_cache
from fastmil.data.store import FeatureStore
from fastmil.train import TrainConfig, fit

DATA = SynthConfig(n_slides=24, dim=16, median_instances=120, min_instances=30, size_sigma=0.3,
                   tumour_fraction_min=0.05, tumour_fraction_max=0.1, seed=5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthesize_store(DATA, tmp_path_factory.mktemp("cache") / "store", progress=False)


def _fit(store, out, cache: str, method: str = "plain"):
    model = ({"name": "graphmil", "heads": 2, "head_dim": 8, "radius": 1, "head_hidden": 8} if method == "srmil"
             else {"embed_dim": 32, "attn_dim": 16})
    cfg = TrainConfig.from_dict({"model": model, "optim": {"epochs": 3, "lr": 1e-3},
                                 "data": {"cache": cache, "bags_per_step": 2}, "method": {"name": method}})
    return fit(store, out, cfg, progress=False)


@pytest.mark.parametrize("method", ["plain", "srmil"])
def test_cached_epochs_train_bit_identical_weights_and_read_each_slide_once(store, tmp_path, monkeypatch, method):
    reads = []
    original = FeatureStore.read

    def counting_read(self, slide_id, dtype=None):
        reads.append(slide_id)
        return original(self, slide_id, dtype)

    monkeypatch.setattr(FeatureStore, "read", counting_read)
    plain = _fit(store, tmp_path / "none", "none", method)
    uncached_reads = len(reads)
    reads.clear()
    cached = _fit(store, tmp_path / "host", "host", method)
    a = torch.load(tmp_path / "none" / "last.pt", weights_only=True)["method_state"]
    b = torch.load(tmp_path / "host" / "last.pt", weights_only=True)["method_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train"]["loss"] for r in plain.history] == [r["train"]["loss"] for r in cached.history]
    splits = read_splits_csv(tmp_path / "host" / "splits.csv")
    train_val = len(splits["train"]) + len(splits["val"])
    # every epoch trains on train and validates on val; the final evaluation reads every slide once, uncached
    assert uncached_reads == 3 * train_val + len(store.slide_ids)
    assert len(reads) == train_val + len(store.slide_ids)  # cached: each train/val slide read once in 3 epochs


def test_cache_refuses_what_does_not_fit(store, monkeypatch):
    ids = store.slide_ids
    need = cohort_bytes(store, ids)
    assert need == sum(store.n_instances(s) * (16 * 2 + 8) for s in ids)  # fp16 features + int32 coords
    monkeypatch.setattr(cache_module, "available_host_bytes", lambda: need)  # 80% of it is usable: too little
    with pytest.raises(ValueError, match=r"data.cache=host: the 24 slides need .* GiB; 80% of the host memory"):
        open_cache("host", store, ids, torch.device("cpu"))
    assert open_cache("auto", store, ids, torch.device("cpu")) is None  # auto: no tier fits, no cache
    monkeypatch.setattr(cache_module, "available_host_bytes", lambda: 2 * need)
    assert open_cache("auto", store, ids, torch.device("cpu")).tier == "host"
    assert open_cache("none", store, ids, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="keeps the cohort on a CUDA device"):
        open_cache("device", store, ids, torch.device("cpu"))


def test_cache_returns_the_stored_slide(store):
    cache = CohortCache("host")
    sid = store.slide_ids[0]
    features, coords, table = cache.get(store, sid, neighbour_radius=1)
    f, c = store.read(sid)
    assert np.array_equal(features.numpy(), f) and np.array_equal(coords.numpy(), c)
    assert table.shape == (f.shape[0], 8)
    assert cache.get(store, sid, 1)[0] is features and cache.reads == 1 and len(cache) == 1
    assert cache.nbytes == features.nbytes + coords.nbytes + table.nbytes
