"""DSMIL and CLAM (single- and multi-branch) on packed ragged bags: packed == per bag (outputs and gradients of the
whole objective), each against an independent per-bag reference written the way the published code computes it,
masked instances without effect, extra tokens == the same tokens appended as instances, and the instance losses."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fastmil.bags import Bags
from fastmil.methods import StepContext, model_objective
from fastmil.nn import CLAM_MB, CLAM_SB, DSMIL
from fastmil.nn.dsmil import critical_instances
from fastmil.nn.instance_losses import instance_loss, smooth_top1_svm
from tests.nn.gradient_terms import close_grads, gradient_terms
from tests.tolerance import check, check_close, check_per_bag, rounding_bound

BACKBONES = ["dsmil", "clam_sb", "clam_mb"]
SIZES = [1, 7, 33, 70]
FAMILY = "nn.backbones"
D, E, A, Q, C = 12, 20, 10, 8, 3  # _model's sizes: features, embedding, CLAM's gate, DSMIL's queries, classes


# Depths (tests/tolerance.py) of one fp64 result's chain in a bag of n rows (+ k extra tokens' merge where given).
# Every comparison here has two computed sides with their own rounding orders: it allows twice the chain's bound.
def _embed_depth() -> int:
    return D + 2  # the embedding GEMM over D, + bias, ReLU


def _weights_depth(name: str, n: int) -> int:
    """... the scores (DSMIL: the query network over E and Q, + 4, its dot product with the critical query over Q, +
    the scale; CLAM: V/U over E, + 4, w over A, + bias), then the softmax over the bag's n rows (+ max, exp,
    divide)."""
    scores = E + 2 * Q + 5 if name == "dsmil" else E + 4 + A + 1
    return _embed_depth() + scores + n + 3


def _logits_depth(name: str, n: int) -> int:
    """... the pooled sum over n, the bag classifier (DSMIL over C E, + bias, + the mean with the max-instance
    logits; CLAM over E, + bias)."""
    head = C * E + 3 if name == "dsmil" else E + 1
    return _weights_depth(name, n) + n + head


def _loss_depth(name: str, n: int, bags: int) -> int:
    """... the objective: cross-entropy over C (+ 3), the mean over the bags, and the weighted sum of the terms
    (CLAM's clustering term: a shorter chain, the instance classifier over E on the embedding)."""
    return _logits_depth(name, n) + C + 3 + bags + 2


def _grad_depth(name: str, n: int, bags: int, total: int) -> int:
    """A parameter's gradient: the loss's chain, the backward through the same reductions in reverse (as long again),
    and the sum over the batch's ``total`` rows into the parameter."""
    return 2 * _loss_depth(name, n, bags) + total


def _bound(depth: int) -> float:
    """fp64 against fp64, both computed: twice the bound of a chain of ``depth`` roundings."""
    return 2 * rounding_bound(depth, torch.float64)


def _close(actual, expected, depth: int, what: str, scale: float | None = None) -> None:
    check_close(actual, expected, _bound(depth), FAMILY, what, scale)


def _close_per_bag(actual, expected, offsets, depth: int, what: str) -> None:
    """Attention weights: each bag's rows relative to that bag's largest weight (~1/n), not the batch's (1)."""
    check_per_bag(actual, expected, offsets, _bound(depth), FAMILY, what)


def _model(name: str, n_classes: int = 3, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = {"dsmil": DSMIL, "clam_sb": CLAM_SB, "clam_mb": CLAM_MB}[name]
    if name == "dsmil":
        model = cls(12, embed_dim=20, n_classes=n_classes, query_dim=8, dropout=0.0, **options)
    else:
        model = cls(12, embed_dim=20, attn_dim=10, n_classes=n_classes, dropout=0.0, k_sample=3, **options)
    return model.double()


def _bags(sizes=SIZES, labels=None, seed=1) -> Bags:
    g = torch.Generator().manual_seed(seed)
    labels = labels if labels is not None else [b % 3 for b in range(len(sizes))]
    return Bags.from_list([torch.randn(n, 12, generator=g, dtype=torch.float64) for n in sizes], labels=labels)


def _ctx() -> StepContext:
    return StepContext(epoch=0, step=0, steps_per_epoch=1, epochs=1, seed=0)


def _objective(model, bags: Bags, mask: torch.Tensor | None, term: str | None = None) -> torch.Tensor:
    """The training loss of a forward pass (or one unweighted term of it)."""
    out = model.forward_all(bags, mask=mask)
    return model_objective(model, out, bags, _ctx())[0] if term is None else model.objective(out, bags, _ctx())[term][1]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("masked", [False, True])
def test_packed_batch_equals_each_bag_alone_outputs_and_gradients(name, masked):
    """The whole objective (bag loss and the backbone's own terms) of a packed batch is the mean of the per-bag
    objectives, with equal outputs per bag; with a mask, bag 2 is entirely masked and the others partly."""
    model = _model(name)
    bags = _bags()
    g = torch.Generator().manual_seed(5)
    mask = None
    if masked:
        mask = torch.rand(bags.n_instances, generator=g) > 0.3
        mask[bags.offsets[2] : bags.offsets[3]] = False
        mask[0] = True  # the bag of one keeps its instance
    out = model.forward_all(bags, mask=mask)
    loss, terms = model_objective(model, out, bags, _ctx())
    loss.backward()
    packed = _grads(model)
    assert set(terms) == ({"ce", "max_instance"} if name == "dsmil" else {"ce", "instance"})
    grad_terms = gradient_terms(model, partial(_objective, model, bags, mask))

    model.zero_grad()
    total = 0.0
    for b in range(len(bags)):
        lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
        one = bags[b]
        out_b = model.forward_all(one, mask=None if mask is None else mask[lo:hi])
        n = hi - lo
        _close(out_b.logits[0], out.logits[b], _logits_depth(name, n), f"{name} per-bag logits")
        _close(out_b.attention, out.attention[lo:hi], _weights_depth(name, n), f"{name} per-bag attention")
        _close(out_b.bag_embedding[0], out.bag_embedding[b], _weights_depth(name, n) + n, f"{name} per-bag embedding")
        total = total + model_objective(model, out_b, one, _ctx())[0] / len(bags)
    n_max, n_total = max(SIZES), sum(SIZES)
    _close(total, loss, _loss_depth(name, n_max, len(bags)), f"{name} per-bag loss")
    total.backward()
    close_grads(_grads(model), packed, _bound(_grad_depth(name, n_max, len(bags), n_total)), FAMILY,
                f"{name} per-bag grad", grad_terms)


def _dsmil_reference(model: DSMIL, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One bag's embedded instances ``h [n, E]`` -> (logits, max-instance logits, class attention [n, C], bag
    logits), written as the published DSMIL computes them (a sort for the critical instances: no ties in random
    data)."""
    c = h @ model.instance_classifier.weight.T + model.instance_classifier.bias
    _, order = torch.sort(c, 0, descending=True)
    q_max = model.query(h[order[0]])
    q = model.query(h)
    a = torch.softmax(q @ q_max.T / math.sqrt(q.shape[1]), 0)
    bag = model.bag_classifier((a.T @ h).reshape(1, -1))[0]
    top = c.max(0).values
    return 0.5 * (bag + top), top, a, bag


def _clam_reference(model, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One bag -> (logits, branch attention [n, branches]) as the published CLAM_SB / CLAM_MB compute them."""
    pool = model.pool
    a = torch.softmax(pool.w(torch.tanh(pool.V(h)) * torch.sigmoid(pool.U(h))), 0)  # [n, branches]
    m = a.T @ h  # [branches, E]
    if isinstance(model, CLAM_MB):
        logits = torch.stack([m[k] @ model.classifier.weight[k] + model.classifier.bias[k]
                              for k in range(model.n_classes)])
    else:
        logits = model.classifier(m[0])
    return logits, a


@pytest.mark.parametrize("name", BACKBONES)
def test_backbones_equal_the_published_computation_per_bag(name):
    """Outputs, instance logits (MHIM's teacher scores) and the gradients of the published loss
    (DSMIL ``0.5 CE(bag) + 0.5 CE(max)``, CLAM its CE; clustering gradients: below) per bag, every parameter
    reached."""
    model = _model(name).eval()
    bags = _bags(sizes=[1, 9, 40])
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(bags.n_instances, generator=g) > 0.25
    mask[0] = True
    if name != "dsmil":
        model.bag_weight = 1.0
    out = model.forward_all(bags, mask=mask)
    for b in range(len(bags)):
        lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
        keep = mask[lo:hi]
        target = bags.labels[b : b + 1]
        h = model.embed_instances(bags.features[lo:hi][keep])
        n = int(keep.sum())
        if name == "dsmil":
            logits, top, a, bag_logits = _dsmil_reference(model, h)
            # the instance classifier over E (+ bias) on the embedding
            _close(out.extras["max_logits"][b], top, _embed_depth() + E + 1, "dsmil max-instance logits")
            _close(out.extras["class_attention"][lo:hi][keep], a, _weights_depth(name, n), "dsmil class attention")
            instance = h @ model.instance_classifier.weight.T + model.instance_classifier.bias
            instance_depth = _embed_depth() + E + 1
            reference_loss = 0.5 * F.cross_entropy(bag_logits[None], target) + 0.5 * F.cross_entropy(top[None], target)
        else:
            logits, a = _clam_reference(model, h)
            _close(out.extras["branch_weights"][lo:hi][keep], a, _weights_depth(name, n), f"{name} branch attention")
            instance = (h @ model.classifier.weight.T) * (a if name == "clam_mb" else a[:, :1]) + model.classifier.bias
            instance_depth = _weights_depth(name, n) + 2  # the attention weight, times W h (over E), + bias
            reference_loss = F.cross_entropy(logits[None], target)
        _close(out.logits[b], logits, _logits_depth(name, n), f"{name} logits vs published")
        _close(model.instance_logits(out)[lo:hi][keep], instance, instance_depth, f"{name} instance logits")
        column = 0 if name == "clam_sb" else int(logits.argmax())
        _close(out.attention[lo:hi][keep], a[:, column], _weights_depth(name, n), f"{name} attention vs published")
        assert torch.all(out.attention[lo:hi][~keep] == 0)

        model.zero_grad()
        reference_loss.backward()
        expected = _grads(model)
        model.zero_grad()
        one = bags[b]
        model_objective(model, model.forward_all(one, mask=keep), one, _ctx())[0].backward()
        got = _grads(model)
        assert set(got) == set(expected)
        grad_terms = gradient_terms(model, partial(_objective, model, one, keep))
        close_grads(got, expected, _bound(_grad_depth(name, n, 1, n)), FAMILY, f"{name} grad vs published", grad_terms)
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    unreached = {n for n, _ in model.named_parameters()} - reached
    clustering_only = {f"instance_classifiers.{k}.{p}" for k in range(3) for p in ("weight", "bias")}
    assert unreached <= (clustering_only if name != "dsmil" else set()), unreached


def test_parameter_shapes_are_the_published_ones():
    """E = 512, C = 2: the sizes the published code builds (DSMIL queries 128 and Conv1d(C, C, E); CLAM gates 256,
    per-class instance classifiers; TransMIL 8 heads, E / 2 landmarks, residual kernel 33, PPEG 7/5/3)."""
    d = {k: tuple(v.shape) for k, v in DSMIL(1024).state_dict().items()}
    assert d["query.0.weight"] == (128, 512) and d["query.2.weight"] == (128, 128)
    assert d["instance_classifier.weight"] == (2, 512) and d["bag_classifier.weight"] == (2, 1024)
    for cls, branches in ((CLAM_SB, 1), (CLAM_MB, 2)):
        c = {k: tuple(v.shape) for k, v in cls(1024).state_dict().items()}
        assert c["pool.V.weight"] == (256, 512) and c["pool.U.weight"] == (256, 512)
        assert c["pool.w.weight"] == (branches, 256) and c["instance_classifiers.1.weight"] == (2, 512)
    from fastmil.nn import TransMIL

    model = TransMIL(1024)
    t = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert t["layer1.attn.to_qkv.weight"] == (1536, 512) and "layer1.attn.to_qkv.bias" not in t
    assert t["layer1.attn.residual.weight"] == (8, 1, 33, 1) and model.layer1.attn.landmarks == 256
    assert [t[f"ppeg.convs.{i}.weight"] for i in range(3)] == [(512, 1, 7, 7), (512, 1, 5, 5), (512, 1, 3, 3)]


@pytest.mark.parametrize("name", BACKBONES)
def test_masked_instances_have_no_effect(name):
    """Masked rows changed by +-1e3 change no output, no loss and no gradient."""
    model = _model(name)
    bags = _bags()
    mask = torch.rand(bags.n_instances, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[0] = True
    results = []
    grad_terms = gradient_terms(model, partial(_objective, model, bags, mask))
    for shift in (0.0, 1e3):
        features = bags.features.clone()
        features[~mask] += shift * torch.randn(int((~mask).sum()), 12, dtype=torch.float64)
        moved = Bags(features, bags.offsets, labels=bags.labels, ids=bags.ids)
        model.zero_grad()
        out = model.forward_all(moved, mask=mask)
        loss, _ = model_objective(model, out, moved, _ctx())
        loss.backward()
        results.append((out.logits.detach(), out.attention.detach(), loss.detach(), _grads(model)))
    (l0, a0, loss0, g0), (l1, a1, loss1, g1) = results
    n_max, n_total = max(SIZES), sum(SIZES)
    _close(l1, l0, _logits_depth(name, n_max), f"{name} masked rows moved: logits")
    _close_per_bag(a1, a0, bags.offsets, _weights_depth(name, n_max), f"{name} masked rows moved: attention")
    _close(loss1, loss0, _loss_depth(name, n_max, len(bags)), f"{name} masked rows moved: loss")
    close_grads(g1, g0, _bound(_grad_depth(name, n_max, len(bags), n_total)), FAMILY,
                f"{name} masked rows moved: grad", grad_terms)


@pytest.mark.parametrize("name", BACKBONES)
def test_extra_tokens_pool_like_instances_appended_to_their_bags(name):
    """``aggregate(h, ..., tokens)`` (MHIM's recycled tokens) == the same tokens appended after each bag's rows as
    unmasked instances; a bag whose ``token_valid`` is False gets none. For DSMIL one bag's critical instance
    for one class is made a token, so both sources of critical instances are exercised."""
    model = _model(name).eval()
    bags = _bags(sizes=[5, 1, 30])
    mask = torch.rand(bags.n_instances, generator=torch.Generator().manual_seed(6)) > 0.3
    mask[5] = False  # the bag of one is all masked: its tokens alone count
    h = model.embed_instances(bags.features)
    tokens = torch.randn(3, 2, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64).relu()
    if name == "dsmil":  # a token far along class 0's instance-classifier direction: bag 0's critical instance
        tokens[0, 1] += 5.0 * model.instance_classifier.weight[0].detach().relu()
    valid = torch.tensor([True, True, False])
    out = model.aggregate(h, bags.offsets, mask, offsets_cpu=bags.offsets, tokens=tokens, token_valid=valid)

    rows, row_mask, offsets, own = [], [], [0], []
    for b in range(3):
        lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
        extra = tokens[b] if valid[b] else tokens[b, :0]
        rows += [h[lo:hi], extra]
        row_mask += [mask[lo:hi], torch.ones(extra.shape[0], dtype=torch.bool)]
        own.append(torch.arange(offsets[-1], offsets[-1] + hi - lo))
        offsets.append(offsets[-1] + hi - lo + extra.shape[0])
    offsets = torch.tensor(offsets)
    ref = model.aggregate(torch.cat(rows), offsets, torch.cat(row_mask), offsets_cpu=offsets)
    # the largest bag with its 2 tokens; the merge of the two softmax groups adds ~8 elementwise steps (max, exp,
    # sum, divide, log, exp of the tokens' shares, the two-term sum)
    n = 30 + 2
    _close(out.logits, ref.logits, _logits_depth(name, n) + 8, f"{name} tokens: logits")
    _close(out.bag_embedding, ref.bag_embedding, _weights_depth(name, n) + n + 8, f"{name} tokens: embedding")
    _close_per_bag(out.attention, ref.attention[torch.cat(own)], bags.offsets, _weights_depth(name, n) + 8,
                   f"{name} tokens: attention")
    if name == "dsmil":  # the instance classifier over E (+ bias) on the embedding
        _close(out.extras["max_logits"], ref.extras["max_logits"], E + 1, "dsmil tokens: max-instance logits")
        with torch.no_grad():  # bag 0's class-0 maximum is the planted token's, above every row's
            best_row = model.instance_classifier(h[:5][mask[:5]])[:, 0].max()
            assert float(out.extras["max_logits"][0, 0]) > float(best_row)


def test_one_branch_pools_through_the_fused_op_like_the_generic_path():
    """``GatedBranchPool`` with one branch (CLAM_SB) runs the fused gated op; it equals scoring with ``scores`` and
    pooling with ``attention_pool``, outputs, log-sum-exp and gradients."""
    from fastmil.nn import GatedBranchPool
    from fastmil.ops import attention_pool

    torch.manual_seed(0)
    pool = GatedBranchPool(12, 6, 1).double()
    bags = _bags()
    h = bags.features.clone().requires_grad_()
    mask = torch.rand(bags.n_instances, generator=torch.Generator().manual_seed(8)) > 0.3
    fused = pool(h, bags.offsets, mask, return_lse=True)
    generic = attention_pool(pool.scores(h), h, bags.offsets, mask, return_lse=True)
    assert [tuple(t.shape) for t in fused] == [(4, 1, 12), (bags.n_instances, 1), (4, 1)]
    # scores: V/U over 12 (+ 4), w over 6 (+ bias); the softmax over the largest bag's 70 rows (+ 3); the pooled
    # sum over them; the log-sum-exp (+ log, add)
    n, scores = max(SIZES), 12 + 4 + 6 + 1
    depths = [scores + n + 3 + n, scores + n + 3, scores + n + 2]
    for a, b, depth, what in zip(fused, generic, depths, ("pooled", "weights", "lse")):
        _close(a, b, depth, f"fused one-branch pool: {what}")
    grads = [torch.autograd.grad((out[0] ** 2).sum() + out[2].sum(), [h, *pool.parameters()])
             for out in (fused, generic)]
    names = ["h", *(n for n, _ in pool.named_parameters())]
    grad_terms = gradient_terms(pool, lambda: (lambda out: (out[0] ** 2).sum() + out[2].sum())(
        attention_pool(pool.scores(h), h, bags.offsets, mask, return_lse=True)))
    # the forward chain, the backward through its reductions (as long again), the sum over the 111 rows
    grad_bound = _bound(2 * (depths[0] + 2) + bags.n_instances)
    close_grads(dict(zip(names, grads[0])), dict(zip(names, grads[1])), grad_bound, FAMILY,
                "fused one-branch pool: grad", grad_terms)


def test_critical_instances_are_the_first_maximum_of_each_bags_unmasked_rows():
    g = torch.Generator().manual_seed(0)
    sizes = [1, 6, 0, 9, 4]
    logits = torch.randint(0, 3, (sum(sizes), 2), generator=g).double()  # many ties
    logits[3, 1] = float("nan")
    mask = torch.rand(sum(sizes), generator=g) > 0.3
    mask[16:20] = False  # the last bag all masked
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    rows, found = critical_instances(logits, offsets, mask)
    for b in range(len(sizes)):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        for k in range(2):
            best, best_row = None, None
            for i in range(lo, hi):
                v = float(logits[i, k])
                if mask[i] and not math.isnan(v) and (best is None or v > best):
                    best, best_row = v, i
            assert bool(found[b, k]) == (best_row is not None), (b, k)
            assert int(rows[b, k]) == (best_row if best_row is not None else 0), (b, k)


def test_clam_instance_clustering_equals_the_published_selection_and_loss():
    """In-class: top and bottom ``k_sample`` of the label's branch -> targets 1 / 0; with subtyping the other
    classes' branches give their top ``k_sample`` as negatives and the sum is divided by the class count."""
    for cls, subtyping in ((CLAM_SB, False), (CLAM_MB, False), (CLAM_MB, True)):
        torch.manual_seed(0)
        model = cls(12, embed_dim=20, attn_dim=10, n_classes=3, dropout=0.0, k_sample=3, subtyping=subtyping,
                    instance_loss="svm").double()
        bags = _bags(sizes=[10, 8], labels=[2, 0])
        out = model.forward_all(bags)
        terms = model.objective(out, bags, _ctx())
        expected = 0.0
        for b, label in enumerate([2, 0]):
            lo, hi = int(bags.offsets[b]), int(bags.offsets[b + 1])
            h = out.instance_embedding[lo:hi]
            a = out.extras["branch_weights"][lo:hi]
            per_bag = 0.0
            for k in range(3):
                branch = a[:, k if cls is CLAM_MB else 0]
                if k == label:
                    picked = torch.cat([torch.topk(branch, 3).indices, torch.topk(-branch, 3).indices])
                    target = torch.tensor([1, 1, 1, 0, 0, 0])
                elif subtyping:
                    picked, target = torch.topk(branch, 3).indices, torch.zeros(3, dtype=torch.int64)
                else:
                    continue
                per_bag = per_bag + smooth_top1_svm(model.instance_classifiers[k](h[picked]), target)
            expected = expected + (per_bag / 3 if subtyping else per_bag)
        weight, value = terms["instance"]
        assert weight == pytest.approx(0.3)
        # the rows' embedding and the instance classifier over E (+ bias), the smooth SVM's log-sum-exp over 2
        # classes (+ 5), the mean over its 6 rows, the sum over 3 classes, / 3, / 2 bags
        depth = _embed_depth() + E + 1 + 5 + 6 + 3 + 2 + 2
        what = f"{cls.__name__} subtyping={subtyping} clustering"
        _close(value, expected / 2, depth, f"{what} loss")
        model.zero_grad()
        value.backward(retain_graph=True)
        got = _grads(model)
        model.zero_grad()
        (expected / 2).backward()
        assert got.keys() == _grads(model).keys() and any(k.startswith("instance_classifiers") for k in got)
        grad_terms = gradient_terms(model, partial(_objective, model, bags, None, "instance"))
        # backward as long again, + the sum over the 18 rows
        close_grads(got, _grads(model), _bound(2 * depth + 18), FAMILY, f"{what} grad", grad_terms)


def test_clam_small_bags_overlap_as_published_and_smaller_ones_use_half():
    """k_sample = 3: a bag of 5 takes its top 3 and bottom 3 (overlapping, as the published code does); a bag of 2
    (where the published topk fails) one and one; a bag of one adds no term."""
    model = _model("clam_sb")
    bags = _bags(sizes=[1, 5, 2], labels=[1, 1, 1])
    out = model.forward_all(bags)
    h, a = out.instance_embedding, out.extras["branch_weights"][:, 0]
    expected = 0.0
    for lo, hi, k in ((1, 6, 3), (6, 8, 1)):
        picked = torch.cat([torch.topk(a[lo:hi], k).indices, torch.topk(-a[lo:hi], k).indices]) + lo
        expected = expected + smooth_top1_svm(model.instance_classifiers[1](h[picked]), torch.tensor([1] * k + [0] * k))
    # as in the clustering test: embedding, instance classifier over E, the SVM (+ 5), mean over 6 rows, / 3
    _close(model.objective(out, bags, _ctx())["instance"][1], expected / 3, _embed_depth() + E + 1 + 5 + 6 + 3,
           "clam_sb small-bag clustering loss")


def test_clam_instance_term_needs_class_labels():
    model = _model("clam_sb")
    bags = _bags(sizes=[4, 4], labels=[0, 1])
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=1, epochs=1, seed=0, loss_fn=lambda logits, b: logits.sum(),
                      loss_name="nll")
    with pytest.raises(ValueError, match="bag_weight=1"):
        model.objective(model.forward_all(bags), bags, ctx)
    model.bag_weight = 1.0
    assert set(model.objective(model.forward_all(bags), bags, ctx)) == {"ce"}


def test_smooth_top1_svm_is_its_formula_and_tends_to_the_hinge():
    x = torch.tensor([[2.0, 0.0], [0.5, 1.0], [-1.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    by_hand = [math.log(math.exp(2.0) + math.exp(1.0)) - 2.0,
               math.log(math.exp(0.5) + math.exp(2.0)) - 0.5,
               math.log(math.exp(0.0) + math.exp(3.0)) - 3.0]
    # the log-sum-exp over 2 (+ max, subtract, exp, sum, log, add: ~7) less the label's logit, the mean over 3 rows;
    # each row's result log(...) - x_y cancels: the condition is the terms' magnitude over the result's
    label_logits = x.gather(1, y[:, None])[:, 0].tolist()
    terms = sum(abs(v + t) + abs(t) for v, t in zip(by_hand, label_logits))  # |log-sum-exp| + |x_y| per row
    condition = terms / abs(sum(by_hand))
    check(abs(float(smooth_top1_svm(x, y)) - sum(by_hand) / 3) / abs(sum(by_hand) / 3),
          2 * rounding_bound(7 + 1 + 3, torch.float64, condition), FAMILY, "smooth top-1 SVM by hand")
    hinge = (x + 1.0 - F.one_hot(y, 2)).max(1).values - x.gather(1, y[:, None])[:, 0]
    # not rounding: tau log(2) is the largest gap between the smooth loss and the hinge
    assert float(smooth_top1_svm(x, y, tau=1e-3)) == pytest.approx(float(hinge.mean()), abs=1e-3)
    # exact: instance_loss("ce") is F.cross_entropy on the same fp64 tensors
    torch.testing.assert_close(instance_loss("ce", x, y), F.cross_entropy(x, y), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one of"):
        instance_loss("focal", x, y)


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="bag_weight"):
        DSMIL.Config(bag_weight=1.5)
    with pytest.raises(ValueError, match="instance_loss"):
        CLAM_SB.Config(instance_loss="hinge")
    with pytest.raises(ValueError, match="k_sample"):
        CLAM_MB.Config(k_sample=0)
    assert CLAM_MB.Config().name == "clam_mb" and CLAM_SB.Config().name == "clam_sb"
