"""SRMIL and MHIM+SRMIL on the graph network: packed == per bag, masked-out rows do not leak, the loss terms and
their gradients, the cached neighbour tables of the store, configs, and training through the generic trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmil.bags import Bags
from fastmil.data import SynthConfig, synthesize_store
from fastmil.data.neighbours import cache_path, slide_neighbours
from fastmil.methods import MHIMSRMIL, StepContext, build_method, method_config
from fastmil.nn import GraphMIL, model_config
from fastmil.ops import grid_neighbours, reconstruction_loss
from fastmil.train import TrainConfig, fit, predict
from fastmil.train.config import load_config
from tests.tolerance import check, check_close, rounding_bound

DATA = SynthConfig(n_slides=24, dim=16, median_instances=150, size_sigma=0.3, tumour_fraction_min=0.05,
                   tumour_fraction_max=0.1, seed=4)
SMALL = {"name": "graphmil", "heads": 2, "head_dim": 8, "radius": 1, "head_hidden": 8, "dropout": 0.0}
FAMILY = "methods.srmil"


def _graph_layer_depth(in_dim: int, head_dim: int, out_dim: int, k: int = 9) -> int:
    """One graph-attention layer (tests/nn/test_graph.py): the projection and the folded scores over in_dim and
    head_dim (+ LeakyReLU), the softmax and the weighted sum over the k stencil cells (radius 1: 8 + the self loop),
    bias, the residual projection over in_dim, the LayerNorm over out_dim and PReLU."""
    return in_dim + head_dim + in_dim + 1 + k + 3 + k + 2 + in_dim + 2 * out_dim + 5


def _graphmil_depths(d: int, heads: int, head_dim: int, hidden: int, n: int) -> tuple[int, int]:
    """(attention, logits) of GraphMIL for a bag of n rows: the reformer over d folded into layer 1, layer 2, the
    readout's scores over head_dim (+ scale), its softmax over n (+ 3), the head mean (+ 2); the logits add the
    pooled sum over n and the MLP (over head_dim, + bias, ReLU; over hidden, + bias)."""
    width = heads * head_dim
    encoder = d + _graph_layer_depth(d, head_dim, width) + _graph_layer_depth(width, head_dim, width)
    attention = encoder + head_dim + 1 + n + 3 + 2
    return attention, attention + n + head_dim + 2 + hidden + 1


def _bags(sizes=(30, 1, 57), dim=6, seed=0) -> Bags:
    g = torch.Generator().manual_seed(seed)
    feats, coords = [], []
    for n in sizes:
        cells = torch.randperm(100, generator=g)[:n]
        coords.append(torch.stack([cells % 10 * 256, cells // 10 * 256], 1))
        feats.append(torch.randn(n, dim, generator=g))
    return Bags.from_list(feats, coords=coords, labels=[i % 2 for i in range(len(sizes))])


def _ctx(step=0) -> StepContext:
    return StepContext(epoch=0, step=step, steps_per_epoch=4, epochs=2, seed=7, class_weight=None)


def _method(name="srmil", **options):
    torch.manual_seed(0)
    return build_method(method_config({"name": name, **options}), model_config(SMALL), 6, 2)


def test_packed_batch_equals_each_bag_alone():
    torch.manual_seed(0)
    model = GraphMIL(6, 2, heads=2, head_dim=8, radius=1, dropout=0.0).double().eval()
    bags = _bags()
    bags = Bags(bags.features.double(), bags.offsets, bags.coords, bags.labels, bags.ids)
    packed = model.forward_all(bags)
    for b, one in enumerate(bags):
        alone = model.forward_all(one)
        lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
        # fp64, two computed sides (twice the bound); GraphMIL(6 features, 2 heads x 8, MLP hidden 128)
        attention, logits = _graphmil_depths(6, 2, 8, 128, hi - lo)
        check_close(packed.logits[b], alone.logits[0], 2 * rounding_bound(logits, torch.float64), FAMILY,
                    "packed vs alone: logits")
        check_close(packed.attention[lo:hi], alone.attention, 2 * rounding_bound(attention, torch.float64), FAMILY,
                    "packed vs alone: attention")


def test_a_masked_instance_has_no_effect_on_the_readout():
    torch.manual_seed(0)
    model = GraphMIL(6, 2, heads=2, head_dim=8, radius=1, dropout=0.0).double().eval()
    bags = _bags()
    h = model.encode(bags.features.double(), grid_neighbours(bags.coords, bags.offsets, 1))
    mask = torch.ones(bags.n_instances, dtype=torch.bool)
    mask[5] = False
    out = model.classify(h, bags.offsets, mask)
    h2 = h.clone()
    h2[5] += 100.0
    assert torch.equal(model.classify(h2, bags.offsets, mask).logits, out.logits)
    assert out.attention[5] == 0


def test_srmil_step_terms_and_gradients():
    method = _method()
    out = method.training_step(_bags(), _ctx())
    assert set(out.terms) == {"ce_masked", "ce_clean", "recon"}
    expected = 0.2 * (out.terms["ce_masked"] + out.terms["ce_clean"]) + 1.8 * out.terms["recon"]
    # the weighted sum of the fp32 terms (all >= 0): 2 products and 2 sums, on both sides (twice the bound)
    check_close(out.loss.detach(), expected, 2 * rounding_bound(4), FAMILY, "srmil loss of its terms")
    out.loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert method.reconstruction.mask_token.grad.abs().sum() > 0
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.parameters()}
    # masks are reproducible from (seed, epoch, step) and differ between steps
    again = _method().training_step(_bags(), _ctx())
    assert torch.equal(again.terms["recon"], out.terms["recon"])
    assert not torch.equal(_method().training_step(_bags(), _ctx(step=1)).terms["recon"], out.terms["recon"])


def test_mhim_srmil_step_has_both_regularisers():
    method = _method("mhim+srmil", recycle_tokens=2, recycle_heads=2)
    assert isinstance(method, MHIMSRMIL)
    out = method.training_step(_bags(), _ctx())
    assert {"ce", "consistency", "ce_masked", "recon", "keep_frac"} <= set(out.terms)
    expected = 0.2 * (out.terms["ce"] + 0.5 * out.terms["consistency"] + out.terms["ce_masked"]) \
        + 1.8 * out.terms["recon"]
    # the weighted sum of the fp32 terms (all >= 0): 3 products and 3 sums, on both sides (twice the bound)
    check_close(out.loss.detach(), expected, 2 * rounding_bound(6), FAMILY, "mhim+srmil loss of its terms")
    out.loss.backward()
    assert method.reconstruction.decoder.token.grad is not None
    assert all(p.grad is None for p in method.teacher.parameters())


def test_srmil_needs_the_graph_network_and_coordinates():
    with pytest.raises(TypeError, match="model.name=graphmil"):
        build_method(method_config({"name": "srmil"}), model_config({"name": "abmil"}), 6, 2)
    bags = _bags()
    no_coords = Bags(bags.features, bags.offsets, None, bags.labels, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"slides \['a', 'b', 'c'\] have no patch coordinates"):
        _method().training_step(no_coords, _ctx())


def test_config_picks_the_graph_network_for_srmil():
    assert load_config(None, ["method.name=srmil"]).model.name == "graphmil"
    assert load_config(None, ["method.name=mhim+srmil"]).model.name == "graphmil"
    assert load_config(None, ["method.name=mhim"]).model.name == "abmil"
    assert TrainConfig.from_dict(method={"name": "srmil"}).model.name == "graphmil"
    assert TrainConfig.from_dict(method={"name": "srmil"}, model={"heads": 2}).model.heads == 2


def test_reconstruction_loss_equals_an_fp64_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(50, 9, generator=g), torch.randn(50, 9, generator=g)
    mask = torch.rand(50, generator=g) > 0.3
    cos = F.cosine_similarity(pred.double(), target.double(), dim=1)[mask]
    for alpha in (1.0, 2.0, 3.0):
        want = np.mean([(1 - np.dot(p, t) / np.linalg.norm(p) / np.linalg.norm(t)) ** alpha
                        for p, t, m in zip(pred.double().numpy(), target.double().numpy(), mask.numpy()) if m])
        # fp32 against fp64: per row the dot product and the two norms over 9 (+ sqrt, 2 divisions), 1 - cos, the
        # power, then the mean over the kept rows (+ division). 1 - cos cancels and the power scales its relative
        # error by alpha: the condition is sum_i alpha (1 + |cos_i|) (1 - cos_i)^(alpha - 1) / sum_i (1 - cos_i)^alpha
        condition = float((alpha * (1 + cos.abs()) * (1 - cos) ** (alpha - 1)).sum() / ((1 - cos) ** alpha).sum())
        depth = 9 + 3 + 1 + 1 + int(mask.sum()) + 1
        check(abs(reconstruction_loss(pred, target, mask, alpha).item() - want) / want,
              rounding_bound(depth, torch.float32, condition), FAMILY, f"reconstruction loss alpha={alpha}")
    none = reconstruction_loss(pred.requires_grad_(), target, torch.zeros(50, dtype=torch.bool))
    none.backward()
    assert none.item() == 0 and pred.grad.abs().sum() == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthesize_store(DATA, tmp_path_factory.mktemp("srmil") / "store", progress=False)


def test_store_caches_neighbour_tables_and_rebuilds_stale_ones(store):
    sid = store.slide_ids[0]
    path = cache_path(store, sid, 2)
    path.unlink(missing_ok=True)
    coords = store.read_coords(sid)
    table = slide_neighbours(store, sid, 2)
    assert path.is_file()
    step = int(store.slide_attrs(sid)["patch_size_level0"])
    expected = grid_neighbours(torch.from_numpy(coords.astype(np.int64)), torch.tensor([0, len(coords)]), 2, step)
    np.testing.assert_array_equal(table, expected.numpy())
    mtime = path.stat().st_mtime_ns
    np.testing.assert_array_equal(slide_neighbours(store, sid, 2), table)  # read back identically, not rebuilt
    assert path.stat().st_mtime_ns == mtime
    # stale: a table whose coordinate digest does not match the slide's is rebuilt
    with np.load(path) as z:
        np.savez(path.with_suffix(".tmp.npz"), neighbours=z["neighbours"][::-1].copy(), step=z["step"],
                 coords_sha1=np.str_("0" * 40))
    path.with_suffix(".tmp.npz").replace(path)
    np.testing.assert_array_equal(slide_neighbours(store, sid, 2), table)
    path.write_bytes(b"truncated")  # a damaged file counts as absent
    np.testing.assert_array_equal(slide_neighbours(store, sid, 2), table)
    bags = store.load_bags(store.slide_ids[:3], neighbour_radius=2)
    assert torch.equal(bags.neighbours, grid_neighbours(bags.coords, bags.offsets, 2, step))


@pytest.mark.parametrize("method", ["srmil", "mhim+srmil"])
def test_training_through_the_generic_trainer(store, tmp_path, method):
    cfg = TrainConfig.from_dict(model=SMALL, method={"name": method}, optim={"epochs": 3, "lr": 2e-3},
                                run={"seed": 0})
    result = fit(store, tmp_path / "run", cfg, progress=False)
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    recon = [float(row.split(",")[header.index("train_recon")]) for row in lines[1:]]
    assert len(recon) == 3 and recon[-1] < recon[0]  # the label-free loss falls
    pred = predict(tmp_path / "run", store, tmp_path / "pred", store.slide_ids[:4], progress=False)
    assert (pred / "predictions.csv").is_file()
    assert result.metrics["test"]["n"] > 0


def test_fit_refuses_slides_without_coordinates_naming_them(tmp_path):
    from fastmil.data import create_store

    s = create_store(tmp_path / "store")
    g = np.random.default_rng(0)
    for i in range(6):
        coords = None if i == 4 else (np.stack(np.divmod(np.arange(20), 5), 1) * 256).astype(np.int32)
        s.write_slide(f"s{i}", g.standard_normal((20, 6)).astype(np.float32), coords, {"label": i % 2})
    s.update_attrs(classes=["a", "b"])
    cfg = TrainConfig.from_dict(model=SMALL, method={"name": "srmil"}, optim={"epochs": 1})
    with pytest.raises(ValueError, match=r"1 slide\(s\) have no patch coordinates, which method srmil needs: s4"):
        fit(s, tmp_path / "run", cfg, progress=False)


def test_reconstruction_loss_gradient_equals_autograd_of_the_formula():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(40, 7, generator=g, dtype=torch.float64)
    target = torch.randn(40, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(40, generator=g) > 0.4
    for alpha in (1.0, 2.5):
        p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        reconstruction_loss(p1, target, mask, alpha).backward()
        err = (1 - F.cosine_similarity(p2, target, dim=1)).pow(alpha)
        (err[mask].sum() / mask.sum()).backward()
        # fp64, two computed sides (twice the bound): the forward per row (dot product and norms over 7, + 3, 1 -
        # cos, the power) and its backward (dcos/dp = t / (|p| |t|) - cos p / |p|^2, + the power's derivative,
        # + 1 / count): each gradient row comes from its own row alone
        depth = 2 * (7 + 3 + 2) + 4
        check_close(p1.grad, p2.grad, 2 * rounding_bound(depth, torch.float64), FAMILY,
                    f"reconstruction loss gradient alpha={alpha}")
    assert torch.autograd.gradcheck(lambda p: reconstruction_loss(p, target, mask, 2.0), pred.clone().requires_grad_())


def test_projected_reconstruction_loss_equals_the_unfused_loss():
    from fastmil.ops.reconstruction_loss import projected_reconstruction_loss

    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 5, generator=g, dtype=torch.float64)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64)
    b = torch.randn(9, generator=g, dtype=torch.float64)
    target = torch.randn(37, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(37, generator=g) > 0.3
    for alpha in (1.0, 2.0):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        fused = projected_reconstruction_loss(*leaves, target, mask, alpha, chunk_rows=8)  # 5 chunks, ragged tail
        fused.backward()
        ref_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        ref = reconstruction_loss(ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2], target, mask, alpha)
        ref.backward()
        # fp64, two computed sides (twice the bound): the projection over 5 (+ bias), the row's dot product and
        # norms over 9 (+ 3), 1 - cos, the power, the mean over the 37 rows (+ division)
        depth = 5 + 1 + 9 + 3 + 2 + 37 + 1
        check_close(fused, ref, 2 * rounding_bound(depth, torch.float64), FAMILY, f"projected loss alpha={alpha}")
        # the backward as long as the forward, + the sum over the 37 rows into the weight and bias gradients
        for a, r, name in zip(leaves, ref_leaves, ("h", "weight", "bias")):
            check_close(a.grad, r.grad, 2 * rounding_bound(2 * depth + 37, torch.float64), FAMILY,
                        f"projected loss alpha={alpha}: grad {name}")


def test_decoder_loss_fused_or_not_is_the_same():
    from fastmil.nn import GraphDecoder

    torch.manual_seed(0)
    nbr = _bags().neighbours if _bags().neighbours is not None else grid_neighbours(
        _bags().coords, _bags().offsets, 1)
    n = nbr.shape[0]
    dec = GraphDecoder(8, 20, 2, 4).double()  # the last layer: one head 8 -> 20, aggregates first
    assert dec.layers[-1].aggregates_first
    h, target = torch.randn(n, 8, dtype=torch.float64), torch.randn(n, 20, dtype=torch.float64)
    masked = torch.rand(n) > 0.3
    fused = dec.reconstruction_loss(h, nbr, masked, target, 2.0)
    plain = reconstruction_loss(dec(h, nbr, masked), target, masked, 2.0)
    # fp64, two computed sides (twice the bound): the decoder's projection over 8 (+ bias), its hidden layer
    # (8 -> 2 x 4), the last layer (aggregate over the 9 cells, then project over 8, + bias), the loss per row over
    # 20 (+ 5) and its mean over the n rows (+ division)
    depth = 8 + 1 + _graph_layer_depth(8, 4, 8) + (8 + 4 + 1 + 9 + 3 + 9 + 8 + 1) + 20 + 5 + n + 1
    check_close(fused, plain, 2 * rounding_bound(depth, torch.float64), FAMILY, "decoder loss fused vs plain")


def test_an_unwritable_store_keeps_tables_in_memory_checked_like_the_files(store, monkeypatch):
    from collections import OrderedDict

    import fastmil.data.neighbours as nb

    monkeypatch.setattr(nb.os, "access", lambda *args: False)
    monkeypatch.setattr(nb, "_memory", OrderedDict())
    monkeypatch.setattr(nb, "_warned", set())
    sid = store.slide_ids[1]
    path = cache_path(store, sid, 1)
    path.unlink(missing_ok=True)
    with pytest.warns(RuntimeWarning, match="not writable"):
        first = slide_neighbours(store, sid, 1)
    assert not path.exists()
    assert slide_neighbours(store, sid, 1) is first  # from memory
    coords = store.read_coords(sid).copy()
    coords[[0, 1]] = coords[[1, 0]]  # other coordinates (two patches swapped): the memory entry is stale
    swapped = slide_neighbours(store, sid, 1, coords)
    assert swapped is not first and swapped[0].tolist() == [(-1 if v < 0 else {0: 1, 1: 0}.get(v, v))
                                                             for v in first[1].tolist()]
