"""Feature-store read throughput: a 100k x 1024 fp16 slide from the zarr store vs h5py with (4096, D) chunks.

Target (issue #2): store read time <= 1.5x the h5py read of the same bytes. Both are timed in one run; see
`benchmarks/report.py` for the ratio. The store's chunks carry a CRC32C (issue 29): the same slide read without
verifying it, and a slide written without checksums, are timed in the same run to show what verification costs.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from fastmil.data import create_store, open_store

N, D = 100_000, 1024


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_bench")
    feats = np.random.default_rng(0).standard_normal((N, D)).astype(np.float16)
    coords = np.stack(np.divmod(np.arange(N), 400), axis=1).astype(np.int32) * 512
    store = create_store(root / "store")
    store.write_slide("big", feats, coords)
    store.write_slide("big-unsummed", feats, coords, checksum=False)
    store.close()
    with h5py.File(root / "big.h5", "w") as fh:
        fh.create_dataset("features", data=feats, chunks=(4096, D))
        fh.create_dataset("coords", data=coords)
    return root, feats


def _read_store(root, slide="big", verify=True):
    return open_store(root / "store", verify_checksums=verify).read(slide)[0]


def _read_h5(root):
    with h5py.File(root / "big.h5", "r") as fh:
        return fh["features"][:]


@pytest.mark.benchmark(group="store-read-100kx1024-fp16")
def test_read_fastmil_store(benchmark, slide_files):
    root, feats = slide_files
    out = benchmark.pedantic(_read_store, args=(root,), rounds=7, warmup_rounds=1)
    assert out.tobytes() == feats.tobytes()


@pytest.mark.benchmark(group="store-read-100kx1024-fp16")
def test_read_h5py_4096_chunks(benchmark, slide_files):
    root, feats = slide_files
    out = benchmark.pedantic(_read_h5, args=(root,), rounds=7, warmup_rounds=1)
    assert out.tobytes() == feats.tobytes()


@pytest.mark.benchmark(group="store-read-100kx1024-fp16")
def test_read_fastmil_store_checksums_not_verified(benchmark, slide_files):
    root, feats = slide_files
    out = benchmark.pedantic(_read_store, args=(root, "big", False), rounds=7, warmup_rounds=1)
    assert out.tobytes() == feats.tobytes()


@pytest.mark.benchmark(group="store-read-100kx1024-fp16")
def test_read_fastmil_store_written_without_checksums(benchmark, slide_files):
    root, feats = slide_files
    out = benchmark.pedantic(_read_store, args=(root, "big-unsummed"), rounds=7, warmup_rounds=1)
    assert out.tobytes() == feats.tobytes()
