import pytest
import torch

from fastmil import Bags


def _ragged(sizes, d=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, d, generator=g).to(dtype) for n in sizes]
    coords = [torch.randint(0, 10_000, (n, 2), generator=g) for n in sizes]
    return feats, coords


def test_from_list_packs_offsets_and_rows():
    feats, coords = _ragged([3, 1, 4])
    bags = Bags.from_list(feats, coords=coords, labels=[0, 1, 0], ids=["a", "b", "c"])
    assert bags.offsets.tolist() == [0, 3, 4, 8]
    assert bags.sizes.tolist() == [3, 1, 4]
    assert len(bags) == 3 and bags.n_instances == 8 and bags.dim == 5
    assert torch.equal(bags.features[4:8], feats[2])
    assert torch.equal(bags.coords[3:4], coords[1])
    assert bags.labels.dtype == torch.int64 and bags.labels.tolist() == [0, 1, 0]
    assert bags.bag_index().tolist() == [0, 0, 0, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_list_padded_round_trip(dtype):
    feats, coords = _ragged([7, 1, 129, 2], dtype=dtype)
    bags = Bags.from_list(feats, coords=coords, ids=["s0", "s1", "s2", "s3"])
    X, mask = bags.to_padded()
    assert X.shape == (4, 129, 5) and X.dtype == dtype
    assert mask.sum(1).tolist() == [7, 1, 129, 2]
    assert torch.all(X[~mask] == 0)
    for b, f in enumerate(feats):
        assert torch.equal(X[b, : f.shape[0]], f)
    back = Bags.from_padded(X, mask, ids=bags.ids)
    assert torch.equal(back.features, bags.features)
    assert torch.equal(back.offsets, bags.offsets)
    for b, f in enumerate(feats):
        assert torch.equal(back[b].features, f)


def test_from_padded_drops_interior_padding_in_order():
    X = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    bags = Bags.from_padded(X, mask)
    assert bags.features.flatten().tolist() == [0.0, 2.0, 7.0]
    assert bags.offsets.tolist() == [0, 2, 3]


def test_getitem_bag_of_one_and_negative_index():
    feats, coords = _ragged([2, 1])
    bags = Bags.from_list(feats, coords=coords, labels=[1, 0], ids=["x", "y"])
    one = bags[-1]
    assert one.ids == ["y"] and one.offsets.tolist() == [0, 1]
    assert torch.equal(one.features, feats[1]) and one.labels.tolist() == [0]
    with pytest.raises(IndexError):
        bags[2]


def test_to_device_keeps_everything():
    feats, coords = _ragged([2, 3])
    bags = Bags.from_list(feats, coords=coords, labels=[0, 1]).to("cpu")
    assert bags.coords is not None and bags.labels.tolist() == [0, 1] and bags.ids == ["bag0", "bag1"]


@pytest.mark.parametrize("bad_value,kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_features_name_the_slide(bad_value, kind):
    feats, _ = _ragged([3, 4])
    feats[1][2, 1] = bad_value
    with pytest.raises(ValueError, match=rf"slide 'tumour_7'.*{kind}.*instance 2"):
        Bags.from_list(feats, ids=["normal_1", "tumour_7"])


def test_coords_length_mismatch_names_the_slide():
    feats, coords = _ragged([3, 4])
    coords[1] = coords[1][:3]
    with pytest.raises(ValueError, match=r"slide 'b'.*length mismatch"):
        Bags.from_list(feats, coords=coords, ids=["a", "b"])
    with pytest.raises(ValueError, match=r"slide 'b'.*length mismatch"):
        Bags(torch.zeros(7, 2), torch.tensor([0, 3, 7]), coords=torch.zeros(5, 2, dtype=torch.int64), ids=["a", "b"])


def test_empty_bag_rejected_unless_allowed():
    feats = [torch.randn(2, 3), torch.zeros(0, 3)]
    with pytest.raises(ValueError, match=r"slide 'empty'.*empty bag"):
        Bags.from_list(feats, ids=["ok", "empty"])
    bags = Bags.from_list(feats, ids=["ok", "empty"], allow_empty=True)
    assert bags.sizes.tolist() == [2, 0]


def test_labels_out_of_range():
    feats, _ = _ragged([1, 1])
    with pytest.raises(ValueError, match=r"slide 'b'.*label 3 out of range \[0, 2\)"):
        Bags.from_list(feats, labels=[1, 3], ids=["a", "b"], n_classes=2)
    with pytest.raises(ValueError, match=r"slide 'a'.*label -1"):
        Bags.from_list(feats, labels=[-1, 0], ids=["a", "b"])


def test_offsets_validation():
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match="offsets\\[0\\] must be 0"):
        Bags(x, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"slide 'bag1'.*offsets decrease"):
        Bags(x, torch.tensor([0, 4, 3, 5]))
    with pytest.raises(ValueError, match="offsets\\[-1\\] = 4 but features hold 5"):
        Bags(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="must be int64"):
        Bags(x, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="duplicate slide id 'a'"):
        Bags(x, torch.tensor([0, 2, 5]), ids=["a", "a"])
    with pytest.raises(ValueError, match="float tensor"):
        Bags(torch.zeros(5, 2, dtype=torch.int64), torch.tensor([0, 5]))


def test_to_dtype_casts_features_only_and_keeps_the_host_offsets():
    feats, coords = _ragged([2, 3])
    bags = Bags.from_list(feats, coords=coords, labels=[0, 1])
    half = bags.to(torch.float16)
    assert half.features.dtype == torch.float16 and torch.equal(half.features.float(), bags.features.half().float())
    assert half.offsets.dtype == half.coords.dtype == half.labels.dtype == torch.int64
    assert half.offsets_cpu is bags.offsets_cpu
    with pytest.raises(ValueError, match="floating point"):
        bags.to(torch.int32)
    one = bags[1]
    assert one.offsets_cpu.tolist() == [0, 3] and one.offsets_cpu.device.type == "cpu"
